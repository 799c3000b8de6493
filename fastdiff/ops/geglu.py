"""GEGLU's split-and-gate in one pass: ``fastdiff.ops.geglu.geglu``.

    h, gate = x.chunk(2, dim=-1)          x: (..., 2F), the feed-forward projection's output
    y = h * gelu(gate)                    y: (..., F); gelu exact (erf) or approximate="tanh"

Backends (see :mod:`fastdiff.ops.registry`): ``"torch"`` is exactly diffusers' ``GEGLU`` after its
projection (``chunk`` + ``F.gelu`` + multiply); ``"triton"`` the one-pass kernel of
:mod:`fastdiff.kernels.triton.geglu`, registered as the custom op ``fastdiff::geglu`` (with a fake
implementation) for ``torch.compile`` and CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.errors import InvalidInput
from fastdiff.ops.registry import TABLE, choose, tracing

_TRITON = TABLE["geglu", "triton"]
APPROXIMATIONS = ("none", "tanh")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., 2F) -> a 2-D (M, 2F) view with unit stride along the last dim (a copy only when no such view exists)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-1])


def _geglu_impl(x: torch.Tensor, approximate: str) -> torch.Tensor:
    y = x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))
    _TRITON.launch_fn()(_rows(x), y.view(-1, y.shape[-1]), approximate)
    return y


@torch.library.custom_op("fastdiff::geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return _geglu_impl(x, approximate)


@_geglu_op.register_fake
def _(x, approximate):
    return x.new_empty(x.shape[:-1] + (x.shape[-1] // 2,))


def geglu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """The reference, op for op what diffusers' ``GEGLU`` runs after its projection."""
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate, approximate=approximate)


def _validate(x: torch.Tensor, approximate: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInput(f"x must be a (..., 2F) tensor, got {got}")
    if not x.is_floating_point():
        raise InvalidInput(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] < 2 or x.shape[-1] % 2:
        raise InvalidInput(f"the last dim of x must be even (2F: value half, then gate half), got shape "
                           f"{tuple(x.shape)}")
    if x.numel() == 0:
        raise InvalidInput(f"x is empty, shape {tuple(x.shape)}")
    if approximate not in APPROXIMATIONS:
        raise InvalidInput(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def geglu(x: torch.Tensor, approximate: str = "none", backend: str = "auto") -> torch.Tensor:
    """y = x[..., :F] * gelu(x[..., F:]) for x (..., 2F); returns (..., F) in x's dtype (contiguous).

    Args:
        x: (..., 2F) the projection output (any strides).
        approximate: ``"none"`` (erf GELU, diffusers' default) or ``"tanh"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """
    _validate(x, approximate)
    if choose("geglu", backend, x.device, x).backend == "torch":
        return geglu_reference(x, approximate)
    return (_geglu_op if tracing(x) else _geglu_impl)(x, approximate)
