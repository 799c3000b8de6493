"""Launcher of the ``cpp`` GroupNorm: ``fastdiff._C_cpu.group_norm`` (csrc/cpu/groupnorm.cpp, OpenMP)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels._common import group_norm_args

# Elements per OpenMP thread below which one thread does the whole call (fork / join and the wake-up of a peer
# that another process may hold cost more than a slice this size; see the note in cpu_step.py).
GRAIN = 1 << 16


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, add: torch.Tensor | None,
           y: torch.Tensor, groups: int, eps: float, silu: bool) -> None:
    """y = GroupNorm(x + add[:, :, None]) (then SiLU) for (N, C, L) CPU views ``x`` / ``y`` of any strides; the
    signature of :func:`fastdiff.kernels.triton.groupnorm.launch`. Inputs are checked by
    :func:`fastdiff.ops.groupnorm.group_norm`."""
    mod = _ext.require_cpu()
    threads = max(1, min(torch.get_num_threads(), x.numel() // GRAIN))
    mod.group_norm(*group_norm_args(x, y, weight, bias, add, groups, eps, silu), threads)
