"""End to end, prompt to image: an untouched diffusers pipeline vs the same object after ``fastdiff.accelerate``.

SD 1.5- and SDXL-architecture pipelines (the real UNet / text encoder / VAE configs) with random weights in fp16 on
the GPU, DPM-Solver++ 2M, a few steps, batch 1 with CFG, ``output_type="np"``. Providers, same session, same
pipeline object: ``diffusers`` (untouched ``pipe(...)``), ``fastdiff`` (``fastdiff.accelerate(pipe)``: fused step,
``fastdiff.optimize`` on the UNet when available) and ``fastdiff-graph`` (``cuda_graph=True``). Images per second
go to ``extra_info`` and the ratio table (benches/conftest.py); ``max_abs_diff`` is the accelerated image's largest
difference from the untouched one (fp16, same generator).

    pytest benches/bench_pipeline.py --benchmark-only            # needs a CUDA GPU and transformers; ~1 min on H100

The text side uses a CLIP tokenizer over a small written vocabulary (77 tokens per prompt like the real one).
``FASTDIFF_BENCH_PIPELINE_SMOKE=1`` runs shrunken configs on the CPU in fp32 to check the bench itself.
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

SMOKE = os.environ.get("FASTDIFF_BENCH_PIPELINE_SMOKE") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
ARCHS = {  # name -> (image side, steps)
    "sd15": (512, 10) if not SMOKE else (64, 2),
    "sdxl": (1024, 10) if not SMOKE else (64, 2),
}
PROVIDERS = ["diffusers", "fastdiff", "fastdiff-graph"] if DEVICE == "cuda" else ["diffusers", "fastdiff"]
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE != "cuda" and not SMOKE,
                       reason="end-to-end pipeline throughput is measured on a CUDA GPU (fp16); none is available"),
]
REFERENCE: dict[str, np.ndarray] = {}  # arch -> untouched pipeline's images, for max_abs_diff


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_encoder(tok, hidden: int, layers: int, heads: int, act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if SMOKE:
        hidden, layers, heads = 32, 2, 4
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=77,
                         projection_dim=hidden, hidden_act=act, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(side: int, scaling: float):
    from diffusers import AutoencoderKL

    blocks = (128, 256, 512, 512) if not SMOKE else (8, 16)
    return AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), layers_per_block=2 if not SMOKE else 1,
                         latent_channels=4, sample_size=side, scaling_factor=scaling, force_upcast=True,
                         norm_num_groups=32 if not SMOKE else 4)


def _scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1)


def _sd15(tok):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    side = ARCHS["sd15"][0]
    blocks = (320, 640, 1280, 1280) if not SMOKE else (16, 32)
    unet = UNet2DConditionModel(
        sample_size=side // 8, layers_per_block=2 if not SMOKE else 1, block_out_channels=blocks,
        down_block_types=("CrossAttnDownBlock2D",) * (len(blocks) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(blocks) - 1),
        cross_attention_dim=768 if not SMOKE else 32, attention_head_dim=8, norm_num_groups=32 if not SMOKE else 8)
    return StableDiffusionPipeline(
        vae=_vae(side, 0.18215), text_encoder=_text_encoder(tok, 768, 12, 12, "quick_gelu", False), tokenizer=tok,
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _sdxl(tok):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    side = ARCHS["sdxl"][0]
    if SMOKE:
        arch = {"block_out_channels": (16, 32), "layers_per_block": 1, "transformer_layers_per_block": (1, 1),
                "attention_head_dim": (4, 8), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32, "norm_num_groups": 8,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
    else:  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        arch = {"block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
                "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}
    unet = UNet2DConditionModel(sample_size=side // 8, use_linear_projection=True, addition_embed_type="text_time",
                                **arch)
    return StableDiffusionXLPipeline(
        vae=_vae(side, 0.13025), text_encoder=_text_encoder(tok, 768, 12, 12, "quick_gelu", False),
        text_encoder_2=_text_encoder(tok, 1280, 32, 20, "gelu", True), tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=_scheduler(), add_watermarker=False)


@pytest.fixture(scope="module")
def pipelines():
    pytest.importorskip("transformers", reason="the pipelines' CLIP text encoders need transformers")
    built = {}

    def get(arch: str):
        if arch not in built:
            torch.manual_seed(0)
            with tempfile.TemporaryDirectory() as folder, torch.device(DEVICE):  # init the weights on the GPU
                pipe = (_sd15 if arch == "sd15" else _sdxl)(_tokenizer(Path(folder)))
            pipe.to(DEVICE, DTYPE)
            pipe.set_progress_bar_config(disable=True)
            built[arch] = pipe
        return built[arch]

    yield get
    built.clear()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipeline(benchmark, record, pipelines, arch, provider):
    import fastdiff.pipeline_accelerator as fa
    from fastdiff.errors import NonFiniteError

    pipe = pipelines(arch)
    side, steps = ARCHS[arch]
    if provider != "diffusers":
        fa.accelerate(pipe, backend="auto", cuda_graph=provider == "fastdiff-graph")
    images = {}

    def call():
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        images["last"] = pipe(PROMPT, negative_prompt=NEGATIVE, height=side, width=side, num_inference_steps=steps,
                              guidance_scale=7.0, generator=gen, output_type="np").images
        sync()

    try:
        call()  # warm-up: cuDNN / kernel selection, allocator, fastdiff.optimize's compilation
        benchmark.pedantic(call, rounds=3 if not SMOKE else 1, iterations=1, warmup_rounds=1)
    except NonFiniteError as e:
        pytest.skip(f"random fp16 weights overflowed in this architecture ({e}); nothing to compare")
    finally:
        fa.restore(pipe)
    extra = {"images_per_s": 1.0 / benchmark.stats.stats.median, "steps": steps, "side": side,
             "dtype": str(DTYPE).replace("torch.", "")}
    if provider == "diffusers":
        REFERENCE[arch] = images["last"]
    elif arch in REFERENCE:
        extra["max_abs_diff"] = float(np.abs(images["last"] - REFERENCE[arch]).max())
    record("pipeline", f"{arch} {side}px {steps} steps", provider, benchmark, **extra)
