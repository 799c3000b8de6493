"""Triplet generation refuses nothing it should not and trusts nothing it should not: a mistyped teacher leaves no
manifest (the corrected command runs), shards are recorded (size, sha256) and a truncated or modified shard is
regenerated on resume with a warning, and a real SIGKILL during a shard's write leaves only whole shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.distill.triplets import (
    MANIFEST,
    ShardRegenerated,
    TripletSpec,
    load_triplets,
    run_distributed,
    shard_path,
)
from fastdiff.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]


def _spec(tiny_dir: Path, **kw) -> TripletSpec:
    return TripletSpec(**{"teacher": str(tiny_dir), "num_samples": 6, "shard_size": 2, "num_inference_steps": 2,
                          **kw})


@pytest.mark.parametrize("bad, fragment", [({"teacher": "no-such-teacher"}, "no-such-teacher"),
                                           ({"shard_size": 0}, "shard_size must be an integer >= 1"),
                                           ({"num_samples": -1}, "num_samples must be an integer >= 1")],
                         ids=["mistyped teacher", "shard size 0", "negative samples"])
def test_bad_settings_write_nothing_and_the_corrected_command_runs(bad, fragment, tiny_dir, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(InvalidInput, match=fragment):
        run_distributed(_spec(tiny_dir, **bad), out, progress=False)
    assert not out.exists()  # no manifest, not even the folder
    assert run_distributed(_spec(tiny_dir), out, progress=False) == out / "triplets.safetensors"


def _flip_a_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize("damage, recorded, fragment", [
    (_truncate, True, "bytes, .* recorded"),
    (_flip_a_byte, True, "sha256 is not the recorded one"),
    (_truncate, False, "unreadable"),
], ids=["truncated", "modified", "truncated, never recorded"])
def test_a_bad_shard_is_regenerated_on_resume(damage, recorded, fragment, tiny_dir, tmp_path):
    spec = _spec(tiny_dir)
    run_distributed(spec, tmp_path, progress=False)
    ref = load_triplets(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(manifest["shards"]) == ["00000", "00001", "00002"]
    assert manifest["shards"]["00001"]["size"] == shard_path(tmp_path, 1).stat().st_size
    if not recorded:  # as a job killed after writing the shard and before recording it leaves it
        del manifest["shards"]["00001"]
        (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    damage(shard_path(tmp_path, 1))
    untouched = shard_path(tmp_path, 0).stat().st_mtime_ns
    with pytest.warns(ShardRegenerated, match=f"shard-00001.safetensors is bad \\(.*{fragment}.*regenerating"):
        run_distributed(spec, tmp_path, progress=False)
    assert shard_path(tmp_path, 0).stat().st_mtime_ns == untouched
    got = load_triplets(tmp_path)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_sigkill_during_a_shard_write_then_resume(tiny_dir, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "tests.slow_writes", "60", "--", "distill", "generate", "--teacher", str(tiny_dir),
           "--out", str(out), "-n", "6", "--shard-size", "2", "--steps", "2", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # the first slowed write is the (empty-record) manifest, the second the first shard: kill in that one
        for _ in range(2):
            line = proc.stdout.readline()
            assert line.strip() == "HALF", (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not list(out.glob("shard-*.safetensors"))  # the half-written shard never got its name
    assert list(out.glob(".shard-00000.safetensors.*.tmp"))
    run_distributed(_spec(tiny_dir), out, progress=False)
    assert load_triplets(out)["index"].tolist() == list(range(6))
