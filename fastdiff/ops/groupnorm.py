"""GroupNorm with an optional fused input add and SiLU: ``fastdiff.ops.groupnorm.group_norm``.

    z = x + add[:, :, None, ...]                        (when ``add`` (N, C) is given: a ResnetBlock's time embedding)
    y = GroupNorm(z; num_groups, weight, bias, eps)     (statistics per sample and group, biased variance)
    y = y * sigmoid(y)                                  (when ``silu``)

Backends (see :mod:`fastdiff.ops.registry`): ``"torch"`` is ``F.group_norm`` (+ ``F.silu``), exactly what
diffusers runs; ``"triton"`` the two-pass kernel of :mod:`fastdiff.kernels.triton.groupnorm`; ``"cuda"`` the CUDA
C++ kernel of csrc/cuda/groupnorm.cu (same two-launch plan, 16-byte vectors); ``"cpp"`` the C++ / OpenMP kernel of
csrc/cpu/groupnorm.cpp for CPU tensors. All run through the custom op ``fastdiff::group_norm`` (with a fake
implementation) under ``torch.compile`` and in CUDA graphs. Any (N, C, *) layout whose spatial dims flatten to one
stride runs in place (NCHW, channels-last); the output keeps the input's memory format.

``"auto"`` picks Triton on CUDA and the reference elsewhere. The compiled kernels are chosen by name: the CUDA one
has not yet been measured against Triton on a GPU, and on CPU ``"cpp"`` changes the result's rounding (fp32
statistics in another order), while ``auto`` on CPU keeps an optimized model bit-identical to the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.errors import InvalidInput
from fastdiff.ops.registry import TABLE, choose, tracing

# The cpp / cuda availability checks must not import anything inside a torch.compile trace (dynamo refuses
# importlib): load the compiled modules (a few ms, never raises) before any trace can ask.
_ext.load_all()


def _as_ncl(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> an (N, C, L) view (L = prod of the spatial dims, 1 for (N, C))."""
    return t.view(t.shape[0], t.shape[1], -1)


def _flattenable(t: torch.Tensor) -> bool:
    try:
        _as_ncl(t)
        return True
    except RuntimeError:
        return False


def _group_norm_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     add: torch.Tensor | None, num_groups: int, eps: float, silu: bool,
                     backend: str = "triton") -> torch.Tensor:
    launch = TABLE["group_norm", backend].launch_fn()
    if backend != "triton":  # the compiled kernels read weight and bias contiguous, in one dtype
        if weight is not None and bias is not None and weight.dtype != bias.dtype:
            weight, bias = weight.float(), bias.float()
        weight = None if weight is None else weight.contiguous()
        bias = None if bias is None else bias.contiguous()
    y = torch.empty_like(x)  # same strides as x (dense x): channels-last stays channels-last
    launch(_as_ncl(x), weight, bias, add, _as_ncl(y), num_groups, eps, silu)
    return y


@torch.library.custom_op("fastdiff::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, add: torch.Tensor | None,
                   num_groups: int, eps: float, silu: bool, backend: str) -> torch.Tensor:
    return _group_norm_impl(x, weight, bias, add, num_groups, eps, silu, backend)


@_group_norm_op.register_fake
def _(x, weight, bias, add, num_groups, eps, silu, backend):
    return torch.empty_like(x)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False,
                         add: torch.Tensor | None = None) -> torch.Tensor:
    """The reference, op for op what diffusers runs: ``x + add[..., None, None]``, ``F.group_norm``, ``F.silu``."""
    if add is not None:
        x = x + add.view(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _validate(x, num_groups, weight, bias, eps, add) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInput(f"x must be an (N, C, *) tensor, got {got}")
    if not x.is_floating_point():
        raise InvalidInput(f"x must be a floating-point tensor, got {x.dtype}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise InvalidInput(f"num_groups must be a positive divisor of the channel count C={c}, got {num_groups!r}")
    if x.numel() == 0:
        raise InvalidInput(f"x is empty, shape {tuple(x.shape)}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise InvalidInput(f"eps must be a finite number >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != x.device or not t.is_floating_point()):
            raise InvalidInput(f"{name} must be a floating-point ({c},) tensor on {x.device}, got {t.dtype} "
                               f"{tuple(t.shape)} on {t.device}")
    if add is not None and (add.shape != x.shape[:2] or add.device != x.device or not add.is_floating_point()):
        raise InvalidInput(f"add must be a floating-point {tuple(x.shape[:2])} (N, C) tensor on {x.device}, got "
                           f"{add.dtype} {tuple(add.shape)} on {add.device}")


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, silu: bool = False, add: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """GroupNorm (+ SiLU) of ``x`` (N, C, *), optionally of ``x + add[:, :, None, ...]``.

    Args:
        x: (N, C, *) input, NCHW, channels-last or any strides (fp16 / bf16 / fp32 on the Triton path).
        num_groups: G, a divisor of C; statistics are taken over the C/G channels and all positions of a group.
        weight, bias: (C,) affine parameters or None.
        eps: added to the variance.
        silu: apply y * sigmoid(y) to the normalised output.
        add: (N, C) per-sample, per-channel values added to x before the statistics (a ResnetBlock's time
            embedding), or None.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` (CUDA tensors) or ``"cpp"`` (CPU tensors).

    Returns y with x's shape, dtype and memory format.
    """
    _validate(x, num_groups, weight, bias, eps, add)
    which = choose("group_norm", backend, x.device, x, num_groups, weight, bias, add).backend
    if which == "torch":
        return group_norm_reference(x, num_groups, weight, bias, eps, silu, add)
    if not _flattenable(x):
        x = x.contiguous()
    if tracing(x, weight, bias, add):
        return _group_norm_op(x, weight, bias, add, int(num_groups), float(eps), bool(silu), which)
    return _group_norm_impl(x, weight, bias, add, int(num_groups), float(eps), bool(silu), which)
