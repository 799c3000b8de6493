"""Backend choice for the model ops (attention, GroupNorm+SiLU, GEGLU): ``"auto"``, ``"torch"``, ``"triton"``,
``"cpp"`` or ``"cuda"``.

The rules of :mod:`fastdiff.ops.dispatch` (GUIDE section 3), per op and the kernels it has (attention and GEGLU:
Triton; GroupNorm: Triton, C++ and CUDA C++):

- ``"torch"`` always runs the plain-PyTorch reference (SDPA, ``F.group_norm`` + ``F.silu``, chunk + ``F.gelu``).
- a kernel named (``"triton"``, ``"cpp"``, ``"cuda"``) runs that kernel or raises
  :class:`~fastdiff.errors.BackendUnavailable` listing every reason (e.g. CPU tensors without
  ``TRITON_INTERPRET=1``, an unsupported dtype or head dim, a module not built, an op without that kernel).
- ``"auto"`` uses Triton only on CUDA tensors the kernel supports and falls back to the reference otherwise, logging
  the first reason once per (op, reason). (The C++ and CUDA C++ GroupNorms are chosen by name only: see
  :mod:`fastdiff.ops.groupnorm` for why.)
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

MODEL_OP_BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
#: The compiled kernels each op has (besides the torch reference); `python -m fastdiff info` prints this.
OP_KERNELS = {"attention": ("triton",), "group_norm": ("triton", "cuda", "cpp"), "geglu": ("triton",)}
_logged: set = set()


def check_backend_name(backend: str) -> None:
    if backend not in MODEL_OP_BACKENDS:
        raise UnknownBackend(f"unknown backend {backend!r} for the model ops; choose one of: "
                             f"{', '.join(MODEL_OP_BACKENDS)}")


def environment_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend``'s kernels cannot run on ``device`` at all (not installed or built, wrong device, ...)."""
    from fastdiff.ops.dispatch import BACKENDS

    return BACKENDS[backend].environment_reasons(device)


def choose(op: str, backend: str, device: torch.device, kernels: dict[str, Callable[[], list[str]]],
           auto_reasons: Callable[[], list[str]] | None = None) -> str:
    """``"torch"`` or the name of the kernel that runs one call of ``op``.

    ``kernels``: {backend name: function giving why that kernel cannot run these inputs (dtype, shape limits)} for
    each kernel the op has; ``auto_reasons()``: further reasons ``"auto"`` prefers the reference although Triton
    could run (e.g. fp32 attention)."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get("FASTDIFF_BACKEND", "")
        if env in ("torch", "triton"):
            backend = env
    if backend == "torch":
        return "torch"
    hint = f"Use backend='auto' or 'torch' for {op}."
    if backend != "auto":
        if backend not in kernels:
            raise BackendUnavailable(backend, [f"{op} has no {backend} kernel (it has: {', '.join(kernels)})"],
                                     hint=hint)
        reasons = environment_reasons(backend, device) + kernels[backend]()
        if reasons:
            raise BackendUnavailable(backend, reasons, hint=hint)
        return backend
    if device.type != "cuda":
        reasons = [f"auto uses Triton only on CUDA tensors, these are on {device}"]
    else:
        reasons = (environment_reasons("triton", device) + kernels["triton"]()
                   + (auto_reasons() if auto_reasons else []))
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

