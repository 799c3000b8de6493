"""Atomic file writes, shared by everything fastdiff saves (PNGs, plots, JSON and Markdown results, weights,
configs, triplet shards, ONNX reports, TensorRT engines and caches): a reader sees the old file or the new one,
never a half-written one, and of two writers racing for one path one wins whole.

Also :func:`check_writable`, the one check of an output path that every command runs *before* its expensive work,
so a bad ``--out`` fails in a second instead of after minutes of sampling, evaluation or tracing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from fastdiff.errors import InvalidInput, ModelConfigError, ModelNotFound


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder (fsync'd) and ``os.replace``; the
    folder is created if needed and the temporary file removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data and shared caches must be world-readable
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut right after ``os.replace`` could otherwise bring the old
    directory entry back); not possible on every platform / filesystem, hence best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-sized blocks (files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_format_json(path: str | os.PathLike, fmt: str, what: str, hint: str) -> dict:
    """The JSON object in ``path`` whose ``"format"`` is ``fmt`` (a shipped artifact's config or manifest):
    :class:`ModelNotFound` when it cannot be read, :class:`ModelConfigError` when it is not one; ``what`` names it
    in the messages ("shapes judge config"), ``hint`` says how to get a good one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot read the {what} {path}: {e}; {hint}") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ModelConfigError(f"{path} is not a {what} (format {fmt!r}); {hint}")
    return data


def check_recorded_sha256(path: str | os.PathLike, recorded, what: str, hint: str) -> None:
    """:class:`ModelNotFound` unless the file ``path`` exists and its sha256 is ``recorded`` (what its config
    says); ``what`` names it in the messages ("shapes judge weights")."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"the {what} {path} are missing; {hint}")
    have = sha256_file(path)
    if have != recorded:
        raise ModelNotFound(f"the {what} {path} have sha256 {have[:16]}..., not the recorded "
                            f"{str(recorded)[:16]}...: damaged or replaced; {hint}")


def _probe(folder: Path) -> str | None:
    """Why nothing can be created in the existing folder ``folder`` (None: it can). A real temporary file rather
    than ``os.access``, which says yes to root on a read-only filesystem and ignores ACLs."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastdiff-probe-")
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def check_writable(path: str | os.PathLike, kind: str = "file", *, what: str = "--out",
                   must_exist: bool = False) -> Path:
    """Check, before any expensive work, that ``path`` can be written; return it as a :class:`Path`.

    ``kind="file"``: a file is written at ``path``; its folder must already exist (commands do not invent
    folders from a mistyped file name) and ``path`` must not be a folder. ``kind="dir"``: files are written into
    the folder ``path``; it is created when missing (at publication time, by the caller) unless ``must_exist``, so
    here its nearest existing ancestor must be a writable folder. Raises :class:`~fastdiff.errors.InvalidInput`
    naming ``what`` (the option) and what is wrong.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path).expanduser()
    if str(path) == "":
        raise InvalidInput(f"{what} is empty; give a path")
    if kind == "file":
        if p.is_dir():
            raise InvalidInput(f"{what} {str(p)!r} is a folder; give a file path (inside it, for instance)")
        if p.exists() and not p.is_file():
            # A device (/dev/null), FIFO or socket: the atomic write renames a new file over the path, which would
            # replace the device itself (as root, /dev/null would become a regular file).
            raise InvalidInput(f"{what} {str(p)!r} is not a regular file (a device, pipe or socket), and writing "
                               "the result would replace it; give a file path")
        folder = p.parent
        if not folder.exists():
            raise InvalidInput(f"{what}: the folder {str(folder)!r} does not exist; create it or pick another path")
        if not folder.is_dir():
            raise InvalidInput(f"{what}: {str(folder)!r} is a file, not a folder, so {str(p)!r} cannot be written")
    else:
        if p.exists() and not p.is_dir():
            raise InvalidInput(f"{what} {str(p)!r} is a file; give a folder path")
        if must_exist and not p.is_dir():
            raise InvalidInput(f"{what} {str(p)!r} is not an existing folder; create it or pick another path")
        folder = p
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise InvalidInput(f"{what}: {str(folder)!r} is a file, not a folder, so {str(p)!r} cannot be created")
    reason = _probe(folder)
    if reason is not None:
        raise InvalidInput(f"{what}: cannot write into the folder {str(folder)!r} ({reason}); pick another path")
    return p
