"""Text-to-image coalescers (``shapes-coalescer``): training on a text index, judging, and (re-exported from
:mod:`fastdiff.models.text_coalescer`) sampling prompts.

The method is the label coalescer's (:mod:`fastdiff.distill.coalescer`, the same training loop and loss); the
condition is the caption's pooled text embedding ``DE`` from the shipped ``shapes`` text encoder (frozen), the
latent space the shipped VAE's (16x16x4, scaled), and the null condition of guidance the empty prompt's embedding.
A sample: ``R = prior_scale * z`` with ``z`` the pipeline's latent noise (image ``k`` of a prompt: ``torch.randn((1,
4, 16, 16), generator=torch.Generator().manual_seed(k))``), one or two steps ``x <- x + normalize(direction) *
distance`` (guided: ``t_u + g (t_c - t_u)``), optionally stopping a sample once ``|direction| >= threshold`` (the
network is sure), then the VAE decodes the latent to a 64x64 image.

    images, steps_used, seconds = sample_images("shapes-coalescer", ["a red circle left of a blue square"],
                                                seeds=[0, 1], max_steps=2)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fastdiff.distill.coalescer import CoalescerTrainSpec, train_coalescer
from fastdiff.errors import InvalidInput
from fastdiff.models.coalescer_net import CoalescerConfig, generate
from fastdiff.models.text_coalescer import (
    encoder,
    load,
    pipeline_noise,
    sample_images,
    sample_latents,
    sample_prompts,
)
from fastdiff.models.text_coalescer_net import TextCoalescerModel, build, save_text_coalescer


def evaluate(model="shapes-coalescer", steps: int | None = None, guidance: float | None = None,
             threshold: float | None = None, seeds=None, prompts: list[str] | None = None):
    """Judge a text coalescer on the shapes judge's evaluation prompts x seeds: ``(ShapesEvalResult, mean steps
    used)``; ``steps`` / ``guidance`` None: the model's defaults."""
    from fastdiff.quality import shapes_judge as J
    from fastdiff.quality.shapes_eval import ShapesEvalResult, _device_name

    m = load(model)
    steps = int(m.defaults.get("num_inference_steps", 1) if steps is None else steps)
    g = float(m.defaults.get("guidance_scale", 1.0) if guidance is None else guidance)
    prompts = J.eval_prompts() if prompts is None else list(prompts)
    seeds = list(J.EVAL_SEEDS if seeds is None else seeds)
    images, used, seconds = sample_images(m, prompts, seeds, steps, g, threshold)
    image_prompts = [p for p in prompts for _ in seeds]
    judge = J.shipped()
    sc = J.score(judge, images, image_prompts)
    fd = J.frechet(judge, images, J.reference_images(image_prompts))
    label = model if isinstance(model, (str, os.PathLike)) else m.name
    r = ShapesEvalResult(model=str(label), steps=steps, guidance=g, one_object=sc.one_object,
                         two_object=sc.two_object, size_accuracy=sc.size_accuracy, frechet=fd,
                         ms_per_image=1000 * seconds / len(image_prompts), images=len(image_prompts),
                         backend="coalescer" if threshold is None else f"coalescer adaptive {threshold:g}",
                         device=_device_name(), errors=sc.error_rates())
    return r, float(used.float().mean())


def default_threshold(model) -> float:
    """The adaptive step count's threshold stored with ``model`` (``defaults.adaptive_threshold``: for
    ``shapes-coalescer`` the median first-step confidence on the evaluation set, so about half the samples stop
    after one step); :class:`InvalidInput` when the model records none."""
    m = load(model)
    t = m.defaults.get("adaptive_threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise InvalidInput(f"{m.name!r} records no adaptive threshold (defaults.adaptive_threshold); pass one")
    return float(t)


def metadata(model) -> dict:
    """The training metadata of ``model`` (``wall_s``: training wall time including the index build, ...) with its
    sampling ``defaults``."""
    m = load(model)
    cfg = m.model_config or {}
    return {**dict(cfg.get("metadata") or {}), "defaults": dict(m.defaults)}


# ----- training ---------------------------------------------------------------------------------------------------
def train_text_coalescer(index, out: str | os.PathLike | None, spec: CoalescerTrainSpec, *, name: str,
                         defaults: dict | None = None, **kwargs) -> TextCoalescerModel:
    """Train on a loaded :class:`~fastdiff.distill.text_coalescer_index.TextCoalescerIndex` with the label
    coalescer's loop; the saved config records ``wall_s`` = the index's build time + the training time (summed
    over resumed runs). ``kwargs``: :func:`~fastdiff.distill.coalescer.train_coalescer`'s."""
    width = int(index.embeddings.shape[1])
    if spec.embed_dim != width:
        raise InvalidInput(f"embed_dim must be the text embedding's width {width} for a text coalescer, got "
                           f"{spec.embed_dim}")
    build_s = float(_manifest_build_s(index))

    def make(sp: CoalescerTrainSpec, shape) -> TextCoalescerModel:
        c, h, w = shape
        if h != w:
            raise InvalidInput(f"coalescers take square latents, got {h}x{w}")
        cfg = CoalescerConfig(in_channels=c, sample_size=h, cross_attention_dim=width, hidden=sp.hidden,
                              depth=sp.depth, num_steps=sp.num_steps, prior_scale=float(sp.prior_scale))
        return build(cfg, index.null_embedding, name)

    def save(model, out_dir, metadata, defaults):
        meta = {**metadata, "index_build_wall_s": build_s,
                "wall_s": round(build_s + float(metadata["wall_s_train"]), 1)}
        return save_text_coalescer(model, out_dir, metadata=meta, defaults=defaults, encoders=index.encoders)

    return train_coalescer(index, out, spec, name=name, defaults=defaults, build=make, save=save, **kwargs)


def _manifest_build_s(index) -> float:
    import json

    if index.path is None:
        return 0.0
    return float(json.loads((Path(index.path) / "manifest.json").read_text()).get("build_wall_s", 0.0))


# ----- the nearest pair as the output: the method's ceiling ------------------------------------------------------
def nearest_pair_ceiling(index, desc_scale: float, prior_scale: float, prompts: list[str] | None = None,
                         seeds=None) -> dict:
    """What a perfect network would score at one exact step: for each evaluation prompt x seed, the render of the
    stored pair nearest to ``concat(desc_scale * DE(prompt), prior_scale * z)`` judged against the prompt. Returns
    the fractions fully correct, FD, and how many distinct pairs were chosen (the hub problem of the notes)."""
    import numpy as np

    from fastdiff.distill.coalescer_index import build_faiss
    from fastdiff.distill.text_coalescer_index import make_keys
    from fastdiff.models.shapes import render
    from fastdiff.quality import shapes_judge as J

    prompts = J.eval_prompts() if prompts is None else list(prompts)
    seeds = list(J.EVAL_SEEDS if seeds is None else seeds)
    enc = encoder()
    de = enc.embed(prompts).repeat_interleave(len(seeds), dim=0)
    r = prior_scale * pipeline_noise(seeds).repeat(len(prompts), 1, 1, 1)
    faiss_index = build_faiss(make_keys(index.latents, index.embeddings, desc_scale), "flat")
    q = np.ascontiguousarray(make_keys(r, de, desc_scale).numpy(), dtype=np.float32)
    picked = faiss_index.search(q, 1)[1][:, 0].tolist()
    images = torch.from_numpy(np.stack([render.example(index.spec.data_seed, i).image for i in picked]))
    images = images.permute(0, 3, 1, 2).float() / 255.0
    image_prompts = [p for p in prompts for _ in seeds]
    judge = J.shipped()
    sc = J.score(judge, images, image_prompts)
    fd = J.frechet(judge, images, J.reference_images(image_prompts))
    return {"desc_scale": desc_scale, "prior_scale": prior_scale, "one_object": sc.one_object,
            "two_object": sc.two_object, "frechet": fd, "distinct": len(set(picked)), "n": len(picked)}


__all__ = ["sample_images", "sample_prompts", "default_threshold", "metadata", "sample_latents", "load", "encoder",
           "evaluate", "generate", "train_text_coalescer", "nearest_pair_ceiling", "pipeline_noise",
           "CoalescerTrainSpec", "TextCoalescerModel"]
