"""Consistency distillation with folded CFG: boundary condition, the training target against a plain reference
(diffusers' DDIMScheduler + per-sample network calls), folded-guidance plumbing through fastdiff's sampler, the
LCM sampler against the consistency function, resume equality, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastdiff
from fastdiff.distill.consistency import (
    CHECKPOINT,
    TRAJECTORIES,
    ConsistencySpec,
    boundary_coefs,
    consistency_fn,
    consistency_targets,
    grid_timesteps,
    init_consistency_student,
    teacher_trajectories,
    train_consistency,
)
from fastdiff.errors import InvalidInput, ModelConfigError
from fastdiff.models import digits, load, save
from fastdiff.models.folded_guidance import guidance_scale_embedding
from fastdiff.models.train_digits import alphas_cumprod
from tests.cli_helpers import one_line_error

# A batched network call against per-sample calls of the same network (other GEMM blocking), fp32: measured
# max |diff| 2.4e-7 on outputs of size ~1; 10x that as the bound.
BATCH_ATOL = 3e-6
BATCH_RTOL = 1e-5
COND_DIM = 8


def _teacher(seed: int = 0):
    return digits.build_model(seed, digits.TINY_UNET_CONFIG, name="tiny").eval().requires_grad_(False)


def _student(teacher, seed: int = 1):
    """A student whose guidance projection is random (not the zero it starts at), so w matters."""
    s = init_consistency_student(teacher, COND_DIM)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        w = s.unet.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return s.eval().requires_grad_(False)


def _abar():
    return alphas_cumprod(**digits.TRAIN_SCHEDULE)


def test_boundary_condition_student_at_epsilon_is_identity():
    c_skip, c_out = boundary_coefs(torch.tensor([0, 19, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert 0 < c_skip[1] < 1e-4 and c_out[1] > 0.9999  # away from 0 the network decides
    student = _student(_teacher())
    x = torch.randn(4, 1, 16, 16)
    y = torch.tensor([0, 3, 7, 9])
    w = guidance_scale_embedding(torch.rand(4) * 2, COND_DIM)
    out = consistency_fn(student, x, torch.zeros(4, dtype=torch.long), y, w, _abar(), "v_prediction")
    assert torch.equal(out, x)
    later = consistency_fn(student, x, torch.full((4,), 19), y, w, _abar(), "v_prediction")
    assert not torch.allclose(later, x, atol=1e-2)


def test_guidance_embedding_is_diffusers_lcm_embedding():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 0.5, 1.37, 2.0])
    for dim in (8, 32, 33):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), ref, rtol=0, atol=0)


def test_student_starts_as_the_teacher():
    teacher = _teacher()
    student = init_consistency_student(teacher, COND_DIM).eval()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([999, 500, 19]), torch.tensor([1, 2, 10])
    w = guidance_scale_embedding(torch.tensor([0.0, 1.0, 2.0]), COND_DIM)
    with torch.no_grad():
        got = student.unet(x, t, encoder_hidden_states=student.encode_labels(y), timestep_cond=w).sample
        assert torch.equal(got, teacher(x, t, y))
    assert student.scheduler_config["_class_name"] == "LCMScheduler"
    assert student.scheduler_config["prediction_type"] == "v_prediction"


def _reference_targets(teacher, target, x_t, t, y, g, skip):
    """Per sample: two plain teacher calls, CFG, diffusers' DDIMScheduler.step (alpha at -1 = abar[0]), the
    target network at t' with diffusers' guidance embedding, the boundary formula written out."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(1000 // skip)
    abar = ddim.alphas_cumprod
    outs = []
    for i in range(len(t)):
        xi, ti, yi, gi = x_t[i:i + 1], int(t[i]), y[i:i + 1], float(g[i])
        with torch.no_grad():
            m_c = teacher.unet(xi, ti, encoder_hidden_states=teacher.encode_labels(yi)).sample
            m_u = teacher.unet(xi, ti, encoder_hidden_states=teacher.encode_labels(torch.tensor([10]))).sample
            m = m_u + gi * (m_c - m_u)
            x_prev = ddim.step(m, ti, xi, eta=0.0).prev_sample
            tp = max(ti - skip, 0)
            emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([gi - 1]), COND_DIM)
            v = target.unet(x_prev, tp, encoder_hidden_states=target.encode_labels(yi), timestep_cond=emb).sample
        a = float(abar[tp])
        x0 = a**0.5 * x_prev - (1 - a) ** 0.5 * v
        st = 10.0 * tp
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / (st**2 + 0.25) ** 0.5
        outs.append(c_skip * x_prev + c_out * x0)
    return torch.cat(outs)


def test_targets_against_plain_reference():
    teacher = _teacher(0)
    target = _student(_teacher(2), seed=3)  # another network than the teacher, as after training
    gen = torch.Generator().manual_seed(4)
    grid = grid_timesteps(1000, 50)
    t = torch.cat([grid[:1], grid[torch.randint(1, 50, (4,), generator=gen)], grid[-1:]])  # t=19 -> t'=0 included
    x_t = torch.randn(len(t), 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (len(t),), generator=gen)
    g = 1 + 2 * torch.rand(len(t), generator=gen)
    got = consistency_targets(teacher, target, x_t, t, y, g, _abar(), 20, "v_prediction", COND_DIM)
    ref = _reference_targets(teacher, target, x_t, t, y, g, 20)
    torch.testing.assert_close(got, ref, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    # t = 19 steps to t' = 0 where c_skip = 1: the target is the teacher's DDIM step itself, not the network
    assert not torch.allclose(got[0], x_t[0])


def _count_calls(model):
    calls = []
    forward = model.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        calls.append((sample.shape[0], kwargs.get("timestep_cond")))
        return forward(sample, timestep, *args, **kwargs)

    model.unet.forward = spy
    return calls


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_folded_cfg_one_call_per_step_and_lcm_matches_consistency_fn(backend):
    """The sampler gives a folded student one B-sized call per step with timestep_cond = embedding(g - 1); one LCM
    step is f(z, 999, g), two steps re-noise to t = 499 with the generator's noise and apply f again."""
    student = _student(_teacher())
    calls = _count_calls(student)
    z, y, g = torch.randn(3, 1, 16, 16), torch.tensor([4, 5, 6]), 2.25
    sampler = fastdiff.Sampler(student, scheduler="lcm", backend=backend)
    one = sampler.sample(num_inference_steps=1, guidance_scale=g, class_labels=y, latents=z, output_type="latent",
                         progress=False)
    emb = guidance_scale_embedding(torch.full((3,), g - 1), COND_DIM)
    assert [c[0] for c in calls] == [3]
    torch.testing.assert_close(calls[0][1], emb, rtol=0, atol=0)
    abar = _abar()
    with torch.no_grad():
        f = consistency_fn(student, z, torch.full((3,), 999), y, emb, abar, "v_prediction")
    torch.testing.assert_close(one, f, rtol=BATCH_RTOL, atol=BATCH_ATOL)

    calls.clear()
    two = sampler.sample(num_inference_steps=2, guidance_scale=g, class_labels=y, latents=z, output_type="latent",
                         progress=False, generator=torch.Generator().manual_seed(7))
    assert [c[0] for c in calls] == [3, 3]
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    a = abar[499]
    with torch.no_grad():
        ref = consistency_fn(student, a.sqrt() * f + (1 - a).sqrt() * noise, torch.full((3,), 499), y, emb, abar,
                             "v_prediction")
    torch.testing.assert_close(two, ref, rtol=BATCH_RTOL, atol=BATCH_ATOL)
    other = sampler.sample(num_inference_steps=1, guidance_scale=1.0, class_labels=y, latents=z, output_type="latent",
                           progress=False)
    assert not torch.allclose(other, one, atol=1e-3)  # the scale reaches the network


def test_plain_teacher_still_runs_a_cfg_batch():
    teacher = _teacher()
    calls = _count_calls(teacher)
    fastdiff.sample(teacher, num_inference_steps=2, guidance_scale=1.5, class_labels=[1, 2], progress=False)
    assert [c for c, _ in calls] == [4, 4] and all(tc is None for _, tc in calls)


def _data(n: int = 40):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 10


def _spec(**kw) -> ConsistencySpec:
    base = dict(teacher="tiny", steps=4, batch_size=8, warmup=2, checkpoint_every=2, log_every=0, cond_dim=COND_DIM)
    return ConsistencySpec(**{**base, **kw})


def _run(spec, out, **kw):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same arithmetic in every run of this test
    try:
        return train_consistency(spec, out, teacher=_teacher(), data=_data(), progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_resume_equals_uninterrupted_run(tmp_path):
    _run(_spec(), tmp_path / "a")
    _run(_spec(), tmp_path / "b", stop_after=3)  # "crashes" after step 3; the last checkpoint is step 2
    ck = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert ck["step"] == 2 and ck["objective"] == "consistency"
    _run(_spec(), tmp_path / "b")
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    ka = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)
    kb = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    for k in ("student", "target"):
        assert all(torch.equal(ka[k][n], kb[k][n]) for n in ka[k])
    assert ka["step"] == kb["step"] == 4
    _run(_spec(steps=6), tmp_path / "b")  # a finished run is extended with more steps
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 6
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != a

    m = load(tmp_path / "a")
    assert m.limits["max_inference_steps"] == 8 and m.limits["guidance_scale"] == [1.0, 3.0]
    assert m.defaults["scheduler"] == "lcm" and m.unet.config.time_cond_proj_dim == COND_DIM
    assert json.loads((tmp_path / "a" / "config.json").read_text())["metadata"]["objective"] == "consistency"


def test_bad_checkpoints_and_outputs(tmp_path):
    out = tmp_path / "run"
    _run(_spec(steps=2), out)
    with pytest.raises(InvalidInput, match=r"other settings.*'lr': \(0.0002, 0.001\)"):
        _run(_spec(steps=2, lr=1e-3), out)
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    ck["objective"] = "triplet-regression"
    torch.save(ck, out / CHECKPOINT)
    with pytest.raises(InvalidInput, match="checkpoint of the 'triplet-regression' objective"):
        _run(_spec(steps=2), out)
    (out / CHECKPOINT).write_bytes(b"half a checkpoint")
    with pytest.raises(InvalidInput, match="cannot read the checkpoint"):
        _run(_spec(steps=2), out)

    from fastdiff.distill.train import init_student

    onestep = tmp_path / "onestep"
    save(init_student(_teacher()), onestep, defaults={"scheduler": "onestep"}, metadata={"triplets": "x"})
    with pytest.raises(InvalidInput, match="'triplet-regression' objective"):
        _run(_spec(steps=2), onestep)
    assert not (onestep / CHECKPOINT).exists()

    for bad, msg in ((dict(guidance_min=0.5), "guidance_min"), (dict(guidance_min=2.0, guidance_max=1.5),
                                                                "guidance_max"),
                     (dict(grid_steps=7), "must divide"), (dict(batch_size=0), "batch_size")):
        with pytest.raises(InvalidInput, match=msg):
            _run(_spec(**bad), tmp_path / "bad")


def test_sampling_outside_what_the_student_supports(tmp_path):
    _run(_spec(steps=1), tmp_path / "s")
    for steps in (1, 8):
        fastdiff.sample(str(tmp_path / "s"), num_inference_steps=steps, guidance_scale=3.0, class_labels=[1],
                        progress=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInput, match="at most 8 inference steps, got 9"):
        fastdiff.sample(str(tmp_path / "s"), num_inference_steps=9, guidance_scale=1.5, progress=False)
    for g in (0.99, 3.01, 5.0):
        with pytest.raises(InvalidInput, match=r"trained for guidance_scale in \[1, 3\]"):
            fastdiff.sample(str(tmp_path / "s"), num_inference_steps=2, guidance_scale=g, progress=False)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    for limits in ({"max_inference_steps": 0}, {"guidance_scale": [3, 1]}, {"guidance_scale": "1-3"}):
        (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg, "limits": limits}))
        with pytest.raises(ModelConfigError, match="limits"):
            load(tmp_path / "s")


def test_cli_consistency_errors(tmp_path, capsys):
    err = one_line_error(["distill", "consistency", "--out", str(tmp_path / "x"), "--guidance-min", "0.5"], capsys)
    assert "--guidance-min" in err
    err = one_line_error(["distill", "consistency", "--teacher", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "x"), "--steps", "1"], capsys)
    assert "nowhere" in err



@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    _run(_spec(steps=2), out)
    return out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trained_student_samples_by_path_seeded(tiny_student, steps):
    kw = dict(num_inference_steps=steps, guidance_scale=1.5, class_labels=[3, 8], output_type="latent",
              progress=False, latents=torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)))
    a = fastdiff.sample(model=str(tiny_student), generator=torch.Generator().manual_seed(0), **kw)
    b = fastdiff.sample(model=str(tiny_student), generator=torch.Generator().manual_seed(0), **kw)
    c = fastdiff.sample(model=str(tiny_student), generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)  # seeded, the re-noising included
    assert (steps == 1) == torch.equal(a, c)  # one step draws no noise; more steps re-noise from the generator


def test_trained_student_cli(tiny_student, tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "grid.png"
    argv = ["sample", "--model", str(tiny_student), "--labels", "0-2", "--no-progress", "--out", str(out)]
    assert main([*argv, "--steps", "4"]) == 0
    first = out.read_bytes()
    assert "lcm 4 steps, CFG 1.5" in capsys.readouterr().out
    assert main([*argv, "--steps", "4"]) == 0 and out.read_bytes() == first  # the same seed, the same PNG
    err = one_line_error([*argv, "--steps", "9"], capsys)
    assert "at most 8" in err
    err = one_line_error([*argv, "--guidance", "4"], capsys)
    assert "[1, 3]" in err


# ----- target="trajectory": regression onto teacher trajectories ----------------------------------------------
def test_teacher_trajectories_are_diffusers_ddim():
    """Every recorded point and the end, against diffusers' DDIMScheduler (trailing spacing, set_alpha_to_one: the
    grid (n + 1) k - 1 and a last step to x0) run per sample with two plain teacher calls and CFG."""
    from diffusers import DDIMScheduler

    teacher = _teacher()
    gen = torch.Generator().manual_seed(6)
    z, y = torch.randn(3, 1, 16, 16, generator=gen), torch.tensor([0, 4, 9])
    g = torch.tensor([1.0, 1.7, 3.0])
    grid = grid_timesteps(1000, 5)
    points, ends = teacher_trajectories(teacher, z, y, g, grid, _abar(), "v_prediction", batch_size=2)
    assert points.shape == (3, 5, 1, 16, 16) and torch.equal(points[:, -1], z)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ddim.set_timesteps(5)
    assert ddim.timesteps.tolist() == grid.flip(0).tolist()
    for i in range(3):
        x = z[i:i + 1]
        for k, t in zip(range(4, -1, -1), ddim.timesteps, strict=True):
            torch.testing.assert_close(points[i, k], x[0], rtol=BATCH_RTOL, atol=BATCH_ATOL)
            with torch.no_grad():
                m_c = teacher.unet(x, t, encoder_hidden_states=teacher.encode_labels(y[i:i + 1])).sample
                m_u = teacher.unet(x, t, encoder_hidden_states=teacher.encode_labels(torch.tensor([10]))).sample
            x = ddim.step(m_u + float(g[i]) * (m_c - m_u), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ends[i], x[0], rtol=BATCH_RTOL, atol=BATCH_ATOL)


def _traj_spec(**kw) -> ConsistencySpec:
    return _spec(**{**dict(target="trajectory", num_trajectories=12, grid_steps=5, target_decay=0.9), **kw})


def test_trajectory_target_trains_resumes_and_checks_its_cache(tmp_path, monkeypatch):
    import fastdiff.distill.consistency as C

    solved = []
    real = C.teacher_trajectories
    monkeypatch.setattr(C, "teacher_trajectories", lambda *a, **k: solved.append(1) or real(*a, **k))
    _run(_traj_spec(), tmp_path / "a")
    assert len(solved) == 1 and (tmp_path / "a" / TRAJECTORIES).is_file()
    _run(_traj_spec(), tmp_path / "b", stop_after=3)  # "crashes"; the last checkpoint is step 2
    _run(_traj_spec(), tmp_path / "b")  # resumes with the trajectories on disk: nothing solved again
    assert len(solved) == 2
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "config.json").read_text())["metadata"]
    assert meta["target"] == "trajectory" and meta["objective"] == "consistency"

    # a damaged trajectories file is solved again (same numbers), with a warning, and the run ends the same
    _run(_traj_spec(), tmp_path / "c", stop_after=3)
    path = tmp_path / "c" / TRAJECTORIES
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="sha256 is not the one the checkpoint recorded"):
        _run(_traj_spec(), tmp_path / "c")
    assert len(solved) == 4
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == a

    # the student learns: its loss on the trajectories falls (the objective is not a no-op)
    losses = []
    for steps in (1, 30):
        out = tmp_path / f"loss{steps}"
        _run(_traj_spec(steps=steps, lr=1e-3, target_decay=0.0), out)
        losses.append(json.loads((out / "config.json").read_text())["metadata"]["loss_ema"])
    assert losses[1] < losses[0]

    with pytest.raises(InvalidInput, match="target must be one of"):
        _run(_spec(target="nope"), tmp_path / "bad")


def test_embedded_digits_consistency_loads_samples_and_exports(tmp_path):
    """The shipped student (trajectory target): loads by name with its limits, samples 1 / 2 / 4 steps with one
    network call each, refuses 9 steps, and exports to ONNX (guidance as an input) with parity."""
    from fastdiff.export import export_onnx

    m = load("digits-consistency")
    assert m.name == "digits-consistency" and m.unet.config.time_cond_proj_dim == 32
    assert m.defaults["scheduler"] == "lcm" and m.limits["max_inference_steps"] == 8
    cfg = json.loads((Path(digits.__file__).parent / "weights" / "digits-consistency" / "config.json").read_text())
    assert cfg["metadata"]["target"] == "trajectory" and cfg["metadata"]["steps_done"] == cfg["metadata"]["steps"]
    calls = _count_calls(m)
    for steps in (1, 2, 4):
        calls.clear()
        img = fastdiff.sample(model=m, num_inference_steps=steps, class_labels=list(range(10)), output_type="latent",
                              generator=torch.Generator().manual_seed(0), progress=False)
        assert img.shape == (10, 1, 16, 16) and torch.isfinite(img).all()
        assert [c[0] for c in calls] == [10] * steps  # folded guidance: one B-sized call per step
    with pytest.raises(InvalidInput, match="at most 8"):
        fastdiff.sample(model="digits-consistency", num_inference_steps=9, class_labels=[1], progress=False)
    report = export_onnx(load("digits-consistency"), tmp_path, progress=False)
    assert report.parity and all(p.ok and p.max_rel < 1e-4 for p in report.parity)
