"""Backend registry for the fused step (GUIDE section 3).

Each backend declares what it can run and answers :meth:`StepBackend.not_supported_reasons`. ``backend="auto"``
takes the first backend of the device's preference list with no reasons (falling back is logged once); a backend
asked for by name that cannot run raises :class:`~fastdiff.errors.BackendUnavailable` listing every reason.
``FASTDIFF_BACKEND`` in the environment overrides ``"auto"``.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

from fastdiff.errors import BackendUnavailable, UnknownBackend

log = logging.getLogger("fastdiff")

STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StepBackend:
    """A way to run the fused step. Subclasses set ``name`` and ``launcher`` ("module:function")."""

    name: str = ""
    launcher: str = ""
    dtypes: tuple = STEP_DTYPES
    _launch: Callable | None = None

    def not_supported_reasons(self, x: torch.Tensor) -> list[str]:
        reasons = []
        if x.dtype not in self.dtypes:
            reasons.append(f"dtype {x.dtype} is not supported (supported: {', '.join(map(str, self.dtypes))})")
        return reasons + self.environment_reasons(x.device)

    def environment_reasons(self, device: torch.device) -> list[str]:
        """Reasons that do not depend on the inputs beyond their device (build, drivers, libraries)."""
        return []

    def launch_fn(self) -> Callable:
        if self._launch is None:
            module, fn = self.launcher.split(":")
            self._launch = getattr(importlib.import_module(module), fn)
        return self._launch


class TorchBackend(StepBackend):
    name = "torch"
    launcher = "fastdiff.ops.reference:step_reference"
    dtypes = STEP_DTYPES + (torch.float64,)


class CppBackend(StepBackend):
    name = "cpp"
    launcher = "fastdiff.kernels.cpp.step:launch"

    def environment_reasons(self, device):
        from fastdiff import _ext

        reasons = []
        if device.type != "cpu":
            reasons.append(f"the cpp backend runs on CPU tensors, these are on {device}")
        if not _ext.cpu_available():
            reasons.append(f"the C++ extension is not built or failed to load: {_ext.cpu_error()}")
        return reasons


class CudaBackend(StepBackend):
    name = "cuda"
    launcher = "fastdiff.kernels.cuda.step:launch"

    def environment_reasons(self, device):
        from fastdiff import _ext

        reasons = []
        if device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, these are on {device}")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible to torch (or torch is a CPU build)")
        elif torch.cuda.get_device_capability(device) < (8, 0):
            reasons.append("the cuda backend needs compute capability >= 8.0 (Ampere or newer)")
        if not _ext.cuda_available():
            reasons.append(f"the CUDA extension is not built or failed to load: {_ext.cuda_error()}")
        return reasons


class TritonBackend(StepBackend):
    name = "triton"
    launcher = "fastdiff.kernels.triton.step:launch"

    def environment_reasons(self, device):
        reasons = []
        try:
            import triton  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            return [f"triton does not import ({type(e).__name__}: {e}); install it with `pip install triton`"]
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type == "cpu" and not interpret:
            reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1 (a slow debugging mode)")
        elif device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible to torch (or torch is a CPU build)")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton does not support device {device}")
        return reasons


BACKENDS: dict[str, StepBackend] = {b.name: b for b in (TorchBackend(), CppBackend(), CudaBackend(), TritonBackend())}
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
_logged_fallbacks: set = set()


def get_backend(name: str) -> StepBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackend(
            f"unknown step backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
        ) from None


def resolve(name: str, x: torch.Tensor) -> StepBackend:
    """The backend that will run a step on tensors like ``x``; raises if a named backend cannot."""
    if name == "auto":
        name = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(x)
        if reasons:
            raise BackendUnavailable(name, reasons)
        return backend
    tried = []
    for candidate in AUTO_ORDER.get(x.device.type, ("torch",)):
        backend = BACKENDS[candidate]
        reasons = backend.not_supported_reasons(x)
        if not reasons:
            key = (x.device.type, candidate, tuple(tried))
            if tried and key not in _logged_fallbacks:
                _logged_fallbacks.add(key)
                # Landing on the reference means no fast kernel runs at all (e.g. the compiled module is not
                # built, or Python imports an uncompiled source tree): say so where users see it, once.
                slow = candidate == "torch"
                log.log(logging.WARNING if slow else logging.INFO, "fastdiff: using step backend %r (%s)%s",
                        candidate, "; ".join(tried), "; `python -m fastdiff info` says what can run" if slow else "")
            return backend
        tried.append(f"{candidate}: {reasons[0]}")
    raise BackendUnavailable("auto", tried)


def availability(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """{backend name: reasons it cannot run on ``device`` / ``dtype``} (empty list: available)."""
    probe = torch.empty(0, dtype=dtype, device="meta")
    device = torch.device(device)
    out = {}
    for name, backend in BACKENDS.items():
        reasons = [] if dtype in backend.dtypes else [f"dtype {dtype} is not supported"]
        out[name] = reasons + backend.environment_reasons(device)
    del probe
    return out
