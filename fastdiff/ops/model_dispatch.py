"""Backend choice for the model ops (attention, GroupNorm+SiLU, GEGLU): ``"auto"``, ``"torch"`` or ``"triton"``.

The rules of :mod:`fastdiff.ops.dispatch` (GUIDE section 3), for ops whose only fast backend is Triton:

- ``"torch"`` always runs the plain-PyTorch reference (SDPA, ``F.group_norm`` + ``F.silu``, chunk + ``F.gelu``).
- ``"triton"`` runs the Triton kernel or raises :class:`~fastdiff.errors.BackendUnavailable` listing every reason
  (e.g. CPU tensors without ``TRITON_INTERPRET=1``, an unsupported dtype or head dim).
- ``"auto"`` uses Triton only on CUDA tensors the kernel supports and falls back to the reference otherwise, logging
  the first reason once per (op, reason).
- ``FASTDIFF_BACKEND=torch|triton`` in the environment overrides ``"auto"`` (other values name step backends and
  leave these ops on ``"auto"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from fastdiff.errors import BackendUnavailable, UnknownBackend

log = logging.getLogger("fastdiff")

MODEL_OP_BACKENDS = ("auto", "torch", "triton")
_logged: set = set()


def check_backend_name(backend: str) -> None:
    if backend not in MODEL_OP_BACKENDS:
        raise UnknownBackend(f"unknown backend {backend!r} for the model ops; choose one of: "
                             f"{', '.join(MODEL_OP_BACKENDS)}")


def triton_environment_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device`` at all (not installed, CPU without the interpreter, ...)."""
    from fastdiff.ops.dispatch import BACKENDS

    return BACKENDS["triton"].environment_reasons(device)


def choose(op: str, backend: str, device: torch.device, input_reasons: Callable[[], list[str]],
           auto_reasons: Callable[[], list[str]] | None = None) -> str:
    """``"torch"`` or ``"triton"`` for one call of ``op``.

    ``input_reasons()``: why the Triton kernel cannot run these inputs (dtype, shape limits); ``auto_reasons()``:
    further reasons ``"auto"`` prefers the reference although Triton could run (e.g. fp32 attention)."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get("FASTDIFF_BACKEND", "")
        if env in ("torch", "triton"):
            backend = env
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reasons = triton_environment_reasons(device) + input_reasons()
        if reasons:
            raise BackendUnavailable("triton", reasons, hint=f"Use backend='auto' or 'torch' for {op}.")
        return "triton"
    if device.type != "cuda":
        reasons = [f"auto uses Triton only on CUDA tensors, these are on {device}"]
    else:
        reasons = triton_environment_reasons(device) + input_reasons() + (auto_reasons() if auto_reasons else [])
    if not reasons:
        return "triton"
    key = (op, reasons[0])
    if key not in _logged:
        _logged.add(key)
        log.info("fastdiff: %s runs the PyTorch reference (%s)", op, reasons[0])
    return "torch"


def grad_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """The Triton kernels are forward-only: auto keeps autograd-tracked calls on the reference."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ["an input requires grad and the Triton kernels are forward-only (run under torch.no_grad())"]
    return []


def tracing(*tensors: torch.Tensor | None) -> bool:
    """Whether this call is being traced (torch.compile, make_fx, fake tensors), so the Triton path must go through
    its registered custom op. Eager calls skip the custom-op dispatcher (some microseconds per call, hundreds of
    calls per UNet forward) and launch the kernel directly: same kernel, same result."""
    if torch.compiler.is_compiling():
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)

