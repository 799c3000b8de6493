"""Launcher of the ``cuda`` GroupNorm: ``fastdiff._C_cuda.group_norm`` (csrc/cuda/groupnorm.cu)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels.compiled_args import group_norm_args


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, add: torch.Tensor | None,
           y: torch.Tensor, groups: int, eps: float, silu: bool) -> None:
    """Enqueue y = GroupNorm(x + add[:, :, None]) (then SiLU) on the current stream of ``x.device``, for (N, C, L)
    CUDA views of any strides; the signature of :func:`fastdiff.kernels.triton.groupnorm.launch`. The statistics
    workspace comes from torch's caching allocator on that stream, so the call can be captured in a CUDA graph.
    CUDA failures raise ``fastdiff._C_cuda.CudaError`` (a RuntimeError)."""
    mod = _ext.require_cuda()
    workspace = torch.empty(x.shape[0] * groups * mod.GROUP_NORM_WORKSPACE_PER_GROUP, dtype=torch.float32,
                            device=x.device)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    mod.group_norm(*group_norm_args(x, y, weight, bias, add, groups, eps, silu), workspace.data_ptr(),
                   workspace.numel(), torch.cuda.current_stream(x.device).cuda_stream, device)
