"""(prompt, noise, teacher latent) triplets of a text-to-image pipeline (``shapes``) for one-step distillation.

The machinery is :mod:`fastdiff.distill.triplets`' (atomic shards, a manifest of settings and sha256, a restart
skips good shards and regenerates bad ones, one batch per shard so the bytes do not depend on who computes them);
only what a sample is differs. Sample ``i``:

* its caption: the caption of example ``i`` of the teacher's training stream with seed ``caption_seed``
  (:func:`caption_of`: ``render.random_scene`` then ``captions.describe`` with ``render.rng_for(caption_seed, i)``,
  without drawing the image): the same distribution of one- and two-object scenes and wordings the teacher
  learned from. Stored as the token ids the pipeline's tokenizer makes (``input_ids (N, 24)``; decode with the
  tokenizer, or recompute the text with :func:`caption_of`);
* its noise: ``make_noise(seed, [i], (4, 16, 16))`` (``noise``), the starting latent of the teacher's loop;
* its target: the teacher's final *latent* (``latent``, before the VAE; the student predicts latents) from
  fastdiff's loop (``fastdiff.Sampler`` on the pipeline, its own DPM-Solver++) at ``num_inference_steps`` and
  ``guidance_scale`` (the teacher's defaults: 20 steps, CFG 5).

    python -m fastdiff distill generate-text --teacher shapes --out runs/shapes-triplets -n 12288 --threads 1
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff._atomic import check_writable
from fastdiff.distill.triplets import (
    MANIFEST,
    TripletSpec,
    _check_manifest,
    _write_manifest,
    pending_shards,
    record_and_merge,
    save_shard,
)
from fastdiff.models.generate import make_noise
from fastdiff.models.shapes.train_unet import tokenize

#: the scheduler entry of a text triplet spec: the pipeline's own scheduler (``pipe.scheduler``)
PIPELINE_SCHEDULER = "pipeline"


@dataclass
class TextTripletSpec(TripletSpec):
    """:class:`TripletSpec` for a text-to-image teacher: ``caption_seed`` picks the captions, ``p_two`` the share
    of two-object scenes (the teacher's training stream: 0.5)."""

    teacher: str = "shapes"
    num_samples: int = 12288
    shard_size: int = 256
    scheduler: str = PIPELINE_SCHEDULER
    guidance_scale: float = 5.0
    caption_seed: int = 0
    p_two: float = 0.5


def caption_of(caption_seed: int, index: int, p_two: float = 0.5) -> str:
    """The caption of example ``index`` of the ``shapes`` training stream ``caption_seed`` (as
    ``render.example(caption_seed, index, p_two).caption``, without rendering the image)."""
    from fastdiff.models.shapes import render

    return render.describe_example(caption_seed, index, p_two)[1]


def teacher_latents(sampler, pipe, captions: list[str], noise: torch.Tensor, spec: TextTripletSpec) -> torch.Tensor:
    """The teacher's final latents for ``captions`` from ``noise`` (fastdiff's loop, the pipeline's scheduler)."""
    return sampler.sample(prompt=captions, latents=noise.to(pipe.device), num_inference_steps=spec.num_inference_steps,
                          guidance_scale=spec.guidance_scale, output_type="latent", progress=False).float().cpu()


def generate_text_shards(spec: TextTripletSpec, out: str | os.PathLike, pipe=None, backend: str = "auto",
                         progress: bool = True, fail_after: int | None = None) -> list[int]:
    """Generate the missing or bad shards of ``out`` (one process); returns the shard indices written.

    ``pipe``: the loaded teacher pipeline (default: ``load_pipeline(spec.teacher)``). ``fail_after`` (testing):
    raise ``SystemExit(17)`` after writing that many shards, as a crash would."""
    from tqdm.auto import tqdm

    import fastdiff

    out = Path(out)
    records = _check_manifest(out, spec)
    todo = pending_shards(spec, out, records)
    if not todo:
        return []
    if pipe is None:
        from fastdiff.models import load_pipeline

        pipe = load_pipeline(spec.teacher)
    sampler = fastdiff.Sampler(pipe, backend=backend)
    latent_shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    written = []
    for k in tqdm(todo, desc="text triplets", disable=not progress, mininterval=2.0):
        idx = torch.tensor(list(spec.shard_range(k)))
        captions = [caption_of(spec.caption_seed, i, spec.p_two) for i in idx.tolist()]
        noise = make_noise(spec.seed, idx, latent_shape)
        latent = teacher_latents(sampler, pipe, captions, noise, spec)
        save_shard(spec, out, k, {"index": idx, "input_ids": tokenize(pipe.tokenizer, captions), "noise": noise,
                                  "latent": latent}, records)
        written.append(k)
        if fail_after is not None and len(written) >= fail_after:
            raise SystemExit(17)
    return written


def run(spec: TextTripletSpec, out: str | os.PathLike, pipe=None, backend: str = "auto", progress: bool = True,
        fail_after: int | None = None) -> Path:
    """Check the settings, generate every missing shard, record them all and merge: returns the merged file."""
    out = Path(out)
    spec.check()
    check_writable(out, "dir", what="--out")
    _check_manifest(out, spec)  # refuse other settings before loading anything
    if pipe is None:
        from fastdiff.models import load_pipeline

        pipe = load_pipeline(spec.teacher)  # a mistyped teacher fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        _write_manifest(out, spec, {})
    t0 = time.time()
    written = generate_text_shards(spec, out, pipe=pipe, backend=backend, progress=progress, fail_after=fail_after)
    if progress:
        print(f"wrote {len(written)} shards in {time.time() - t0:.1f}s "
              f"({torch.get_num_threads()} threads)", flush=True)
    return record_and_merge(spec, out)
