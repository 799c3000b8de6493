"""File helpers of the export: a staging folder, hashing, cache folders (atomic writes: fastdiff._atomic)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fastdiff._atomic import sha256_file


def cache_root() -> Path:
    """``$FASTDIFF_CACHE_DIR`` or ``~/.cache/fastdiff``: where on-the-fly exports and engines are kept."""
    env = os.environ.get("FASTDIFF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastdiff"


#: a staging folder nobody can vouch for (another host's, or one named before owners were recorded) is stale
#: after this long; one of this host's is stale as soon as the process that made it is gone
STALE_AFTER_S = 3600
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
_OWNED = re.compile(r"^\.export-(\d+)@(.+)\.[^.]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def _is_stale(folder: Path, now: float) -> bool:
    m = _OWNED.match(folder.name)
    if m and m.group(2) == _HOST:
        return not _pid_alive(int(m.group(1)))
    try:
        return now - folder.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False  # removed meanwhile


def clean_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the ``.export-*`` staging folders that killed exports left in ``out_dir`` (see
    :data:`STALE_AFTER_S`); returns them. Live exports' folders (their process still runs) are kept."""
    now = time.time()
    removed = []
    for d in sorted(out_dir.glob(".export-*")):
        if d.is_dir() and _is_stale(d, now):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` (same filesystem, so moving out of it is an atomic rename); removed
    on exit whatever happens. Files are published from it with :func:`publish`.

    Its name records its owner (``.export-<pid>@<host>.<random>``) so a later export can tell a killed one's
    leftovers from a live one's and removes them first (:func:`clean_stale_staging`). Folders this creates for
    ``out_dir`` are removed again when nothing was published into them, so a failed export leaves no empty
    ``--out`` behind."""
    out_dir = Path(out_dir)
    created = []
    p = out_dir
    while not p.exists():
        created.append(p)  # deepest first, the order to remove them in
        p = p.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".export-{os.getpid()}@{_HOST}."))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            with contextlib.suppress(OSError):  # not empty: something was published, keep it
                d.rmdir()


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
