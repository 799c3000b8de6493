"""Classifier-free guidance math of the sampler step, in plain PyTorch: the guided output and the two per-sample
reductions that some steps need before the fused update.

    m = u + g * (c - u)                                  the guided model output (unconditional half u first)
    f = r * std(c) / std(m) + (1 - r)                    guidance rescale factor per sample (diffusers'
                                                         ``rescale_noise_cfg``), handed to the step as ``m_scale``
    s = clamp(quantile(|x0|, ratio), 1, max_value)       dynamic-thresholding limit per sample (Imagen), handed to
                                                         the step as ``x0_limit``

``guided_output`` is also the first line of the step reference (:func:`fastdiff.ops.step.step_reference`); the two
reductions run between the model call and the fused step, since they need the whole sample first. Nothing here
reads a tensor on the host, so they are CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from fastdiff.schedulers.plan import Col, Thresholding


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The arithmetic precision of the references: float64 for float64 inputs, else float32 (as the kernels)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def guided_output(model_out: torch.Tensor, batch: int, guidance_scale: float, cfg: bool) -> torch.Tensor:
    """m = u + g * (c - u) over the (2B, ...) CFG batch (unconditional half first), in compute precision."""
    ct = compute_dtype(model_out)
    if not cfg:
        return model_out.to(ct)
    u, c = model_out[:batch].to(ct), model_out[batch:].to(ct)
    return u + guidance_scale * (c - u)


def guidance_rescale_factors(model_out: torch.Tensor, batch: int, g: float, r: float) -> torch.Tensor:
    """Per-sample factor f with ``m * f`` equal to diffusers' ``rescale_noise_cfg(m, c, r)``:
    f = r * std(c) / std(m) + (1 - r), std over all but the batch dim (unbiased, as torch.std). (B,) float32."""
    u, c = model_out[:batch].float(), model_out[batch:].float()
    m = u + g * (c - u)
    dims = list(range(1, m.dim()))
    return (r * c.std(dim=dims) / m.std(dim=dims) + (1.0 - r)).float()


def threshold_limits(x0: torch.Tensor, spec: Thresholding) -> torch.Tensor:
    """Per-sample limits ``s = clamp(quantile(|x0[b]|, ratio), 1, max_value)``, as diffusers' ``_threshold_sample``.

    Args:
        x0: (B, *S) x0 prediction (any float dtype; fp16 / bf16 are upcast to float32 as diffusers does).
        spec: the plan's :class:`~fastdiff.schedulers.plan.Thresholding` (``ratio``, ``max_value``).

    Returns:
        (B,) float32 tensor on x0's device, each in [1, max_value].
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), spec.ratio, dim=1)
    return s.clamp(min=1, max=spec.max_value).to(torch.float32)


def step_threshold_limits(model_out: torch.Tensor, x: torch.Tensor, row: torch.Tensor, batch: int, g: float,
                          cfg: bool, m_scale: torch.Tensor | None, spec: Thresholding) -> torch.Tensor:
    """The ``x0_limit`` of one thresholded step: the step's x0 prediction ``PX * x + PM * m`` (``row``: its
    coefficient row, ``m`` the guided, optionally rescaled output), reduced by :func:`threshold_limits`."""
    m = guided_output(model_out, batch, g, cfg)
    if m_scale is not None:
        m = m * m_scale.view(-1, *([1] * (m.dim() - 1)))
    x0 = row[Col.PX].float() * x.float() + row[Col.PM].float() * m
    return threshold_limits(x0, spec)
