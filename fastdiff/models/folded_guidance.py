"""Folded classifier-free guidance: the guidance scale as an input of the network (LCM's ``w`` embedding).

A network distilled with guidance folded in (diffusers' ``UNet2DConditionModel(time_cond_proj_dim=D)``) takes
the scale through ``timestep_cond``: a sinusoidal embedding of ``w = guidance_scale - 1`` (LCM's convention, where
``guided = cond + w (cond - uncond)``, i.e. standard CFG at ``guidance_scale = w + 1``), projected by the UNet's
``time_embedding.cond_proj`` and added to the timestep features. One network call per step, no CFG batch.

Model folders of such students state what they were trained for in ``config.json`` ``"limits"``:
``{"guidance_scale": [lo, hi], "max_inference_steps": N}``; :func:`check_limits` refuses anything outside.
"""

from __future__ import annotations

import math

import torch

from fastdiff.errors import InvalidInput


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(len(w), embedding_dim)`` sinusoidal embedding of ``w * 1000``, as diffusers' LCM pipelines'
    ``get_guidance_scale_embedding`` (the same numbers: a student trained here samples in diffusers too)."""
    if w.dim() != 1:
        raise InvalidInput(f"w must be 1-D (one guidance value per sample), got shape {tuple(w.shape)}")
    if embedding_dim < 4:
        raise InvalidInput(f"embedding_dim must be >= 4 (sin and cos of at least two frequencies), got {embedding_dim}")
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs.to(w.device)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def folded_guidance_cond(guidance_scale: float, batch: int, embedding_dim: int, device, dtype) -> torch.Tensor:
    """``timestep_cond`` for ``batch`` samples at ``guidance_scale`` (embedding of ``guidance_scale - 1``)."""
    w = torch.full((batch,), float(guidance_scale) - 1.0, dtype=torch.float32)
    return guidance_scale_embedding(w, embedding_dim).to(device=device, dtype=dtype)


def check_limits(model, num_inference_steps: int, guidance_scale: float) -> None:
    """Raise :class:`InvalidInput` when ``model`` (a loaded model folder with ``limits``) is asked for more steps
    or another guidance scale than it was trained for. Models without limits accept anything."""
    check_limits_of(getattr(model, "limits", None) or {}, getattr(model, "name", "this model"), num_inference_steps,
                    guidance_scale)


def check_limits_of(limits: dict, name, num_inference_steps: int, guidance_scale: float) -> None:
    """:func:`check_limits` for ``limits`` held elsewhere than on a model (a pipeline attribute, an export
    manifest); ``name`` names the model in the message."""
    max_steps = limits.get("max_inference_steps")
    if max_steps is not None and num_inference_steps > max_steps:
        raise InvalidInput(f"{name!r} supports at most {max_steps} inference steps, got {num_inference_steps} "
                           f"({limits.get('why_max_steps', 'the most it was checked at')}); use 1 to {max_steps}")
    g_range = limits.get("guidance_scale")
    if g_range is not None:
        lo, hi = float(g_range[0]), float(g_range[1])
        if not lo <= guidance_scale <= hi:
            raise InvalidInput(f"{name!r} was trained for guidance_scale in [{lo:g}, {hi:g}] (folded into the "
                               f"network, one call per step), got {guidance_scale:g}; pick a value in that range")
