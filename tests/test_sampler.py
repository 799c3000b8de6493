"""The sampler against a diffusers pipeline-style loop (scale_model_input -> unet -> CFG -> scheduler.step)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

import fastdiff
from fastdiff.errors import BackendUnavailable, InvalidInput, NonFiniteError, UnknownBackend, UnknownScheduler
from tests.tolerances import SCHED_LOOP_RTOL, rel_err

B, C, H, W, L, D = 2, 4, 8, 8, 5, 32


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=8, norm_num_groups=8,
    )
    return model.eval()


def diffusers_loop(unet, sched, n, latents, emb, neg, g, generator, rescale=0.0, eta=None):
    """What StableDiffusionPipeline's denoising loop does, minus the text encoder and VAE."""
    sched.set_timesteps(n)
    x = latents * sched.init_noise_sigma
    cfg = g > 1.0
    ehs = torch.cat([neg, emb]) if cfg else emb
    with torch.no_grad():
        for t in sched.timesteps:
            lmi = torch.cat([x] * 2) if cfg else x
            lmi = sched.scale_model_input(lmi, t)
            out = unet(lmi, t, encoder_hidden_states=ehs, return_dict=False)[0]
            if cfg:
                u, c = out.chunk(2)
                pred = u + g * (c - u)
                if rescale > 0:
                    dims = list(range(1, pred.dim()))
                    f = c.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True)
                    pred = rescale * pred * f + (1 - rescale) * pred
            else:
                pred = out
            # As pipelines' prepare_extra_step_kwargs: pass the generator only where step() takes one.
            extra = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
            if eta is not None and "eta" in inspect.signature(sched.step).parameters:
                extra["eta"] = eta  # as pipelines pass eta: only to schedulers whose step takes it (DDIM)
            x = sched.step(pred, t, x, return_dict=False, **extra)[0]
    return x


SCHEDULERS = [
    (DDIMScheduler, {}),
    (DDIMScheduler, {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                     "rescale_betas_zero_snr": True}),
    (DDPMScheduler, {"beta_schedule": "scaled_linear"}),
    (EulerDiscreteScheduler, {"beta_schedule": "scaled_linear"}),
    (EulerAncestralDiscreteScheduler, {"beta_schedule": "scaled_linear", "timestep_spacing": "trailing"}),
    (DPMSolverMultistepScheduler, {}),
    (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "beta_schedule": "scaled_linear"}),
    (UniPCMultistepScheduler, {}),
    (LCMScheduler, {}),
]


@pytest.mark.parametrize("cls,extra", SCHEDULERS, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
@pytest.mark.parametrize("g", [1.0, 4.5])
def test_loop_matches_diffusers(unet, cls, extra, g):
    n = 4 if cls is LCMScheduler else 7
    sched = cls(**extra)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(B, C, H, W, generator=gen)
    emb, neg = torch.randn(B, L, D, generator=gen), torch.randn(B, L, D, generator=gen)
    ref = diffusers_loop(unet, cls.from_config(sched.config), n, latents, emb, neg, g, torch.Generator().manual_seed(7))
    ours = fastdiff.Sampler(unet, scheduler=sched, backend="torch").sample(
        num_inference_steps=n, guidance_scale=g, encoder_hidden_states=emb, negative_encoder_hidden_states=neg,
        latents=latents, generator=torch.Generator().manual_seed(7), output_type="latent", progress=False)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= SCHED_LOOP_RTOL, f"{cls.__name__} {extra}: rel err {rel_err(ours, ref):.2e}"


def test_guidance_rescale_matches_diffusers(unet):
    sched = DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(B, C, H, W, generator=gen)
    emb = torch.randn(B, L, D, generator=gen)
    neg = torch.zeros_like(emb)
    ref = diffusers_loop(unet, DDIMScheduler.from_config(sched.config), 5, latents, emb, neg, 6.0, None, rescale=0.7)
    ours = fastdiff.sample(unet, scheduler=sched, backend="torch", num_inference_steps=5, guidance_scale=6.0,
                           guidance_rescale=0.7, encoder_hidden_states=emb, latents=latents, output_type="latent",
                           progress=False)
    assert rel_err(ours, ref) <= SCHED_LOOP_RTOL


def test_eta_matches_diffusers_ddim(unet):
    sched = DDIMScheduler()
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(B, C, H, W, generator=gen)
    emb, neg = torch.randn(B, L, D, generator=gen), torch.randn(B, L, D, generator=gen)
    ref = diffusers_loop(unet, DDIMScheduler.from_config(sched.config), 6, latents, emb, neg, 3.0,
                         torch.Generator().manual_seed(9), eta=0.5)
    sampler = fastdiff.Sampler(unet, scheduler=sched, backend="torch")
    kwargs = dict(num_inference_steps=6, guidance_scale=3.0, encoder_hidden_states=emb,
                  negative_encoder_hidden_states=neg, latents=latents, output_type="latent", progress=False)
    ours = sampler.sample(eta=0.5, generator=torch.Generator().manual_seed(9), **kwargs)
    assert rel_err(ours, ref) <= SCHED_LOOP_RTOL, f"rel err {rel_err(ours, ref):.2e}"
    # the eta is for that call: the sampler's scheduler keeps its own (0), which differs from eta=0.5
    plain = sampler.sample(generator=torch.Generator().manual_seed(9), **kwargs)
    assert rel_err(plain, ref) > SCHED_LOOP_RTOL
    torch.testing.assert_close(sampler.sample(eta=0.0, **kwargs), plain)


def test_eta_on_a_scheduler_without_eta_is_invalid(unet):
    emb = torch.randn(1, L, D)
    kwargs = dict(num_inference_steps=2, encoder_hidden_states=emb, output_type="latent", progress=False)
    sampler = fastdiff.Sampler(unet, scheduler="dpmpp_2m", backend="torch")
    with pytest.raises(InvalidInput, match="eta"):
        sampler.sample(eta=0.5, **kwargs)
    sampler.sample(eta=0.0, **kwargs)  # zero is what the scheduler does anyway
    with pytest.raises(InvalidInput, match="eta"):
        fastdiff.Sampler(unet, scheduler="ddim", backend="torch").sample(eta=float("nan"), **kwargs)


def test_generator_draws_latents_like_diffusers(unet):
    emb = torch.randn(1, L, D)
    ours = fastdiff.sample(unet, scheduler="ddim", backend="torch", num_inference_steps=2, encoder_hidden_states=emb,
                           generator=torch.Generator().manual_seed(5), output_type="latent", progress=False,
                           num_images_per_prompt=3)
    latents = randn_tensor((3, C, H, W), generator=torch.Generator().manual_seed(5))
    ref = fastdiff.sample(unet, scheduler="ddim", backend="torch", num_inference_steps=2, encoder_hidden_states=emb,
                          latents=latents, output_type="latent", progress=False, num_images_per_prompt=3)
    torch.testing.assert_close(ours, ref)


def test_unconditional_unet2dmodel():
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=8).eval()
    sched = DDPMScheduler()
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref_s = DDPMScheduler.from_config(sched.config)
    ref_s.set_timesteps(6)
    x = latents.clone()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in ref_s.timesteps:
            x = ref_s.step(model(x, t).sample, t, x, generator=gen).prev_sample
    images = fastdiff.sample(model, scheduler=sched, backend="torch", num_inference_steps=6, latents=latents,
                             generator=torch.Generator().manual_seed(9), output_type="pt", progress=False)
    assert rel_err(images, (x / 2 + 0.5).clamp(0, 1)) <= SCHED_LOOP_RTOL
    arr = fastdiff.sample(model, scheduler=sched, backend="torch", num_inference_steps=2, latents=latents,
                          output_type="np", progress=False)
    assert arr.shape == (3, 8, 8, 1)
    pil = fastdiff.sample(model, scheduler=sched, backend="torch", num_inference_steps=2, latents=latents,
                          output_type="pil", progress=False)
    assert len(pil) == 3 and pil[0].size == (8, 8)


# ---------------------------------------------------------------- errors: type and message


def _sampler(unet, **kw):
    return fastdiff.Sampler(unet, scheduler="ddim", backend=kw.pop("backend", "torch"))


def test_unknown_backend(unet):
    with pytest.raises(UnknownBackend, match="unknown backend 'warp'.*choose one of"):
        fastdiff.Sampler(unet, backend="warp")


def test_named_backend_that_cannot_run_lists_reasons(unet):
    s = fastdiff.Sampler(unet, scheduler="ddim", backend="cuda")
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' cannot run here:\n  - the cuda backend runs on CUDA"):
        s.sample(num_inference_steps=2, encoder_hidden_states=torch.randn(1, L, D), progress=False)


def test_unknown_scheduler(unet):
    with pytest.raises(UnknownScheduler, match="heun_3000"):
        fastdiff.Sampler(unet, scheduler="heun_3000")


@pytest.mark.parametrize("steps,pattern", [(0, "num_inference_steps"), (-3, "num_inference_steps"),
                                           (1001, "num_inference_steps"), (2.5, "integer")])
def test_bad_step_count(unet, steps, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        _sampler(unet).sample(num_inference_steps=steps, encoder_hidden_states=torch.randn(1, L, D), progress=False)


@pytest.mark.parametrize("g", [math.nan, math.inf, -math.inf])
def test_non_finite_guidance(unet, g):
    with pytest.raises(InvalidInput, match="guidance_scale must be a finite number"):
        _sampler(unet).sample(guidance_scale=g, encoder_hidden_states=torch.randn(1, L, D), progress=False)


def test_missing_embeddings(unet):
    with pytest.raises(InvalidInput, match="pass encoder_hidden_states"):
        _sampler(unet).sample(num_inference_steps=2, progress=False)


@pytest.mark.parametrize("emb,pattern", [
    (torch.randn(1, L, D + 1), "width D=33 but the model's cross_attention_dim is 32"),
    (torch.randn(L, D), r"must have shape \(B, L, D\)"),
    (torch.randn(1, L, D, dtype=torch.float64), "dtype torch.float64 but the model runs in torch.float32"),
    (torch.randn(1, L, D, device="meta"), "is on meta but the model runs on cpu"),
])
def test_bad_embeddings(unet, emb, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        _sampler(unet).sample(num_inference_steps=2, encoder_hidden_states=emb, progress=False)


def test_negative_embeddings_shape_mismatch(unet):
    with pytest.raises(InvalidInput, match="negative_encoder_hidden_states has shape"):
        _sampler(unet).sample(num_inference_steps=2, encoder_hidden_states=torch.randn(2, L, D),
                              negative_encoder_hidden_states=torch.randn(1, L, D), progress=False)


@pytest.mark.parametrize("latents,pattern", [
    (torch.randn(2, C, H, W), r"latents must have shape \(1, 4, 8, 8\)"),
    (torch.randn(1, C + 1, H, W), r"latents must have shape"),
    (torch.randn(1, C, H, W, dtype=torch.float16), "latents have dtype torch.float16"),
])
def test_bad_latents(unet, latents, pattern):
    with pytest.raises(InvalidInput, match=pattern):
        _sampler(unet).sample(num_inference_steps=2, encoder_hidden_states=torch.randn(1, L, D), latents=latents,
                              progress=False)


def test_latent_output_types(unet):
    with pytest.raises(InvalidInput, match="output_type must be one of"):
        _sampler(unet).sample(encoder_hidden_states=torch.randn(1, L, D), output_type="jpeg", progress=False)
    with pytest.raises(InvalidInput, match="4 channels .*output_type='latent'"):
        _sampler(unet).sample(num_inference_steps=1, encoder_hidden_states=torch.randn(1, L, D), output_type="pil",
                              progress=False)


def test_non_finite_values_raise_naming_the_step(unet):
    class NaNAfterTwo(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config, self.calls = inner, inner.config, 0

        def forward(self, sample, t, encoder_hidden_states=None, return_dict=False):
            self.calls += 1
            out = self.inner(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            return (out * (math.nan if self.calls == 3 else 1.0),)

    s = fastdiff.Sampler(NaNAfterTwo(unet), scheduler="dpmpp_2m", backend="torch")
    with pytest.raises(NonFiniteError, match="at step 3 of 5 .*float32.*bfloat16 or float32"):
        s.sample(num_inference_steps=5, encoder_hidden_states=torch.randn(1, L, D), progress=False)


# ---------------------------------------------------------------- the public type and the shared loop


def test_sampler_is_the_public_type_of_the_unet_sampler(unet):
    from fastdiff.unet_sampler import UNetSampler

    s = fastdiff.Sampler(unet, scheduler="ddim", backend="torch")
    assert isinstance(s, UNetSampler) and isinstance(s, fastdiff.Sampler)
    assert s.scheduler.name == "ddim" and s.backend == "torch" and s.step_backend == "torch"


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_graph_path_step_equals_eager_on_cpu(unet, scheduler):
    """The CUDA-graph step (``step(None)``: row, timestep and noise picked on the device by the step counter)
    computes what the eager loop does; CPU index_select raises on an out-of-range counter, so running one step
    too many shows that the counter indexes exactly the plan's steps."""
    from fastdiff.loop import LoopState, run_loop
    from fastdiff.sample_inputs import prepare_conditioning

    s = fastdiff.Sampler(unet, scheduler=scheduler, backend="torch")
    emb, latents = torch.randn(B, L, D), torch.randn(B, C, H, W)
    cond = prepare_conditioning(s.runner, None, 4.0, emb, None, None, 1, None)
    plan = s.plan(4)
    eager = run_loop(s.runner, s.step_backend, plan, latents, cond, 4.0, 0.0, torch.Generator().manual_seed(1),
                     progress=False)
    state = LoopState(s.runner, s.step_backend, plan, latents, cond, 4.0, 0.0, torch.Generator().manual_seed(1))
    state.draw_all_noise()
    for _ in range(plan.num_steps):
        state.step(None)
    assert int(state.counter) == plan.num_steps and not state.flag.any()
    torch.testing.assert_close(state.x, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        state.step(None)
