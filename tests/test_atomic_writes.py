"""Output files: every write is atomic (an interrupted write, a real SIGKILL mid-save, two racing writers leave
the old file or one whole new one, never a mix) and every output path is checked before the expensive work."""

from __future__ import annotations

import importlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastdiff._atomic as atomic
from fastdiff._atomic import atomic_write_bytes, atomic_write_text, check_writable
from fastdiff.cli import main
from fastdiff.errors import InvalidInput
from fastdiff.images import save_image
from fastdiff.quality.evaluate import EvalResult
from fastdiff.quality.sweep import plot, write_table

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ["sample", "--steps", "1", "--labels", "0", "--no-progress"]  # the cheapest real sample


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no ``except Exception`` in the writer can swallow it."""


def _result() -> EvalResult:
    return EvalResult(model="m", scheduler="s", steps=2, guidance=1.0, n=4, accuracy=0.5, fd=3.0, sample_s=0.1,
                      ms_per_image=25.0, device="cpu")


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


WRITERS = {
    "atomic_write_bytes": lambda p: atomic_write_bytes(p, b"new" * 1000),
    "atomic_write_text": lambda p: atomic_write_text(p, "new"),
    "save_image (sample grid)": lambda p: save_image(Image.new("L", (8, 8), 7), p),
    "sweep plot": lambda p: plot([_result()], p),
    "sweep table": lambda p: write_table([_result()], p),
}


@pytest.mark.parametrize("writer", list(WRITERS), ids=str)
def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(writer, tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(_png(200))
    if writer == "sweep table":
        target.with_suffix(".json").write_text("[]\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed(fd):
        raise Killed("killed between the write and the rename")

    monkeypatch.setattr(atomic.os, "fsync", killed)
    with pytest.raises(Killed):
        WRITERS[writer](target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp file
    monkeypatch.undo()
    WRITERS[writer](target)  # and the same write, uninterrupted, replaces it
    assert target.read_bytes() != before["out.png"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _file(tmp_path: Path, name: str = "f.txt") -> Path:
    (tmp_path / name).write_text("x")
    return tmp_path / name


def _folder(tmp_path: Path, name: str = "d.png") -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


HOSTILE_PATHS = [  # (id, path maker, kind, keyword arguments, message fragment)
    ("file: folder missing", lambda t: t / "missing" / "x.png", "file", {}, "/missing' does not exist"),
    ("file: is a folder", _folder, "file", {}, "is a folder; give a file path"),
    ("file: parent is a file", lambda t: _file(t) / "x.png", "file", {}, "is a file, not a folder"),
    ("file: empty", lambda t: "", "file", {}, "is empty"),
    ("dir: is a file", _file, "dir", {}, "is a file; give a folder path"),
    ("dir: ancestor is a file", lambda t: _file(t) / "a" / "b", "dir", {}, "is a file, not a folder"),
    ("dir: must exist", lambda t: t / "missing", "dir", {"must_exist": True}, "is not an existing folder"),
]


@pytest.mark.parametrize("make, kind, kw, fragment", [c[1:] for c in HOSTILE_PATHS], ids=[c[0] for c in HOSTILE_PATHS])
def test_check_writable_refuses(make, kind, kw, fragment, tmp_path):
    with pytest.raises(InvalidInput, match=fragment):
        check_writable(make(tmp_path), kind, what="--out", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["f.txt"], ["d.png"])  # nothing created


def test_check_writable_refuses_an_unwritable_folder(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)  # root ignores chmod; a denied create is the same
    for path, kind in ((tmp_path / "x.png", "file"), (tmp_path / "new" / "dir", "dir")):
        with pytest.raises(InvalidInput, match="cannot write into the folder .* \\(Permission denied\\)"):
            check_writable(path, kind)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a folder no file can be created in)")
def test_check_writable_refuses_a_real_unwritable_folder():
    with pytest.raises(InvalidInput, match="cannot write into the folder"):
        check_writable("/proc/self/out.png", "file")


def test_check_writable_refuses_devices_and_pipes(tmp_path):
    """An atomic write renames over the target: /dev/null or a FIFO given as an output would be replaced."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/null")):
        if special.exists():
            with pytest.raises(InvalidInput, match="not a regular file"):
                check_writable(special, "file", what="--json")
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_check_writable_accepts_and_creates_nothing(tmp_path):
    assert check_writable(tmp_path / "x.png") == tmp_path / "x.png"
    assert check_writable(tmp_path / "new" / "deeper", "dir") == tmp_path / "new" / "deeper"
    assert check_writable(tmp_path, "dir", must_exist=True) == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe file is gone and no folder was made


CLI_OUTPUTS = [  # (argv with {t} for the temp folder, message fragment); each must fail before the expensive work
    (["sample", "--out", "{t}/missing/grid.png"], "--out: the folder .* does not exist"),
    (["sample", "--out", "{t}/d.png"], "--out .* is a folder"),
    (["sample", "--out", "{t}/f.txt/grid.png"], "is a file, not a folder"),
    (["eval", "--json", "{t}/missing/r.json"], "--json: the folder .* does not exist"),
    (["eval", "--json", "{t}/d.png"], "--json .* is a folder"),
    (["eval", "--sweep", "--out", "{t}/missing"], "--out .* is not an existing folder"),
    (["eval", "--sweep", "--out", "{t}/f.txt"], "--out .* is a file; give a folder path"),
    (["export", "digits", "--out", "{t}/f.txt"], "the output folder .* is a file"),
    (["export", "digits", "--out", "{t}/f.txt/sub"], "is a file, not a folder"),
    (["distill", "generate", "--out", "{t}/f.txt", "-n", "4"], "--out .* is a file"),
    (["distill", "train", "--triplets", "{t}", "--out", "{t}/f.txt"], "--out .* is a file"),
]


@pytest.mark.parametrize("argv, fragment", CLI_OUTPUTS, ids=[" ".join(a).replace("{t}/", "") for a, _ in CLI_OUTPUTS])
def test_cli_checks_outputs_before_the_expensive_work(argv, fragment, tmp_path, monkeypatch, capsys):
    def expensive(*a, **k):
        raise AssertionError("the expensive work started before the output path was checked")

    for module, name in (("fastdiff.models", "load"), ("fastdiff.quality.evaluate", "evaluate"),
                         ("fastdiff.quality.sweep", "sweep"), ("fastdiff.export.api", "resolve_model"),
                         ("fastdiff.distill.train", "train_student")):
        # by module object: fastdiff.quality's functions shadow its submodules' names as attributes
        monkeypatch.setattr(importlib.import_module(module), name, expensive)
    _file(tmp_path)
    _folder(tmp_path)
    status = main([a.replace("{t}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(fragment, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "f.txt"]  # nothing written or created


def _child(pause: float, *argv: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "tests.slow_writes", str(pause), "--", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_half(proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "HALF":
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the child never reached the middle of a write: {proc.stderr.read()[-2000:]}")


def test_sigkill_during_the_png_save_keeps_the_old_png(tmp_path):
    out = tmp_path / "grid.png"
    old = _png(123)
    out.write_bytes(old)
    proc = _child(60, *SAMPLE, "--out", str(out), start_new_session=True)
    try:
        _wait_for_half(proc)  # half of the new PNG is on the disk, in the temp file
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == old
    Image.open(out).verify()
    # a SIGKILL cannot clean up: its half-written temp file stays, hidden, beside the untouched PNG
    assert [p.name for p in tmp_path.iterdir() if p.name != "grid.png"] == [
        p.name for p in tmp_path.glob(".grid.png.*.tmp")]


def test_two_writers_to_one_out_leave_one_whole_png(tmp_path):
    out = tmp_path / "grid.png"
    procs = [_child(1.5, *SAMPLE, "--seed", str(seed), "--out", str(out)) for seed in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children ran one thread each; keep the arithmetic identical
    try:
        refs = []
        for seed in (0, 1):
            assert main([*SAMPLE, "--seed", str(seed), "--out", str(tmp_path / f"ref{seed}.png")]) == 0
            refs.append((tmp_path / f"ref{seed}.png").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert refs[0] != refs[1]
    assert out.read_bytes() in refs  # one writer's PNG whole, not one PNG with the other's trailing bytes
    Image.open(out).verify()
    assert not list(tmp_path.glob(".*"))
