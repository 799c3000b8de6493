"""Export staging: a killed export's ``.export-*`` folder is cleaned by the next export (dead owner, or old and
unattributable), a live one's is kept, and a failed export leaves no empty ``--out`` behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastdiff.export import _files
from fastdiff.export._files import STALE_AFTER_S, publish, staging_dir


def test_stale_staging_folders_are_cleaned_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that is gone
    gone = tmp_path / f".export-{pid}@{_files._HOST}.abc"
    live = tmp_path / f".export-{os.getpid()}@{_files._HOST}.def"
    old = tmp_path / ".export-x1y2z3"  # the former naming: no owner, judged by age
    young = tmp_path / ".export-q9w8e7"
    for d in (gone, live, old, young):
        (d / "model.onnx").parent.mkdir()
        (d / "model.onnx").write_bytes(b"half")
    t = time.time() - STALE_AFTER_S - 60
    os.utime(old, (t, t))
    with staging_dir(tmp_path) as stage:
        assert stage.name.startswith(f".export-{os.getpid()}@")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, young.name])


def test_a_failed_export_leaves_no_empty_out(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), staging_dir(out) as stage:
        (stage / "model.onnx").write_bytes(b"x")
        raise RuntimeError("trace failed")
    assert list(tmp_path.iterdir()) == []
    with staging_dir(out) as stage:
        (stage / "model.onnx").write_bytes(b"x")
        publish([stage / "model.onnx"], out)
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
