"""Sampling text-to-image coalescers (``shapes-coalescer``): prompts in, 64x64 images out, in 1 or 2 steps.

A sample: ``R = prior_scale * z`` with ``z`` the ``shapes`` pipeline's latent noise (image ``k`` of a prompt:
``torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(k))``), one or two steps ``x <- x +
normalize(direction) * distance`` under the prompt's pooled text embedding (guided: ``t_u + g (t_c - t_u)`` with the
empty prompt's embedding as the null condition), optionally stopping a sample once ``|direction| >= threshold``
(the network is sure), then the shipped VAE decodes the latent. Training and judging live in
:mod:`fastdiff.distill.text_coalescer`.

    images, steps_used, seconds = sample_images("shapes-coalescer", ["a red circle left of a blue square"],
                                                seeds=[0, 1], max_steps=2)
"""

from __future__ import annotations

import math
import os
import time

import torch

from fastdiff.errors import InvalidInput
from fastdiff.models.coalescer_net import check_steps, generate
from fastdiff.models.text_coalescer_net import TextCoalescerModel, load_text_coalescer

_ENCODERS: dict = {}


def encoder():
    """The shipped ``shapes`` text encoder and VAE (:class:`~fastdiff.distill.text_coalescer_index.ShapesEncoder`),
    loaded and verified once per process."""
    from fastdiff.models.shapes import pipeline as P
    from fastdiff.models.shapes.encoders import ShapesEncoder

    key = str(P.PIPELINE_DIR)
    if key not in _ENCODERS:
        _ENCODERS[key] = ShapesEncoder(P.PIPELINE_DIR)
    return _ENCODERS[key]


def load(model: str | os.PathLike | TextCoalescerModel = "shapes-coalescer", device=None) -> TextCoalescerModel:
    """A text coalescer (embedded name, folder, or a loaded model returned as is), checked against the shipped
    text encoder and VAE: a model that learned other ones is :class:`InvalidInput` (its latents would decode
    wrongly)."""
    m = model if isinstance(model, TextCoalescerModel) else load_text_coalescer(model, device=device)
    want = m.model_config.get("encoders") if m.model_config else None
    if want:
        enc = encoder()
        have = {"text_encoder_sha256": enc.text_sha256, "vae_sha256": enc.vae_sha256}
        if dict(want) != have:
            raise InvalidInput(f"{m.name!r} learned another text encoder or VAE than the shipped shapes pipeline's "
                               "(their sha256 differ): retrain it on an index of the shipped pipeline")
    return m


def _check_prompts_seeds(prompts, seeds) -> tuple[list[str], list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidInput(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidInput("every prompt must be a string")
    if isinstance(seeds, int) or not isinstance(seeds, (list, tuple, range)) or len(seeds) == 0:
        raise InvalidInput(f"seeds must be a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise InvalidInput(f"seeds must be integers >= 0, got {s!r}")
    return list(prompts), list(seeds)


def pipeline_noise(seeds: list[int]) -> torch.Tensor:
    """``(S, 4, 16, 16)``: the latent noise the ``shapes`` pipeline draws for a generator seeded with each seed."""
    return torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(k)) for k in seeds])


@torch.no_grad()
def sample_latents(model: TextCoalescerModel, embeddings: torch.Tensor, noise: torch.Tensor, max_steps: int,
                   guidance: float, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, steps used) of unit ``noise`` ``(N, 4, 16, 16)`` under condition embeddings ``(N, E)``."""
    return generate(model, embeddings.float(), noise.float().clone(), max_steps, guidance, threshold)


@torch.no_grad()
def sample_images(model, prompts: list[str], seeds: list[int], max_steps: int, guidance: float | None = None,
                  threshold: float | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Images ``(len(prompts) * len(seeds), 3, 64, 64)`` in [0, 1], prompt-major (all seeds of prompt 0 first),
    the steps each took (LongTensor), and the wall time in seconds (text embedding, coalescer steps, VAE decode).

    Image ``k`` of a prompt starts from the pipeline's noise of seed ``k`` (:func:`pipeline_noise`).
    ``max_steps``: 1 or 2 (the model's limit); ``threshold`` None: every sample takes ``max_steps``, else a sample
    stops after a step whose direction is at least that long. ``guidance`` None: the model's default.
    ``model``: a name (``"shapes-coalescer"``), a folder or a loaded model."""
    m = load(model)
    prompts, seeds = _check_prompts_seeds(prompts, seeds)
    check_steps(m, max_steps)
    g = float(m.defaults.get("guidance_scale", 1.0) if guidance is None else guidance)
    if not math.isfinite(g) or g < 0:
        raise InvalidInput(f"guidance must be a finite number >= 0, got {guidance!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise InvalidInput(f"threshold must be a finite number or None, got {threshold!r}")
    enc = encoder()
    z = pipeline_noise(seeds)
    t0 = time.perf_counter()
    de = enc.embed(prompts).repeat_interleave(len(seeds), dim=0)
    noise = z.repeat(len(prompts), 1, 1, 1)
    images, used = [], []
    for s in range(0, noise.shape[0], batch_size):
        lat, u = sample_latents(m, de[s:s + batch_size], noise[s:s + batch_size], max_steps, g, threshold)
        images.append(enc.decode(lat))
        used.append(u)
    return torch.cat(images), torch.cat(used).long(), time.perf_counter() - t0


def sample_prompts(model="shapes-coalescer", prompt: str | list[str] | None = None,
                   num_inference_steps: int | None = None, guidance_scale: float | None = None, generator=None,
                   num_images_per_prompt: int = 1, output_type: str = "pil", adaptive_threshold: float | None = None,
                   options: dict | None = None):
    """``fastdiff.sample(model="shapes-coalescer", prompt=[...], ...)``: the pipeline's calling convention.

    Noise as diffusers' pipelines draw it: one generator for all images (``(N, 4, 16, 16)`` from it), one per
    image (``(1, 4, 16, 16)`` each), or none (the global RNG). ``output_type``: "pil" (list of PIL images), "pt"
    ((N, 3, 64, 64) in [0, 1]), "np" ((N, 64, 64, 3) float32) or "latent". ``options``: the sampler options of
    ``fastdiff.sample``; a coalescer takes none of them (a clear error rather than ignoring them)."""
    given = {k: v for k, v in (options or {}).items() if v not in (None, False)}
    if given:
        raise InvalidInput(f"a text coalescer samples without a scheduler, backend or device options; got "
                           f"{sorted(given)}")
    if output_type not in ("pil", "pt", "np", "latent"):
        raise InvalidInput(f"output_type must be 'pil', 'pt', 'np' or 'latent', got {output_type!r}")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    prompts, _ = _check_prompts_seeds(prompts, [0])
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
            or num_images_per_prompt < 1:
        raise InvalidInput(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    m = load(model)
    steps = int(m.defaults.get("num_inference_steps", 1) if num_inference_steps is None else num_inference_steps)
    check_steps(m, steps)
    g = float(m.defaults.get("guidance_scale", 1.0) if guidance_scale is None else guidance_scale)
    n = len(prompts) * num_images_per_prompt
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise InvalidInput(f"{len(generator)} generators for {n} images; give one, or one per image")
        noise = torch.cat([torch.randn((1, 4, 16, 16), generator=gen) for gen in generator])
    else:
        noise = torch.randn((n, 4, 16, 16), generator=generator)
    enc = encoder()
    de = enc.embed(prompts).repeat_interleave(num_images_per_prompt, dim=0)
    lat, _ = sample_latents(m, de, noise, steps, g)
    if output_type == "latent":
        return lat
    images = enc.decode(lat)
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]
