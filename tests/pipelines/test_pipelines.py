"""``fastdiff.sample(pipe, ...)`` / ``fastdiff.Sampler(pipe)`` against the untouched diffusers pipeline.

Tiny random-weight StableDiffusionPipeline / StableDiffusionXLPipeline built from configs
(tests/pipelines/tiny_pipelines.py), same generator on both sides: final latents within the loop tolerance, decoded
images within fp32 rounding.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import fastdiff
from fastdiff.errors import InvalidInput, UnknownScheduler
from fastdiff.pipelines import PipelineSampler, Unsupported
from tests.pipelines.tiny_pipelines import (
    SD_SCHED,
    check_latents,
    check_same,
    gen,
    make_lcm_sdxl_unet,
    make_sd,
    make_sdxl,
    sched,
)
from tests.tolerances import rel_err


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


# (id, diffusers scheduler, steps, call overrides)
CASES = [
    ("ddim", lambda: sched(DDIMScheduler), 5, {}),
    ("ddim-eta", lambda: sched(DDIMScheduler), 5, {"eta": 0.6}),
    ("ddpm", lambda: sched(DDPMScheduler), 4, {}),
    ("euler", lambda: sched(EulerDiscreteScheduler), 5, {}),
    ("euler_a", lambda: sched(EulerAncestralDiscreteScheduler), 5, {}),
    ("dpmpp_2m", lambda: sched(DPMSolverMultistepScheduler), 6, {}),
    ("dpmpp_2m_karras", lambda: sched(DPMSolverMultistepScheduler, use_karras_sigmas=True), 6, {}),
    ("unipc", lambda: sched(UniPCMultistepScheduler), 6, {}),
    ("vpred-rescale", lambda: sched(DDIMScheduler, prediction_type="v_prediction", timestep_spacing="trailing",
                                    rescale_betas_zero_snr=True), 5, {"guidance_rescale": 0.7}),
    ("turbo-1step", lambda: sched(EulerAncestralDiscreteScheduler, timestep_spacing="trailing"), 1,
     {"guidance_scale": 0.0}),
]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sample_matches_pipeline(vocab, kind, case):
    name, make_sched, steps, over = case
    pipe = (make_sd if kind == "sd" else make_sdxl)(vocab, make_sched())
    kw = {"prompt": ["a red cat", "a dog, night"], "negative_prompt": ["blurry", "dark"],
          "num_inference_steps": steps, "guidance_scale": 6.0, "num_images_per_prompt": 2, **over}
    ref = pipe(generator=gen(), output_type="latent", **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), output_type="latent", progress=False, **kw)
    check_latents(ours, ref, f"{kind} {name}")
    # the comparison is sensitive: another seed changes the result by far more than the tolerance
    other = fastdiff.sample(pipe, backend="torch", generator=gen(1), output_type="latent", progress=False, **kw)
    assert rel_err(other, ref) > 1e-2
    ref = pipe(generator=gen(), output_type="np", **kw).images
    check_same(fastdiff.sample(pipe, backend="torch", generator=gen(), output_type="np", progress=False, **kw), ref,
               f"{kind} {name}")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lcm_unet_guidance_through_timestep_cond(vocab, kind):
    """An LCM-distilled UNet (time_cond_proj_dim): no CFG batch, guidance as timestep_cond from (g - 1)."""
    if kind == "sd":
        pipe = make_sd(vocab, LCMScheduler(**SD_SCHED), time_cond_proj_dim=8)
    else:
        pipe = make_sdxl(vocab, LCMScheduler(**SD_SCHED))
        pipe.unet = make_lcm_sdxl_unet()
    kw = {"prompt": "a red cat", "num_inference_steps": 4, "guidance_scale": 8.0, "num_images_per_prompt": 2}
    ref = pipe(generator=gen(), output_type="latent", **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), output_type="latent", progress=False, **kw)
    check_latents(ours, ref, f"lcm {kind}")
    weaker = fastdiff.sample(pipe, backend="torch", generator=gen(), output_type="latent", progress=False,
                             **{**kw, "guidance_scale": 2.0})
    assert rel_err(weaker, ours) > 1e-4  # the guidance scale reaches the UNet


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(vocab, output_type):
    pipe = make_sd(vocab, sched(EulerAncestralDiscreteScheduler))
    kw = {"prompt": "a cat", "num_inference_steps": 3, "output_type": output_type, "height": 24, "width": 16}
    ref = pipe(generator=gen(), **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw)
    if output_type == "latent":
        check_latents(ours, ref, output_type)
    else:
        check_same(ours, ref, output_type)
    if output_type == "pil":
        assert ours[0].size == (16, 24)


def test_prompt_embeds_and_generator_list(vocab):
    pipe = make_sd(vocab, sched(EulerAncestralDiscreteScheduler))  # per-step noise: one generator per image
    emb, neg = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True, ["ugly", "dark"])
    kw = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "num_inference_steps": 4, "output_type": "np"}
    ref = pipe(generator=[gen(1), gen(2)], **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=[gen(1), gen(2)], progress=False, **kw)
    check_same(ours, ref, "prompt_embeds")


def test_clip_skip(vocab):
    # SDXL: SD's clip_skip path (and a LoRA `scale`) reads text_encoder.text_model, which transformers 5 removed:
    # the pipeline itself fails there.
    pipe = make_sdxl(vocab, sched(UniPCMultistepScheduler))
    kw = {"prompt": "a cat", "num_inference_steps": 3, "output_type": "latent", "clip_skip": 1}
    ref = pipe(generator=gen(), **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw)
    check_latents(ours, ref, "clip_skip")
    plain = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **{**kw, "clip_skip": None})
    assert rel_err(plain, ours) > 1e-4


def test_sdxl_added_conditioning(vocab):
    """Pooled embeddings and time ids (sizes, crops, negative sizes) reach the UNet as the pipeline sends them."""
    pipe = make_sdxl(vocab, sched(EulerDiscreteScheduler))
    kw = {"prompt": "a cat", "prompt_2": "in the snow", "negative_prompt": "blurry", "num_inference_steps": 4,
          "original_size": (64, 48), "crops_coords_top_left": (4, 2), "target_size": (32, 32),
          "negative_original_size": (16, 16), "negative_target_size": (24, 24), "output_type": "latent"}
    ref = pipe(generator=gen(), **kw).images
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw)
    check_latents(ours, ref, "sdxl time ids")
    plain = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False,
                            **{k: v for k, v in kw.items() if "size" not in k and "crops" not in k})
    assert rel_err(plain, ours) > 1e-4  # the time ids change the result

    (emb, neg, pooled, neg_pooled) = pipe.encode_prompt("a cat", device="cpu", negative_prompt="blurry")
    kw2 = {"prompt_embeds": emb, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
           "negative_pooled_prompt_embeds": neg_pooled, "num_inference_steps": 3, "output_type": "latent"}
    ref = pipe(generator=gen(), **kw2).images
    check_latents(fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw2), ref, "pooled")


def test_sdxl_fp16_vae_is_upcast_for_decoding(vocab):
    pipe = make_sdxl(vocab, sched(DDIMScheduler))
    pipe.vae.to(torch.float16)
    kw = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "np"}
    ref = pipe(generator=gen(), **kw).images
    assert pipe.vae.dtype == torch.float16
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw)
    assert pipe.vae.dtype == torch.float16  # cast back after decoding, as the pipeline does
    check_same(ours, ref, "fp16 vae")


def test_sdxl_latents_mean_std(vocab):
    pipe = make_sdxl(vocab, sched(DDIMScheduler))
    pipe.vae.register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.9, 1.1, 1.0, 0.8])
    kw = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "np"}
    check_same(fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw),
               pipe(generator=gen(), **kw).images, "latents mean/std")


class _Features:
    def __call__(self, images, return_tensors="pt"):
        self.pixel_values = torch.zeros(len(images), 3, 4, 4)
        return self

    def to(self, device):
        return self


class _SafetyChecker(torch.nn.Module):
    """Flags every second image and blacks it out, like the real checker does."""

    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, images, clip_input):
        images = images.clone()
        images[1::2] = 0
        return images, [i % 2 == 1 for i in range(images.shape[0])]


def test_sd_safety_checker_runs(vocab):
    pipe = make_sd(vocab, sched(DDIMScheduler))
    pipe.safety_checker, pipe.feature_extractor = _SafetyChecker(), _Features()
    kw = {"prompt": ["a", "b"], "num_inference_steps": 2, "output_type": "np"}
    ref = pipe(generator=gen(), **kw)
    assert ref.nsfw_content_detected == [False, True]
    ours = fastdiff.sample(pipe, backend="torch", generator=gen(), progress=False, **kw)
    check_same(ours, ref.images, "safety checker")
    assert (ours[1] == 0).all()


def test_sampler_is_reusable_and_follows_the_pipeline_scheduler(vocab):
    pipe = make_sd(vocab, sched(DDIMScheduler))
    s = fastdiff.Sampler(pipe, backend="torch")
    assert isinstance(s, PipelineSampler) and isinstance(s, fastdiff.Sampler)
    assert s.scheduler.name == "ddim" and s.device == torch.device("cpu") and s.dtype == torch.float32
    kw = {"prompt": "a cat", "num_inference_steps": 3, "output_type": "latent"}
    check_latents(s.sample(generator=gen(), progress=False, **kw), pipe(generator=gen(), **kw).images, "reuse")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert s.scheduler.name == "euler_a"
    check_latents(s.sample(generator=gen(), progress=False, **kw), pipe(generator=gen(), **kw).images, "swapped")


def test_sampler_named_scheduler_takes_the_pipeline_schedule(vocab):
    pipe = make_sd(vocab, sched(DDIMScheduler, prediction_type="v_prediction"))
    s = fastdiff.Sampler(pipe, scheduler="dpmpp_2m_karras", backend="torch")
    assert s.scheduler["prediction_type"] == "v_prediction" and s.scheduler["beta_schedule"] == "scaled_linear"
    kw = {"prompt": "a cat", "num_inference_steps": 4, "output_type": "latent"}
    ours = s.sample(generator=gen(), progress=False, **kw)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    check_latents(ours, pipe(generator=gen(), **kw).images, "named scheduler")


def test_unsupported_arguments_raise(vocab):
    pipe = make_sd(vocab, sched(DDIMScheduler))
    with pytest.raises(Unsupported, match="callback_on_step_end"):
        fastdiff.sample(pipe, prompt="a", callback_on_step_end=lambda *a: {}, progress=False)
    with pytest.raises(Unsupported, match="custom `timesteps`"):
        fastdiff.sample(pipe, prompt="a", timesteps=[999, 500], progress=False)
    with pytest.raises(Unsupported, match="num_inference_step .*not arguments of this pipeline"):
        fastdiff.sample(pipe, prompt="a", num_inference_step=3, progress=False)
    with pytest.raises(Unsupported, match="2 generators for 1 images"):
        fastdiff.sample(pipe, prompt="a", generator=[gen(), gen()], progress=False)
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):  # the pipeline's own check
        fastdiff.sample(pipe, num_inference_steps=2, progress=False)


def test_unsupported_scheduler_and_pipeline(vocab):
    pipe = make_sd(vocab, sched(PNDMScheduler, skip_prk_steps=True))
    with pytest.raises(UnknownScheduler, match="PNDMScheduler"):
        fastdiff.Sampler(pipe)
    pipe.scheduler = sched(DDIMScheduler)
    with pytest.raises(InvalidInput, match="cuda_graph=True needs the model on a CUDA device"):
        fastdiff.Sampler(pipe, cuda_graph=True)

    class Other(type(pipe)):
        def __call__(self, *args, **kwargs):
            return None

    pipe.__class__ = Other
    with pytest.raises(InvalidInput, match="Other overrides StableDiffusionPipeline.__call__"):
        fastdiff.Sampler(pipe)


def test_other_pipelines_are_rejected():
    from diffusers import DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(InvalidInput, match="DDPMPipeline is not supported"):
        fastdiff.Sampler(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def test_fastdiff_loop_replaces_scheduler_step(vocab, monkeypatch):
    """The denoising loop is fastdiff's: the diffusers scheduler's step() is never called."""
    pipe = make_sd(vocab, sched(DPMSolverMultistepScheduler))
    calls = types.SimpleNamespace(n=0)
    orig = type(pipe.scheduler).step

    def counting_step(self, *a, **k):
        calls.n += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(type(pipe.scheduler), "step", counting_step)
    fastdiff.sample(pipe, backend="torch", prompt="a", num_inference_steps=3, output_type="latent", progress=False)
    assert calls.n == 0
    pipe(prompt="a", num_inference_steps=3, output_type="latent")
    assert calls.n == 3
