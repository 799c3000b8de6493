"""Fused attention for UNet self- and cross-attention: ``fastdiff.ops.attention.attention``.

    out[b, h] = softmax(q[b, h] @ k[b, h]^T * scale) @ v[b, h]       (no mask, no dropout, not causal)

Backends (see :mod:`fastdiff.ops.registry`): ``"torch"`` is ``F.scaled_dot_product_attention`` (the
reference), ``"triton"`` the flash-attention kernel of :mod:`fastdiff.kernels.triton.attention`, registered as the
custom op ``fastdiff::flash_attention`` (with a fake implementation) so it works under ``torch.compile`` and in
CUDA graphs. ``"auto"`` takes Triton for fp16 / bf16 CUDA tensors with a head dim in [16, 256].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff.errors import InvalidInput
from fastdiff.ops.registry import TABLE, choose, tracing

_TRITON = TABLE["attention", "triton"]


def _out_like(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, D) output stored as (B, Lq, H, D) in memory: the caller's ``out.transpose(1, 2).reshape(B, Lq,
    H * D)`` (what every attention processor does next) is then a free view instead of a copy."""
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d)).transpose(1, 2)


def _flash_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = _out_like(q)
    _TRITON.launch_fn()(q, k, v, out, scale)
    return out


@torch.library.custom_op("fastdiff::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _flash_attention_impl(q, k, v, scale)


@_flash_attention_op.register_fake
def _(q, k, v, scale):
    return _out_like(q)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The reference: ``F.scaled_dot_product_attention`` (scale None: 1/sqrt(D), SDPA's default, passed as None
    so the call is exactly the one diffusers' ``AttnProcessor2_0`` makes)."""
    if scale is None:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInput(f"{name} must be a 4-D (batch, heads, tokens, head_dim) tensor, got {got}")
        if not t.is_floating_point():
            raise InvalidInput(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise InvalidInput(f"q, k and v must share one dtype and device; {name} is {t.dtype} on {t.device}, "
                               f"q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise InvalidInput(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise InvalidInput(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim "
                           "(B, H, L, D); broadcast or repeat heads yourself")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise InvalidInput(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}; every dim must be >= 1")
    if scale is not None and not math.isfinite(scale):
        raise InvalidInput(f"scale must be a finite number, got {scale}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Attention without mask or dropout, non-causal (inference).

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D) keys and values (one dtype and device; any strides).
        scale: the softmax scale; None means 1/sqrt(D).
        backend: ``"auto"``, ``"torch"`` (SDPA) or ``"triton"``.

    Returns (B, H, Lq, D) = softmax(q k^T · scale) v in q's dtype. The Triton path stores it as (B, Lq, H, D) in
    memory (a transposed view), so reshaping to (B, Lq, H·D) afterwards costs nothing. It is fastest when the
    strides are multiples of 16 elements (as in the (B, L, H·D) projection views of UNets, H·D = 320 / 640 /
    1280): Triton then proves 16-byte alignment and pipelines K / V loads asynchronously.
    """
    _validate(q, k, v, scale)
    if choose("attention", backend, q.device, q, k, v).backend == "torch":
        return attention_reference(q, k, v, scale)
    # The kernel needs unit stride along D (any other strides are passed through).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return (_flash_attention_op if tracing(q, k, v) else _flash_attention_impl)(q, k, v, scale)
