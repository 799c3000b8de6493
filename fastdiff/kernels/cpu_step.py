"""Launcher of the ``cpp`` backend: the fused step of ``fastdiff._C_cpu`` (csrc/cpu/step.cpp, OpenMP)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels._common import step_args


def launch(
    model_out: torch.Tensor,
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: float = 1.0,
    cfg: bool = False,
    hist: torch.Tensor | None = None,
    saved: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    next_in: torch.Tensor | None = None,
    m_scale: torch.Tensor | None = None,
    clip_range: float | None = None,
    x0_limit: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
) -> None:
    """One fused step on contiguous CPU tensors; same arguments and math as
    :func:`fastdiff.ops.reference.step_reference`. Uses ``torch.get_num_threads()`` OpenMP threads."""
    mod = _ext.require_cpu()
    args = step_args(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range,
                     x0_limit, flag)
    mod.step(*args, torch.get_num_threads())
