"""Tiny random-weight Stable Diffusion / SDXL pipelines built from configs (no download), for the pipeline tests.

The tokenizer is a CLIP BPE tokenizer over a vocabulary written here (single characters, no merges), the text
encoders are 2-layer ``CLIPTextModel`` / ``CLIPTextModelWithProjection``, the VAE has two blocks (images are twice
the latent size) and the UNet is the smallest that keeps every code path of the real ones (cross-attention blocks,
SDXL's ``text_time`` added conditioning, LCM's ``time_cond_proj_dim``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tests.tolerances import IMG_ATOL, SCHED_LOOP_RTOL, rel_err

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16  # the tokenizer's model_max_length: prompts pad / truncate to this many ids
TEXT_DIM = 32
PROJ_DIM = 16
TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim (6 time ids each)
LATENT = 8  # UNet sample_size: default images are 16 x 16 (the VAE upsamples x2)


def write_vocab(folder: Path) -> Path:
    """A byte-level BPE vocabulary of single characters (plain and word-final) with no merges."""
    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = [BOS, EOS] + list(chars) + [c + "</w>" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def make_tokenizer(folder: Path, max_tokens: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIPTokenizer loaded from the vocabulary written to ``folder`` (vocab.json + merges.txt)."""
    return CLIPTokenizer.from_pretrained(str(write_vocab(folder)), model_max_length=max_tokens)


def _text_config(tok: CLIPTokenizer, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=MAX_TOKENS, projection_dim=PROJ_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, sample_size=2 * LATENT,
    ).eval()


def make_unet(cross_attention_dim: int, time_cond_proj_dim: int | None = None, sdxl: bool = False):
    kwargs = {}
    if sdxl:
        kwargs = {"addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
                  "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + PROJ_DIM}
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim, **kwargs,
    ).eval()


def make_sd(folder: Path, scheduler, time_cond_proj_dim: int | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny StableDiffusionPipeline (no safety checker). ``time_cond_proj_dim`` makes an LCM-style UNet."""
    torch.manual_seed(seed)
    tok = make_tokenizer(folder)
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=CLIPTextModel(_text_config(tok)).eval(), tokenizer=tok,
        unet=make_unet(TEXT_DIM, time_cond_proj_dim), scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl(folder: Path, scheduler, seed: int = 0, force_upcast: bool = True) -> StableDiffusionXLPipeline:
    """A tiny StableDiffusionXLPipeline with two text encoders and the text_time added conditioning."""
    torch.manual_seed(seed)
    tok = make_tokenizer(folder)
    vae = make_vae()
    vae.register_to_config(force_upcast=force_upcast)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(tok)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok)).eval(), tokenizer=tok, tokenizer_2=tok,
        unet=make_unet(2 * TEXT_DIM, sdxl=True), scheduler=scheduler, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----- comparisons shared by the pipeline and accelerate tests ------------------------------------------------
SD_SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


def sched(cls, **extra):
    """A scheduler with SD's noise schedule (keys the class does not know are dropped)."""
    known = cls().config
    cfg = {k: v for k, v in {**SD_SCHED, "clip_sample": False, **extra}.items() if k in known}
    return cls(**cfg)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_same(ours, ref, what=""):
    if isinstance(ref, list):  # PIL
        assert isinstance(ours, list) and len(ours) == len(ref) and all(isinstance(i, Image.Image) for i in ours)
        a, b = np.stack([np.asarray(i, dtype=np.int16) for i in ours]), np.stack([np.asarray(i) for i in ref])
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, what
        return
    assert type(ours) is type(ref) and ours.shape == ref.shape, what
    if isinstance(ref, np.ndarray):
        ours, ref = torch.from_numpy(ours), torch.from_numpy(ref)
    assert (ours - ref).abs().max().item() <= IMG_ATOL, f"{what}: max abs diff {(ours - ref).abs().max():.2e}"


def check_latents(ours, ref, what=""):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err = rel_err(ours, ref)
    assert err <= SCHED_LOOP_RTOL, f"{what}: rel err {err:.2e}"


def make_lcm_sdxl_unet():
    """An SDXL-like UNet distilled LCM-style: guidance enters as ``timestep_cond`` (``time_cond_proj_dim``)."""
    torch.manual_seed(3)
    unet = make_unet(2 * TEXT_DIM, sdxl=True, time_cond_proj_dim=8)
    return unet


