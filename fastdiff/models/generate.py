"""Deterministic per-sample generation: sample ``i`` always gets the same noise and label, whatever the batch.

``sample_seed(base_seed, i)`` mixes the two integers (SplitMix64), ``make_noise`` draws sample ``i``'s starting
noise from its own ``torch.Generator``, so generated sets do not depend on how they are split into batches,
shards, processes or machines. ``generate`` runs the sampler (``fastdiff.Sampler``) on given noise and labels.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of sample ``index`` under ``base_seed``: SplitMix64 of ``base_seed * 2^32 + index``, as a 63-bit int."""
    z = ((int(base_seed) << 32) + int(index) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


#: the noise stream of ``python -m fastdiff sample`` (and of ``serve``, so served and sampled images match)
SAMPLE_STREAM = "sample"
#: noise index of the j-th image of label k in that stream: ``k * LABEL_STRIDE + j`` (room for 10000 per label), so
#: an image does not depend on which other labels were asked for
LABEL_STRIDE = 10000


def stream_seed(seed: int, stream: str) -> int:
    """A base seed for a named stream (``"eval"``, ``"sample"``) derived from ``seed``: evaluation and the sample
    command never reuse the noise of distillation triplets, which use ``seed`` itself."""
    return sample_seed(seed, 0x100000000 - 1 - zlib.crc32(stream.encode()) % 0x10000)


def make_noise(base_seed: int, indices: Sequence[int] | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Starting noise ``(len(indices), *shape)`` float32 on CPU; row ``j`` is ``randn(shape)`` seeded by
    ``sample_seed(base_seed, indices[j])``."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    g = torch.Generator()
    for j, i in enumerate(torch.as_tensor(indices).tolist()):
        g.manual_seed(sample_seed(base_seed, i))
        out[j] = torch.randn(tuple(shape), generator=g)
    return out


def balanced_labels(indices: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label of sample ``i`` is ``i % num_classes`` (every run of ``num_classes`` indices covers all classes)."""
    return torch.as_tensor(indices).long() % num_classes


def resolve_scheduler(model, scheduler=None):
    """The scheduler to sample ``model`` with: ``None`` is the model's default scheduler name
    (``model.defaults["scheduler"]``), else its scheduler config; anything else is passed on as given. A name takes
    the model's noise schedule and prediction type from ``model.scheduler_config`` inside :class:`fastdiff.Sampler`
    (as diffusers' ``from_config`` does)."""
    if scheduler is None:
        scheduler = (getattr(model, "defaults", None) or {}).get("scheduler")
    return scheduler


def make_sampler(model, scheduler=None, backend: str = "auto", device=None, compile: bool = False):
    """A ``fastdiff.Sampler`` for ``model`` (name, path or LabelConditionedUNet); see :func:`resolve_scheduler`.
    ``compile``: ``Sampler(..., compile=True)``."""
    from fastdiff.models import load
    from fastdiff.sampler import Sampler

    if isinstance(model, str):
        model = load(model)
    return Sampler(model, scheduler=resolve_scheduler(model, scheduler), backend=backend, device=device,
                   compile=compile)


@torch.no_grad()
def generate(sampler, labels: torch.Tensor, noise: torch.Tensor, num_inference_steps: int,
             guidance_scale: float, batch_size: int | None = None, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """Final samples ``(B, C, H, W)`` (in [-1, 1] for pixel models) for ``labels (B,)`` from ``noise (B, C, H, W)``.

    Runs ``sampler.sample(..., output_type="latent")`` in chunks of ``batch_size`` (default: all at once).
    Deterministic samplers (no per-step noise) give per-sample results independent of the chunking up to
    floating-point batch effects; callers that need bit-exact sets keep the chunks fixed (shards).
    ``generator``: draws the per-step noise of stochastic samplers (``lcm``, ``euler_a``), chunk after chunk.
    """
    dev, dtype = sampler.device, sampler.dtype
    bs = batch_size or len(labels)
    outs = []
    for s in range(0, len(labels), bs):
        x = sampler.sample(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           class_labels=labels[s:s + bs].to(dev), latents=noise[s:s + bs].to(dev, dtype),
                           output_type="latent", progress=False, generator=generator)
        outs.append(x.float().cpu())
    return torch.cat(outs) if outs else noise.new_empty((0, *noise.shape[1:]))
