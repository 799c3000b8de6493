"""``fastdiff.accelerate(pipe)`` / ``fastdiff.restore(pipe)``: same object, same call, same outputs; fallbacks.

Tiny random-weight pipelines (tests/pipelines/tiny_pipelines.py). The untouched pipeline is run first with a
generator, then the accelerated one with an equal generator; latents within the loop tolerance, images within
fp32 rounding.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from fastdiff import pipeline_accelerator
from fastdiff.errors import InvalidInput, UnknownBackend
from fastdiff.pipeline_accelerator import FallbackWarning, accelerate, is_accelerated, restore
from tests.pipelines.tiny_pipelines import SD_SCHED, check_latents, check_same, gen, make_sd, make_sdxl, sched


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


class StepCounter:
    """Counts calls of the diffusers scheduler's step(): zero when fastdiff ran the loop."""

    def __init__(self, monkeypatch, scheduler):
        self.n = 0
        orig = type(scheduler).step

        @functools.wraps(orig)  # keeps the signature: pipelines pass eta / generator by looking at it
        def step(s, *a, **k):
            self.n += 1
            return orig(s, *a, **k)

        monkeypatch.setattr(type(scheduler), "step", step)


SCHEDS = [
    ("ddim", lambda: sched(DDIMScheduler), {}),
    ("ddim-eta", lambda: sched(DDIMScheduler), {"eta": 0.5}),
    ("euler_a", lambda: sched(EulerAncestralDiscreteScheduler), {}),
    ("dpmpp_2m", lambda: sched(DPMSolverMultistepScheduler), {"guidance_rescale": 0.5}),
    ("unipc", lambda: sched(UniPCMultistepScheduler), {}),
]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("case", SCHEDS, ids=[c[0] for c in SCHEDS])
def test_accelerated_pipeline_matches_untouched(vocab, kind, case, monkeypatch):
    name, make_sched, over = case
    pipe = (make_sd if kind == "sd" else make_sdxl)(vocab, make_sched())
    kw = {"prompt": ["a red cat", "a dog"], "negative_prompt": ["ugly", "dark"], "num_inference_steps": 5,
          "guidance_scale": 7.0, "num_images_per_prompt": 2, **over}
    ref_lat = pipe(generator=gen(), output_type="latent", **kw).images
    ref_img = pipe(generator=gen(), output_type="np", **kw).images
    assert accelerate(pipe, backend="torch") is pipe
    counter = StepCounter(monkeypatch, pipe.scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        out = pipe(generator=gen(), output_type="latent", **kw)
        img = pipe(generator=gen(), output_type="np", **kw)
    assert counter.n == 0, "the diffusers loop ran"
    expected = StableDiffusionXLPipelineOutput if kind == "sdxl" else StableDiffusionPipelineOutput
    assert isinstance(out, expected) and isinstance(img, expected)
    check_latents(out.images, ref_lat, f"{kind} {name}")
    check_same(img.images, ref_img, f"{kind} {name}")


def test_public_functions_survive_importing_their_modules(vocab):
    # The implementing modules are named apart from the functions, so importing them binds no package attribute
    # that would shadow the lazily exported fastdiff.accelerate / fastdiff.optimize / fastdiff.restore.
    import fastdiff
    import fastdiff.model_optimizer
    import fastdiff.pipeline_accelerator

    assert fastdiff.accelerate is accelerate and fastdiff.restore is restore
    assert fastdiff.optimize is fastdiff.model_optimizer.optimize
    assert fastdiff.pipeline_accelerator.accelerate is accelerate
    pipe = make_sd(vocab, sched(DDIMScheduler))
    assert fastdiff.accelerate(pipe, backend="torch") is pipe and is_accelerated(pipe)
    restore(pipe)


def test_same_object_class_name_signature(vocab, tmp_path):
    pipe = make_sd(vocab, sched(DDIMScheduler))
    sig = inspect.signature(pipe.__call__)
    accelerate(pipe, backend="torch")
    assert is_accelerated(pipe) and isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe) is not StableDiffusionPipeline
    assert inspect.signature(pipe.__call__) == sig
    assert pipe.__call__.__doc__ == StableDiffusionPipeline.__call__.__doc__
    pipe.save_config(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert restore(pipe) is pipe
    assert type(pipe) is StableDiffusionPipeline and not is_accelerated(pipe)
    assert restore(pipe) is pipe  # not accelerated: nothing to undo


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_return_dict_false_and_pil(vocab, kind):
    pipe = (make_sd if kind == "sd" else make_sdxl)(vocab, sched(DPMSolverMultistepScheduler))
    kw = {"prompt": "a cat", "num_inference_steps": 3, "return_dict": False}
    ref = pipe(generator=gen(), **kw)
    accelerate(pipe, backend="torch")
    ours = pipe(generator=gen(), **kw)
    assert isinstance(ours, tuple) and len(ours) == len(ref)
    check_same(ours[0], ref[0], "pil")
    if kind == "sd":
        assert ours[1] is None and ref[1] is None  # no safety checker


def test_positional_arguments(vocab):
    pipe = make_sd(vocab, sched(UniPCMultistepScheduler))
    ref = pipe("a cat", 16, 24, 3, generator=gen(), output_type="pt").images
    accelerate(pipe, backend="torch")
    ours = pipe("a cat", 16, 24, 3, generator=gen(), output_type="pt").images
    assert ours.shape == (1, 3, 16, 24)
    check_same(ours, ref, "positional")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lcm_and_turbo(vocab, kind, monkeypatch):
    """LCM-distilled UNet (timestep_cond, no CFG) and a Turbo-style one-step call run through fastdiff."""
    if kind == "sd":
        pipe = make_sd(vocab, LCMScheduler(**SD_SCHED), time_cond_proj_dim=8)
    else:
        from tests.pipelines.tiny_pipelines import make_lcm_sdxl_unet

        pipe = make_sdxl(vocab, LCMScheduler(**SD_SCHED))
        pipe.unet = make_lcm_sdxl_unet()
    kw = {"prompt": "a cat", "num_inference_steps": 4, "guidance_scale": 6.0, "output_type": "latent"}
    ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")
    counter = StepCounter(monkeypatch, pipe.scheduler)
    check_latents(pipe(generator=gen(), **kw).images, ref, "lcm")

    restore(pipe)
    pipe = (make_sd if kind == "sd" else make_sdxl)(vocab, sched(EulerAncestralDiscreteScheduler,
                                                                 timestep_spacing="trailing"))
    kw = {"prompt": "a cat", "num_inference_steps": 1, "guidance_scale": 0.0, "output_type": "np"}
    ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")
    counter = StepCounter(monkeypatch, pipe.scheduler)
    check_same(pipe(generator=gen(), **kw).images, ref, "turbo")
    assert counter.n == 0


def test_scheduler_swapped_after_accelerate(vocab, monkeypatch):
    pipe = accelerate(make_sdxl(vocab, sched(DDIMScheduler)), backend="torch")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = {"prompt": "a cat", "num_inference_steps": 4, "output_type": "latent"}
    ours = pipe(generator=gen(), **kw).images
    restore(pipe)
    check_latents(ours, pipe(generator=gen(), **kw).images, "swapped scheduler")


# ------------------------------------------------------------------------------------ fallback to the original loop


def test_fallback_on_step_end_callback(vocab, monkeypatch):
    """An unsupported argument: the pipeline's own loop (the callback runs), its exact result, one warning."""
    pipe = make_sd(vocab, sched(DPMSolverMultistepScheduler))
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 0.9}  # changes latents between steps: fastdiff cannot do that

    kw = {"prompt": "a cat", "num_inference_steps": 3, "output_type": "np", "callback_on_step_end": cb}
    ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")
    with pytest.warns(FallbackWarning, match="callback_on_step_end"):
        ours = pipe(generator=gen(), **kw).images
    assert seen == [0, 1, 2] * 2
    np.testing.assert_array_equal(ours, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # one-time: the second fallback is silent
        pipe(generator=gen(), **kw)
    # and a supported call right after runs through fastdiff again
    counter = StepCounter(monkeypatch, pipe.scheduler)
    pipe(prompt="a cat", num_inference_steps=3, output_type="latent")
    assert counter.n == 0


@pytest.mark.parametrize("kind,extra,pattern", [
    ("sd", {"timesteps": [999, 600, 200]}, "custom `timesteps`"),
    ("sd", {"sigmas": [14.6, 3.0, 0.5]}, "custom `sigmas`"),
    ("sdxl", {"denoising_end": 0.5}, "denoising_end"),
    ("sd", {"callback_steps": 1, "callback": lambda *a: None}, "callback, callback_steps"),
    ("sd", {"output_type": "latents"}, "output_type='latents'"),
    ("sd", {"latents": torch.randn(1, 4, 8, 8), "height": 24, "width": 24}, "latents of shape"),
])
def test_fallback_reasons(vocab, kind, extra, pattern):
    scheduler = sched(EulerDiscreteScheduler)  # takes custom timesteps / sigmas
    pipe = (make_sd if kind == "sd" else make_sdxl)(vocab, scheduler)
    kw = {"prompt": "a cat", "num_inference_steps": 3, **extra}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")
    with pytest.warns(FallbackWarning, match=pattern):
        ours = pipe(generator=gen(), **kw).images
    if isinstance(ref, list):
        ref, ours = np.stack([np.asarray(i) for i in ref]), np.stack([np.asarray(i) for i in ours])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_fallback_on_unsupported_scheduler(vocab):
    pipe = make_sd(vocab, sched(PNDMScheduler, skip_prk_steps=True))
    kw = {"prompt": "a cat", "num_inference_steps": 3, "output_type": "np"}
    ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")  # accelerating works; the call falls back, naming the scheduler
    with pytest.warns(FallbackWarning, match="PNDMScheduler' is not supported"):
        np.testing.assert_array_equal(pipe(generator=gen(), **kw).images, ref)


def test_fallback_when_the_unet_is_offloaded(vocab):
    pipe = make_sd(vocab, sched(DDIMScheduler))
    pipe.unet._hf_hook = types.SimpleNamespace(execution_device=None)  # as enable_model_cpu_offload leaves it
    kw = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "np"}
    ref = pipe(generator=gen(), **kw).images
    accelerate(pipe, backend="torch")  # accepted: the hooks may be gone by the time it is called
    with pytest.warns(FallbackWarning, match="accelerate hooks"):
        np.testing.assert_array_equal(pipe(generator=gen(), **kw).images, ref)
    del pipe.unet._hf_hook
    check_same(pipe(generator=gen(), **kw).images, ref, "hooks removed")


def test_bad_calls_raise_the_pipelines_own_errors(vocab):
    pipe = accelerate(make_sd(vocab, sched(DDIMScheduler)), backend="torch")
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="have to be divisible by 8"):
        pipe("a", height=20, width=16, num_inference_steps=2)
    with pytest.raises(TypeError):
        pipe("a", no_such_argument_position=1, **{"prompt": "b"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(ValueError, match="list of generators of length 2"):
            pipe("a", generator=[gen(), gen()], num_inference_steps=2)


# ------------------------------------------------------------------------------------ setup, restore, optimize


def test_accelerate_rejects_what_it_cannot_run(vocab):
    from diffusers import DDPMPipeline, UNet2DModel

    with pytest.raises(InvalidInput, match="takes a diffusers pipeline"):
        accelerate(torch.nn.Linear(2, 2))
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(InvalidInput, match="DDPMPipeline is not supported"):
        accelerate(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()))
    pipe = make_sd(vocab, sched(DDIMScheduler))
    with pytest.raises(UnknownBackend, match="unknown backend 'warp'"):
        accelerate(pipe, backend="warp")
    assert not is_accelerated(pipe)
    accelerate(pipe, backend="torch", cuda_graph=True)  # the device is checked at the call (pipe.to may follow)
    with pytest.raises(InvalidInput, match="cuda_graph=True needs the model on a CUDA device"):
        pipe("a", num_inference_steps=2)
    accelerate(pipe, backend="torch")  # re-accelerating replaces the settings
    pipe("a", num_inference_steps=2)
    restore(pipe)
    assert type(pipe) is StableDiffusionPipeline


def test_restore_of_a_unet_undoes_fastdiff_optimize(vocab):
    import fastdiff
    from fastdiff.model_optimizer import is_optimized

    unet = make_sd(vocab, sched(DDIMScheduler)).unet
    fastdiff.optimize(unet, backend="torch")
    assert is_optimized(unet)
    assert fastdiff.restore(unet) is True and not is_optimized(unet)  # model_optimizer.restore's answer
    assert fastdiff.restore(unet) is False  # nothing left to undo


def _fake_optimizer(monkeypatch, calls, fail=False):
    """Replace the UNet optimizer the accelerator calls with one that records its calls."""
    def optimize(unet, backend="auto"):
        calls.append(("optimize", unet, backend))
        if fail:
            raise RuntimeError("no kernels for this GPU")
        return "report"

    def restore(unet):
        calls.append(("restore", unet))
        return unet

    monkeypatch.setattr(pipeline_accelerator, "optimize_unet", optimize)
    monkeypatch.setattr(pipeline_accelerator, "restore_unet", restore)


def test_accelerate_calls_fastdiff_optimize_on_the_unet(vocab, monkeypatch, caplog):
    calls = []
    _fake_optimizer(monkeypatch, calls)
    pipe = make_sdxl(vocab, sched(DDIMScheduler))
    kw = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent"}
    ref = pipe(generator=gen(), **kw).images
    with caplog.at_level("INFO", logger="fastdiff"):
        accelerate(pipe, backend="auto")
    assert calls == [("optimize", pipe.unet, "auto")] and "report" in caplog.text
    check_latents(pipe(generator=gen(), **kw).images, ref, "optimized")
    restore(pipe)
    assert calls[-1] == ("restore", pipe.unet)
    unet = pipe.unet
    assert restore(unet) is unet and calls[-1] == ("restore", unet)  # a UNet goes to the optimizer's restore

    calls.clear()
    accelerate(pipe, backend="torch")  # the plain reference path: no optimizer
    assert calls == []


def test_optimize_failure_is_logged_not_raised(vocab, monkeypatch, caplog):
    calls = []
    _fake_optimizer(monkeypatch, calls, fail=True)
    pipe = make_sd(vocab, sched(DDIMScheduler))
    with caplog.at_level("WARNING", logger="fastdiff"):
        accelerate(pipe)
    assert "fastdiff.optimize failed on the UNet (RuntimeError: no kernels for this GPU)" in caplog.text
    restore(pipe)
    assert [c[0] for c in calls] == ["optimize"]  # nothing to restore


def test_auto_pipeline_form(vocab):
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pipe(make_sdxl(vocab, sched(DDIMScheduler)))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    kw = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent"}
    ref = pipe(generator=gen(), **kw).images
    check_latents(accelerate(pipe, backend="torch")(generator=gen(), **kw).images, ref, "auto pipeline")
