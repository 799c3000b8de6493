"""Launcher of the ``cpp`` GroupNorm: ``fastdiff._C_cpu.group_norm`` (csrc/cpu/groupnorm.cpp, OpenMP)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels.compiled_args import group_norm_args

# Elements per OpenMP thread: one thread per GRAIN elements, up to torch's thread count. 16 K: at the digits model's
# 20x64x8x8 (82 K elements) two threads took 140 us against 232 us for one (1 << 16 kept it on one thread); a
# smaller grain (4 K) bought nothing measurable.
GRAIN = 1 << 14


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, add: torch.Tensor | None,
           y: torch.Tensor, groups: int, eps: float, silu: bool) -> None:
    """y = GroupNorm(x + add[:, :, None]) (then SiLU) for (N, C, L) CPU views ``x`` / ``y`` of any strides; the
    signature of :func:`fastdiff.kernels.triton.groupnorm.launch`. Inputs are checked by
    :func:`fastdiff.ops.groupnorm.group_norm`."""
    mod = _ext.require_cpu()
    threads = max(1, min(torch.get_num_threads(), x.numel() // GRAIN))
    mod.group_norm(*group_norm_args(x, y, weight, bias, add, groups, eps, silu), threads)
