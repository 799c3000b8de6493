"""Dynamic thresholding limits (Imagen, Saharia et al. 2022), the per-sample reduction of a thresholded step.

The fused step clamps x0 to [-s, s] and divides by s when given these limits (``x0_limit``); computing s needs the
x0 prediction of the whole sample first, so the sampler runs this reduction between CFG and the fused update.
"""

from __future__ import annotations

import torch

from fastdiff.schedulers.plan import Thresholding


def threshold_limits(x0: torch.Tensor, spec: Thresholding) -> torch.Tensor:
    """Per-sample limits ``s = clamp(quantile(|x0[b]|, ratio), 1, max_value)``, as diffusers' ``_threshold_sample``.

    Args:
        x0: (B, *S) x0 prediction (any float dtype; fp16 / bf16 are upcast to float32 as diffusers does).
        spec: the plan's :class:`Thresholding` (``ratio``, ``max_value``).

    Returns:
        (B,) float32 tensor on x0's device, each in [1, max_value].
    """
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), spec.ratio, dim=1)
    return s.clamp(min=1, max=spec.max_value).to(torch.float32)
