"""The consistency student of the ``shapes`` pipeline (``python -m fastdiff train shapes-consistency``): teacher
trajectories against diffusers' own pipeline, the trajectory target, training and its bit-for-bit resume, the
trajectory cache, other objectives' outputs and checkpoints refused, sampling with one UNet call per step (guidance
folded in) and the student's limits.

Everything runs on a tiny randomly initialised teacher (one cross-attention block, the shipped VAE and tokenizer);
never on the shipped weights, except the last test, which reads the shipped student when it is there."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fastdiff
from fastdiff.distill import consistency as C
from fastdiff.distill import text_consistency as TC
from fastdiff.distill.text_triplets import caption_of
from fastdiff.errors import InvalidInput
from fastdiff.models import load_pipeline
from fastdiff.models.generate import make_noise, stream_seed
from fastdiff.models.shapes import pipeline as P
from tests.export.tiny_models import tiny_shapes_pipeline
from tests.tolerances import ONNX_PIPELINE_IMG_ATOL

TINY_UNET = {**P.UNET_CONFIG, "block_out_channels": [8], "norm_num_groups": 4, "attention_head_dim": 4,
             "cross_attention_dim": 16, "down_block_types": ["CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D"]}
#: float32 UNet calls of the same inputs in another batch composition (the solver batches CFG and trajectories,
#: diffusers' pipeline runs one sample)
BATCH_ATOL = 1e-5
PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a big green triangle"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_shapes_pipeline(tmp_path_factory.mktemp("teacher"), TINY_UNET)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_pipeline(teacher_dir)


def spec(**kw) -> TC.ShapesConsistencySpec:
    return TC.ShapesConsistencySpec(**{"teacher": "tiny", "num_trajectories": 6, "grid_steps": 5, "steps": 4,
                                       "batch_size": 4, "warmup": 2, "checkpoint_every": 2, "log_every": 0, **kw})


@pytest.fixture(scope="module")
def student_dir(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "s"
    TC.train(spec(), out, pipe=teacher, progress=False)
    return out


@pytest.fixture(scope="module")
def guided_student_dir(student_dir, tmp_path_factory):
    """The tiny student with a random guidance projection: four training steps move it from zero only by ~1e-4,
    too little for a test to tell a guidance input that is fed from one that is ignored."""
    pipe = load_pipeline(student_dir)
    with torch.no_grad():
        pipe.unet.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    meta = dict(P.metadata(student_dir))
    defaults = meta.pop("defaults")
    out = tmp_path_factory.mktemp("guided") / "s"
    sched = json.loads((student_dir / "scheduler" / "scheduler_config.json").read_text())
    return P.save_components(pipe.unet, pipe.text_encoder, out, meta, scheduler_config=sched, defaults=defaults)


def test_trajectories_are_diffusers_pipeline_ddim_with_cfg(teacher):
    """Every recorded point and the end, against diffusers' StableDiffusionPipeline itself (its own loop, CFG and
    prompt encoding) with a DDIMScheduler of trailing spacing and set_alpha_to_one, one sample and scale at a time."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    s = spec()
    data = TC.make_trajectories(s, teacher)
    n = s.num_trajectories
    assert data["points"].shape == (n, 5, 4, 16, 16) and data["ends"].shape == (n, 4, 16, 16)
    noise = make_noise(stream_seed(s.seed, "trajectories"), range(n), (4, 16, 16))
    assert torch.equal(data["points"][:, -1], noise)
    g = data["guidance"]
    assert g.min() >= s.guidance_min and g.max() <= s.guidance_max and len(set(g.tolist())) == n
    ddim = DDIMScheduler(**{k: v for k, v in dict(teacher.scheduler.config).items()
                            if k in ("num_train_timesteps", "beta_schedule", "prediction_type")},
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref = StableDiffusionPipeline(**{**teacher.components, "scheduler": ddim})
    ref.set_progress_bar_config(disable=True)
    for i in (0, 3, 5):
        seen: list[torch.Tensor] = []

        def record(pipe, step, t, kw, seen=seen):
            seen.append(kw["latents"].clone())
            return kw

        end = ref(caption_of(0, i), latents=noise[i:i + 1], num_inference_steps=5, guidance_scale=float(g[i]),
                  output_type="latent", callback_on_step_end=record).images
        for k in range(4):  # after step j the sample is at grid point 3 - j
            torch.testing.assert_close(data["points"][i, 3 - k], seen[k][0], atol=BATCH_ATOL, rtol=0)
        torch.testing.assert_close(data["ends"][i], end[0], atol=BATCH_ATOL, rtol=0)
    assert (data["ends"] - noise).abs().max() > 100 * BATCH_ATOL  # the solve moved the samples


def test_the_untrained_student_is_the_teachers_conditional_model(teacher):
    unet, text = TC.init_student(teacher, 8)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 499, 99])
    from fastdiff.models.shapes.train_unet import tokenize

    ids = tokenize(teacher.tokenizer, PROMPTS)
    _, pred, abar = TC.teacher_schedule(teacher)
    with torch.no_grad():
        got = TC.student_consistency(unet, text, x, t, ids, torch.tensor([4.0, 5.0, 6.0]), 8, abar, pred)
        m = teacher.unet(x, t, encoder_hidden_states=teacher.text_encoder(ids)[0]).sample
    torch.testing.assert_close(got, C.boundary_output(m, x, t, abar, pred), atol=BATCH_ATOL, rtol=0)


def test_training_learns_resumes_bit_for_bit_and_records_its_objective(teacher, student_dir, tmp_path, monkeypatch):
    solved = []
    real = TC.make_trajectories
    monkeypatch.setattr(TC, "make_trajectories", lambda *a, **k: solved.append(1) or real(*a, **k))
    out = tmp_path / "b"
    assert TC.train(spec(), out, pipe=teacher, progress=False, stop_after=3) is None  # "crashes" after step 3
    meta = TC.train(spec(), out, pipe=teacher, progress=False)  # resumes from step 2, trajectories from disk
    assert len(solved) == 1
    for f in P.WEIGHT_FILES:
        assert (out / f).read_bytes() == (student_dir / f).read_bytes()
    assert meta["objective"] == "consistency" and meta["target"] == "trajectory" and meta["steps_done"] == 4
    assert meta["wall_s"] >= meta["trajectories_s"] > 0  # the wall time includes solving the trajectories
    assert P.metadata(out)["objective"] == "consistency" and P.metadata(out)["wall_s"] == meta["wall_s"]

    # a damaged trajectories file is solved again (same numbers), with a warning, and the run ends the same
    out = tmp_path / "c"
    TC.train(spec(), out, pipe=teacher, progress=False, stop_after=3)
    path = out / C.TRAJECTORIES
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="sha256 is not the one the checkpoint recorded"):
        TC.train(spec(), out, pipe=teacher, progress=False)
    assert len(solved) == 3
    for f in P.WEIGHT_FILES:
        assert (out / f).read_bytes() == (student_dir / f).read_bytes()

    # the objective is not a no-op: the loss on the trajectories falls
    losses = [TC.train(spec(steps=n, lr=1e-3, ema_decay=0.0, checkpoint_every=0), tmp_path / f"l{n}", pipe=teacher,
                       progress=False)["loss_ema"] for n in (1, 25)]
    assert losses[1] < losses[0]


def test_other_objectives_and_settings_are_refused(teacher, student_dir, tmp_path):
    from fastdiff.distill import text_student

    onestep = tmp_path / "onestep"  # a shapes-onestep pipeline folder
    shutil.copytree(student_dir, onestep, ignore=shutil.ignore_patterns("*.pt"))
    cfg_path = onestep / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_fastdiff"] = {"limits": text_student.LIMITS, "command": "python -m fastdiff train shapes-onestep"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match="another objective .*triplet-regression"):
        TC.train(spec(), onestep, pipe=teacher, progress=False)
    work = tmp_path / "work"  # a shapes-onestep checkpoint
    work.mkdir()
    torch.save({"format": text_student.CHECKPOINT_FORMAT, "step": 3}, work / C.CHECKPOINT)
    with pytest.raises(InvalidInput, match="shapes-onestep` checkpoint"):
        TC.train(spec(), work, pipe=teacher, progress=False)
    torch.save({"format": C.CHECKPOINT_FORMAT, "objective": "bootstrap-something", "settings": {}},
               work / C.CHECKPOINT)
    with pytest.raises(InvalidInput, match="objective"):
        TC.train(spec(), work, pipe=teacher, progress=False)
    (work / C.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="cannot read the checkpoint"):
        TC.train(spec(), work, pipe=teacher, progress=False)
    resumed = tmp_path / "r"
    shutil.copytree(student_dir, resumed)
    with pytest.raises(InvalidInput, match="other settings.*guidance_max"):
        TC.train(spec(guidance_max=7.0), resumed, pipe=teacher, progress=False)
    with pytest.raises(InvalidInput, match="guidance_max"):
        TC.train(spec(guidance_max=3.0), tmp_path / "x", pipe=teacher, progress=False)
    with pytest.raises(InvalidInput, match="must divide"):
        TC.train(spec(grid_steps=7), tmp_path / "y", pipe=teacher, progress=False)


def _count_unet_calls(pipe):
    calls = []
    real = pipe.unet.forward

    def counting(sample, timestep, *a, **kw):
        calls.append((sample.shape[0], kw.get("timestep_cond") is not None))
        return real(sample, timestep, *a, **kw)

    pipe.unet.forward = counting
    return calls


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_folded_guidance_one_unet_call_per_step(guided_student_dir, steps):
    """fastdiff.Sampler on the student: ``steps`` UNet calls of batch = images (no CFG batch), the guidance as
    timestep_cond; and the same images as diffusers' own pipeline loop (LCMScheduler, same generator)."""
    pipe = load_pipeline(guided_student_dir)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == 32
    assert pipe.fastdiff_defaults == {"num_inference_steps": 4, "guidance_scale": 5.0}
    calls = _count_unet_calls(pipe)
    got = fastdiff.sample(model=pipe, prompt=PROMPTS, num_inference_steps=steps, output_type="latent",
                          generator=torch.Generator().manual_seed(2), progress=False)
    assert calls == [(len(PROMPTS), True)] * steps
    calls.clear()
    want = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(2)).images
    assert calls == [(len(PROMPTS), True)] * steps  # diffusers, too, folds it: the check above is not vacuous
    torch.testing.assert_close(got, want, atol=BATCH_ATOL, rtol=0)
    other = fastdiff.sample(model=pipe, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=4.0,
                            output_type="latent", generator=torch.Generator().manual_seed(2), progress=False)
    assert (other - got).abs().max() > 100 * BATCH_ATOL  # the guidance input reaches the network


def test_limits_are_refused(student_dir, tmp_path, capsys):
    from fastdiff.__main__ import main

    pipe = load_pipeline(student_dir)
    limit = TC.MAX_INFERENCE_STEPS
    with pytest.raises(InvalidInput, match=f"at most {limit} inference steps"):
        fastdiff.sample(model=pipe, prompt=PROMPTS, num_inference_steps=limit + 1, progress=False)
    for g in (3.9, 6.5, 1.0):
        with pytest.raises(InvalidInput, match=r"guidance_scale in \[4, 6\]"):
            fastdiff.sample(model=pipe, prompt=PROMPTS, guidance_scale=g, progress=False)
    rc = main(["sample", "--model", str(student_dir), "--prompt", "a red circle", "--steps", str(limit + 1),
               "--out", str(tmp_path / "g.png"), "--no-progress"])
    assert rc == 2 and f"at most {limit} inference steps" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_cli_trains_and_refuses_bad_options(teacher_dir, tmp_path, capsys):
    from fastdiff.__main__ import main

    out = tmp_path / "cli"
    argv = ["train", "shapes-consistency", "--teacher", str(teacher_dir), "--out", str(out), "-n", "4",
            "--grid-steps", "5", "--steps", "2", "--batch-size", "2", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert P.metadata(out)["steps_done"] == 2 and (out / C.TRAJECTORIES).is_file()
    rc = main(argv[:-1] + ["--guidance-min", "6", "--guidance-max", "5", "--no-progress"])
    assert rc == 2 and "guidance_max" in capsys.readouterr().err


def test_loads_by_name_and_is_judged_through_the_sampler(student_dir, tmp_path, monkeypatch):
    from fastdiff.models import registry
    from fastdiff.models import text_to_image as T2I
    from fastdiff.quality import shapes_eval as E

    assert TC.NAME in registry.EMBEDDED_PIPELINES
    weights = tmp_path / "weights"
    shutil.copytree(student_dir, weights / TC.NAME, ignore=shutil.ignore_patterns("*.pt"))
    monkeypatch.setattr(T2I, "WEIGHTS_DIR", weights)
    pipe = fastdiff.models.load_pipeline(TC.NAME)
    assert pipe.fastdiff_name == TC.NAME and pipe.fastdiff_limits["guidance_scale"] == [4.0, 6.0]
    images = fastdiff.sample(model=TC.NAME, prompt=PROMPTS[:2], num_inference_steps=2, output_type="np",
                             progress=False)
    assert images.shape == (2, 64, 64, 3)
    for steps in (1, 2, 4):
        r = E.evaluate(TC.NAME, num_inference_steps=steps, seeds=(0,), prompts=PROMPTS[:2], progress=False)
        assert (r.steps, r.guidance, r.images) == (steps, 5.0, 2)
    assert E.goals_for(TC.NAME) == E.MODEL_GOALS[TC.NAME]


def test_onnx_export_passes_the_guidance_and_matches_pytorch(guided_student_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from fastdiff.backends.onnx_pipeline import OnnxTextToImage
    from fastdiff.export.text_to_image import export_pipeline_onnx

    export_pipeline_onnx(guided_student_dir, tmp_path / "onnx", batch=3, progress=False)
    runner = OnnxTextToImage(tmp_path / "onnx")
    assert runner.guidance_input_dim() == 32 and runner.manifest["limits"]["max_inference_steps"] == 4
    assert runner.manifest["scheduler"]["_class_name"] == "LCMScheduler"
    pipe = load_pipeline(guided_student_dir)
    for steps, g in ((1, 5.0), (4, 4.5)):  # at 4 steps the LCM scheduler's noise comes from the generator too
        ref = fastdiff.sample(model=pipe, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=g,
                              generator=torch.Generator().manual_seed(3), output_type="np", progress=False)
        got = runner(PROMPTS, num_inference_steps=steps, guidance_scale=g, generator=torch.Generator().manual_seed(3))
        assert got.shape == ref.shape == (3, 64, 64, 3)
        assert abs(got - ref).max() <= ONNX_PIPELINE_IMG_ATOL
    other = runner(PROMPTS, num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(3))
    assert abs(other - got).max() > 10 * ONNX_PIPELINE_IMG_ATOL  # the guidance input is fed, not ignored
    with pytest.raises(InvalidInput, match="at most 4 inference steps"):
        runner(PROMPTS, num_inference_steps=8)
    with pytest.raises(InvalidInput, match="guidance_scale"):
        runner(PROMPTS, guidance_scale=7.0)


def test_the_shipped_student_folder_is_complete_and_verified():
    """The shipped ``weights/shapes-consistency`` (read, not sampled): its manifest holds, its metadata names the
    objective and target, and it carries neither checkpoint nor trajectories."""
    from fastdiff.models.registry import WEIGHTS_DIR

    folder = WEIGHTS_DIR / TC.NAME
    if not (folder / "manifest.json").is_file():
        pytest.skip("the student's weights are not shipped in this tree")
    P.verify(folder)
    meta = P.metadata(folder)
    assert meta["objective"] == "consistency" and meta["target"] == "trajectory"
    assert meta["wall_s"] > meta["trajectories_s"] > 0 and meta["steps_done"] == meta["steps"]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "scheduler", "text_encoder", "unet"]
