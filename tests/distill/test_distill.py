"""Distillation: deterministic per-sample seeds, distributed triplet generation (torchrun, gloo, 2 processes on
CPU) with crash + resume, and the one-step student (init, training, save / load / sample)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff.distill.train import init_student, last_alpha_bar, train_student
from fastdiff.distill.triplets import MERGED, TripletSpec, load_triplets, run_distributed, shard_path
from fastdiff.errors import InvalidInput
from fastdiff.models import load
from fastdiff.models.generate import make_noise, make_sampler, sample_seed

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _gen_cmd(teacher: Path, out: Path, n: int, shard: int, steps: int, nproc: int | None, *extra: str) -> list[str]:
    args = ["-m", "fastdiff.distill", "generate", "--teacher", str(teacher), "--out", str(out), "-n", str(n),
            "--shard-size", str(shard), "--steps", str(steps), "--no-progress", "--threads", "1", *extra]
    if nproc is None:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def _reference(tiny_dir: Path, out: Path, spec: TripletSpec) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run one thread each; keep the arithmetic identical
    try:
        run_distributed(spec, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return load_triplets(out)


def test_sample_seeds_are_per_sample():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(s, i) for s in range(3) for i in range(100)}) == 300
    full = make_noise(7, list(range(10)), (1, 4, 4))
    assert torch.equal(make_noise(7, [3, 8], (1, 4, 4)), full[[3, 8]])
    assert not torch.equal(make_noise(8, [3], (1, 4, 4)), full[[3]])


def test_torchrun_two_processes_crash_and_resume(tiny_dir, tmp_path):
    """2 gloo ranks crash after one shard each; the restart skips their shards and the merged result is identical
    to a single-process run's."""
    n, shard, steps = 36, 6, 4  # 6 shards
    spec = TripletSpec(teacher=str(tiny_dir), num_samples=n, shard_size=shard, num_inference_steps=steps)
    ref = _reference(tiny_dir, tmp_path / "ref", spec)
    out = tmp_path / "dist"
    r = subprocess.run(_gen_cmd(tiny_dir, out, n, shard, steps, 2, "--fail-after", "1"), env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    done = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"], (done, r.stderr[-2000:])
    assert not (out / MERGED).exists()
    (out / ".shard-00002.safetensors.crashed.tmp").write_bytes(b"half a shard")  # a write cut off by a kill
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    r = subprocess.run(_gen_cmd(tiny_dir, out, n, shard, steps, 2), env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors") if p.name in mtimes} == mtimes
    got = load_triplets(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert got["label"].tolist() == [i % 10 for i in range(n)]


def test_sigkill_then_resume(tiny_dir, tmp_path):
    """A real SIGKILL in the middle of a single-process job; the restart completes it with identical triplets."""
    n, shard, steps = 40, 2, 10
    spec = TripletSpec(teacher=str(tiny_dir), num_samples=n, shard_size=shard, num_inference_steps=steps)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_gen_cmd(tiny_dir, out, n, shard, steps, None), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.safetensors"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    had = len(list(out.glob("shard-*.safetensors")))
    assert had >= 3, proc.stderr.read()[-2000:] if proc.stderr else ""
    if had == spec.num_shards:
        pytest.skip("the job finished before it could be killed (machine too fast for this test)")
    assert not (out / MERGED).exists()
    r = subprocess.run(_gen_cmd(tiny_dir, out, n, shard, steps, None), env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _reference(tiny_dir, tmp_path / "ref", spec)
    got = load_triplets(out)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_restart_with_other_settings_is_refused(tiny_dir, tmp_path):
    spec = TripletSpec(teacher=str(tiny_dir), num_samples=4, shard_size=2, num_inference_steps=2)
    run_distributed(spec, tmp_path, progress=False)
    other = TripletSpec(teacher=str(tiny_dir), num_samples=4, shard_size=2, num_inference_steps=3)
    with pytest.raises(InvalidInput, match="different settings"):
        run_distributed(other, tmp_path, progress=False)
    os.remove(shard_path(tmp_path, 1))
    run_distributed(spec, tmp_path, progress=False)  # resumes the missing shard
    assert len(load_triplets(tmp_path)["label"]) == 4
    with pytest.raises(InvalidInput, match="no triplets"):
        load_triplets(tmp_path / "nowhere")


def test_student_init_is_teachers_one_step_estimate(tiny_dir):
    teacher = load(tiny_dir)
    student = init_student(teacher)
    a = last_alpha_bar(teacher.scheduler_config)
    z = torch.randn(3, 1, 16, 16)
    y = torch.tensor([1, 2, 3])
    t = torch.full((3,), 999)
    with torch.no_grad():
        v = teacher(z, t, y)
        x0_teacher = a ** 0.5 * z - (1 - a) ** 0.5 * v
        torch.testing.assert_close(student(z, t, y), x0_teacher, atol=1e-3, rtol=1e-4)
    assert student.scheduler_config["prediction_type"] == "sample"


def test_student_trains_saves_and_samples_in_one_step(tiny_dir, tmp_path):
    spec = TripletSpec(teacher=str(tiny_dir), num_samples=16, shard_size=8, num_inference_steps=3)
    run_distributed(spec, tmp_path / "trip", progress=False)
    data = load_triplets(tmp_path / "trip")
    train_student(str(tiny_dir), tmp_path / "trip", tmp_path / "student", steps=30, batch_size=8, lr=1e-3,
                  progress=False)
    student = load(tmp_path / "student")
    assert student.defaults == {"scheduler": "onestep", "num_inference_steps": 1, "guidance_scale": 1.0}
    sampler = make_sampler(student)
    assert sampler.scheduler.name == "onestep"
    z, y, x0 = data["noise"][:8], data["label"][:8], data["image"][:8]
    out = sampler.sample(num_inference_steps=1, guidance_scale=1.0, class_labels=y, latents=z,
                         output_type="latent", progress=False)
    with torch.no_grad():
        direct = student(z, torch.full((8,), 999), y)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    init = init_student(load(tiny_dir))
    with torch.no_grad():
        before = (init(z, torch.full((8,), 999), y) - x0).pow(2).mean()
    assert (out - x0).pow(2).mean() < before  # training moved it towards the teacher's images


def test_checkpoints_carry_the_full_settings(tiny_dir, tmp_path, monkeypatch):
    import fastdiff.models

    spec = TripletSpec(teacher=str(tiny_dir), num_samples=8, shard_size=8, num_inference_steps=2)
    run_distributed(spec, tmp_path / "trip", progress=False)
    saved = []
    real_save = fastdiff.models.save
    monkeypatch.setattr(fastdiff.models, "save", lambda *a, **k: saved.append(k["metadata"]) or real_save(*a, **k))
    train_student(str(tiny_dir), tmp_path / "trip", tmp_path / "student", steps=5, batch_size=4, save_every=2,
                  seed=3, progress=False, metadata={"triplets": "trip"})
    assert [m["steps_done"] for m in saved] == [2, 4, 5]
    for m in saved:
        assert m["num_triplets"] == 8 and m["steps"] == 5 and m["seed"] == 3 and m["triplets"] == "trip"
    assert json.loads((tmp_path / "student" / "config.json").read_text())["metadata"]["steps_done"] == 5
