"""Launcher of the ``cpp`` backend: the fused step of ``fastdiff._C_cpu`` (csrc/cpu/step.cpp, OpenMP)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels.compiled_args import step_args

# One thread streams ~25 GB/s here (SDXL x4 fp32, DPM++ 2M with CFG: 0.36 ms for 9.4 MB on 1 thread). With 2
# OpenMP threads on a 2-core machine where another process holds a core, the same step took 8 ms (threads wait for
# a descheduled peer at the barrier), so threads are only worth it when each gets a large slice of work.
GRAIN = 1 << 20


def threads_for(numel: int) -> int:
    """OpenMP threads for a step over ``numel`` elements: one per GRAIN elements, at most torch's thread count."""
    return max(1, min(torch.get_num_threads(), numel // GRAIN))


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
    :func:`fastdiff.ops.step.step_reference`. Uses up to ``torch.get_num_threads()`` OpenMP threads, one
    per ``GRAIN`` elements (see :func:`threads_for`)."""
    mod = _ext.require_cpu()
    args = step_args(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range,
                     x0_limit, flag)
    mod.step(*args, threads_for(x.numel()))
