"""File helpers of the export: a staging folder, hashing, cache folders (atomic writes: fastdiff._atomic)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """``$FASTDIFF_CACHE_DIR`` or ``~/.cache/fastdiff``: where on-the-fly exports and engines are kept."""
    env = os.environ.get("FASTDIFF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdiff"


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` (same filesystem, so moving out of it is an atomic rename); removed
    on exit whatever happens. Files are published from it with :func:`publish`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: list[Path], out_dir: Path) -> list[Path]:
    """Move staged files into ``out_dir`` with ``os.replace``, in the given order (put the file that references
    the others, e.g. ``model.onnx`` after its ``.data`` file, last)."""
    final = []
    for p in staged:
        dest = out_dir / p.name
        os.chmod(p, 0o644)
        os.replace(p, dest)
        final.append(dest)
    return final


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_digest(path: str | os.PathLike) -> str:
    """sha256 over an ONNX file and its external data files (sorted), so a change to either changes the digest."""
    path = Path(path)
    h = hashlib.sha256(sha256_file(path).encode())
    for data in sorted(path.parent.glob(path.name + ".data*")):
        h.update(data.name.encode() + sha256_file(data).encode())
    return h.hexdigest()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
