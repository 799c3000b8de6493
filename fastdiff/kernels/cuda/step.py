"""Launcher of the ``cuda`` backend: the fused step of ``fastdiff._C_cuda`` (csrc/cuda/step.cu)."""

from __future__ import annotations

import torch

from fastdiff import _ext
from fastdiff.kernels.compiled_args import step_args


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
    """Enqueue one fused step on the current stream of ``x.device``; same arguments and math as
    :func:`fastdiff.ops.step.step_reference`. The coefficient row stays on the device (no host sync), so the
    call can be captured in a CUDA graph. CUDA failures raise ``fastdiff._C_cuda.CudaError`` (a RuntimeError)."""
    mod = _ext.require_cuda()
    args = step_args(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range,
                     x0_limit, flag)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    mod.step(*args, torch.cuda.current_stream(x.device).cuda_stream, device)
