"""GEGLU in one pass, in Triton: split the feed-forward projection and gate it.

    h, gate = x[..., :F], x[..., F:]                 x: (M, 2F) (the projection output), y: (M, F)
    y = h * gelu(gate)                               gelu(z) = z/2 · (1 + erf(z/√2))
                                                     or, approximate="tanh": z/2 · (1 + tanh(√(2/π)(z + 0.044715 z³)))

Eager PyTorch (diffusers' ``GEGLU``) runs gelu(gate) -> temporary, then h * temporary: it reads 3F and writes 2F
per row, in two launches and with an extra fp16 rounding; here one launch reads 2F and writes F, with fp32 math.

Floor: 3·M·F·s bytes (s bytes per element) at copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels.triton.twin import interpreting, twin

APPROXIMATIONS = ("none", "tanh")


@twin()
def _geglu_kernel(
    x_ptr, y_ptr, M, F, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, TANH: tl.constexpr,
):
    # No calls to jit functions in here (see twin.py). The last dim of x and y has stride 1.
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (offs_m < M)[:, None] & (offs_f < F)[None, :]
    h_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_f[None, :]
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(z) = 1 - 2 / (exp(2z) + 1): exact limits at ±inf (no tanh builtin that the interpreter also has)
        t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
        gelu = 0.5 * g * (1.0 + t)
    else:
        gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    y = h * gelu
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_f[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def config(m: int, f: int, interpret: bool) -> dict:
    """Tile sizes: ~4096 outputs per program (16 per thread at 8 warps), as wide along F as F allows."""
    if interpret:
        return dict(BLOCK_M=4, BLOCK_F=min(16, triton.next_power_of_2(f)), num_warps=1)
    block_f = min(1024, triton.next_power_of_2(f))
    block_m = max(1, min(triton.next_power_of_2(m), 4096 // block_f))
    return dict(BLOCK_M=block_m, BLOCK_F=block_f, num_warps=8 if block_m * block_f >= 4096 else 4)


def launch(x: torch.Tensor, y: torch.Tensor, approximate: str = "none") -> None:
    """y = x[:, :F] * gelu(x[:, F:]) for 2-D ``x`` (M, 2F) and ``y`` (M, F) whose last dims have stride 1.

    Shapes are checked by :func:`fastdiff.ops.geglu.geglu`; here only the launch."""
    m, f = y.shape
    cfg = config(m, f, interpreting())
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(f, cfg["BLOCK_F"]))
    args = (x, y, m, f, x.stride(0), y.stride(0))
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _geglu_kernel[grid](*args, TANH=approximate == "tanh", **cfg)
    else:
        _geglu_kernel[grid](*args, TANH=approximate == "tanh", **cfg)
