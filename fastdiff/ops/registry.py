"""The op registry: one table of kernels keyed by (op, backend), and the rules that pick one per call.

Ops: ``"step"`` (the fused sampler step, :mod:`fastdiff.ops.step`), ``"attention"``, ``"group_norm"`` (+ SiLU),
``"geglu"``. Backends: ``"torch"`` (the plain-PyTorch reference, defined beside its op), ``"cpp"`` (C++ / OpenMP,
``fastdiff._C_cpu``), ``"cuda"`` (CUDA C++, ``fastdiff._C_cuda``), ``"triton"``, and for the step ``"torch-fast"``
(in-place PyTorch reading the coefficient row on the host, :mod:`fastdiff.kernels.torch_fast.step`: the fallback
when no compiled kernel runs). Each :class:`Entry` of :data:`TABLE` carries

- its environment reasons: why the backend cannot run on a device at all (module not built, wrong device, triton
  missing); they depend on the backend only, so ``python -m fastdiff info`` can print them per device;
- its input reasons: why it cannot run these inputs (dtype, shape limits, autograd);
- its launcher, ``"module:function"``, imported on the first launch (so ``import fastdiff`` never imports triton)
  and kept: :meth:`Entry.launch_fn` is an attribute read after that.

Two rules choose an entry, as the two families of ops want:

- the step (:func:`resolve`): a backend named runs or raises :class:`~fastdiff.errors.BackendUnavailable` listing
  every reason; ``"auto"`` takes the first backend of :data:`AUTO_ORDER` for the device with no reasons. Landing
  on ``torch-fast`` after a compiled kernel failed is a WARNING, said once (no compiled kernel runs at all);
  another fallback is an INFO line, also once. ``auto`` never picks the reference: it is the oracle, slower than
  ``torch-fast`` (and than diffusers' own arithmetic) because it keeps every coefficient on the device.
- the model ops (:func:`choose`): ``"torch"`` always runs the reference; a kernel named runs or raises (also when
  the op has no such kernel); ``"auto"`` uses Triton only on CUDA tensors it supports and the reference elsewhere,
  logging the first reason once per (op, reason). The C++ and CUDA C++ GroupNorms are chosen by name only (see
  :mod:`fastdiff.ops.groupnorm` for why).

``FASTDIFF_BACKEND`` in the environment overrides ``"auto"``: any backend for the step, ``torch`` / ``triton`` for
the model ops (the other values name step backends and leave the model ops on ``"auto"``).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

from fastdiff.errors import BackendUnavailable, UnknownBackend

log = logging.getLogger("fastdiff")

STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the step kernels' storage dtypes
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the model-op kernels' storage dtypes
# Kernel limits, written here rather than imported from the kernel modules: those import triton.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # as fastdiff.kernels.triton.attention
MAX_GRID_Y = 65535  # attention: B * H is the grid's second axis
MAX_CHANNELS_PER_GROUP = 1024  # GroupNorm, Triton and CUDA: a group's channels in one block


# --- environment reasons (per backend and device) ---------------------------------------------------------------

def _no_reasons(*_args) -> list[str]:
    return []


def _cpp_environment(device: torch.device) -> list[str]:
    from fastdiff import _ext

    reasons = []
    if device.type != "cpu":
        reasons.append(f"the cpp backend runs on CPU tensors, these are on {device}")
    if not _ext.cpu_available():
        reasons.append(f"the C++ extension is not built or failed to load: {_ext.cpu_error()}")
    return reasons


def _cuda_environment(device: torch.device) -> list[str]:
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


def _triton_environment(device: torch.device) -> list[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return [f"triton does not import ({type(e).__name__}: {e}); install it with `pip install triton`"]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["triton runs CPU tensors only under TRITON_INTERPRET=1 (a slow debugging mode)"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["no CUDA GPU is visible to torch (or torch is a CPU build)"]
    if device.type not in ("cpu", "cuda"):
        return [f"triton does not support device {device}"]
    return []


ENVIRONMENT: dict[str, Callable[[torch.device], list[str]]] = {
    "torch": _no_reasons, "torch-fast": _no_reasons, "cpp": _cpp_environment, "cuda": _cuda_environment,
    "triton": _triton_environment,
}


# --- input reasons (per entry; the arguments are the op's, already validated by the op) --------------------------

def _dtype_reasons(dtype: torch.dtype, supported: tuple, listed: str | None = None) -> list[str]:
    if dtype in supported:
        return []
    return [f"dtype {dtype} is not supported (supported: {', '.join(map(str, supported))})" if listed is None
            else f"dtype {dtype} is not supported ({listed})"]


def grad_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """The model-op kernels are forward-only: autograd-tracked calls stay on the reference."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return ["an input requires grad and the Triton kernels are forward-only (run under torch.no_grad())"]
    return []


def _step_inputs(x: torch.Tensor) -> list[str]:
    return _dtype_reasons(x.dtype, STEP_DTYPES)


def _step_reference_inputs(x: torch.Tensor) -> list[str]:
    return _dtype_reasons(x.dtype, STEP_DTYPES + (torch.float64,))


_KERNEL_DTYPES_LISTED = "float16, bfloat16, float32"


def _attention_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    reasons = _dtype_reasons(q.dtype, KERNEL_DTYPES, _KERNEL_DTYPES_LISTED)
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        reasons.append(f"head_dim {d} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        reasons.append(f"batch * heads = {q.shape[0] * q.shape[1]} exceeds {MAX_GRID_Y} (one grid axis)")
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append("the Triton attention kernel needs compute capability >= 8.0 (Ampere or newer)")
    return reasons + grad_reasons(q, k, v)


def _attention_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    if q.dtype == torch.float32:
        return ["float32 attention goes to SDPA under auto (the Triton kernel is tuned for fp16 / bf16)"]
    return []


def _group_norm_inputs(max_channels_per_group: int | None):
    def reasons_for(x: torch.Tensor, num_groups: int, weight, bias, add) -> list[str]:
        reasons = _dtype_reasons(x.dtype, KERNEL_DTYPES, _KERNEL_DTYPES_LISTED)
        for name, t in (("weight", weight), ("bias", bias), ("add", add)):
            if t is not None and t.dtype not in KERNEL_DTYPES:
                reasons.append(f"{name} dtype {t.dtype} is not supported ({_KERNEL_DTYPES_LISTED})")
        cpg = x.shape[1] // num_groups
        if max_channels_per_group is not None and cpg > max_channels_per_group:
            reasons.append(f"{cpg} channels per group exceed {max_channels_per_group}")
        return reasons + grad_reasons(x, weight, bias, add)

    return reasons_for


def _geglu_triton_inputs(x: torch.Tensor) -> list[str]:
    return _dtype_reasons(x.dtype, KERNEL_DTYPES, _KERNEL_DTYPES_LISTED) + grad_reasons(x)


# --- the table ----------------------------------------------------------------------------------------------------

class Entry:
    """One kernel: ``op`` on ``backend``. ``name`` is the backend's name (what a caller asked for)."""

    __slots__ = ("op", "backend", "launcher", "host_coef", "_inputs", "_auto", "_launch")

    def __init__(self, op: str, backend: str, launcher: str, inputs: Callable[..., list[str]] = _no_reasons,
                 auto: Callable[..., list[str]] | None = None, host_coef: bool = False):
        self.op, self.backend, self.launcher = op, backend, launcher
        # The step launcher takes ``host_coef=`` (the row as host numbers): the loop passes its plan's row, and the
        # step cannot be captured in a CUDA graph (it would replay the captured step's coefficients).
        self.host_coef = host_coef
        self._inputs = inputs
        self._auto = auto  # further reasons "auto" prefers the reference although this kernel could run
        self._launch: Callable | None = None

    @property
    def name(self) -> str:
        return self.backend

    def environment_reasons(self, device: torch.device) -> list[str]:
        """Reasons that do not depend on the inputs beyond their device (build, drivers, libraries)."""
        return ENVIRONMENT[self.backend](device)

    def input_reasons(self, *args) -> list[str]:
        """Reasons these inputs (the op's arguments) cannot run here: dtype, shape limits, autograd."""
        return self._inputs(*args)

    def auto_reasons(self, *args) -> list[str]:
        return self._auto(*args) if self._auto is not None else []

    def not_supported_reasons(self, x: torch.Tensor, *args) -> list[str]:
        """Every reason this entry cannot run the call whose first tensor is ``x`` (empty: it can)."""
        return self.input_reasons(x, *args) + self.environment_reasons(x.device)

    def launch_fn(self) -> Callable:
        """The launcher, imported on the first call and kept: resolve once, then call this in a loop."""
        if self._launch is None:
            module, fn = self.launcher.split(":")
            self._launch = getattr(importlib.import_module(module), fn)
        return self._launch

    def __repr__(self) -> str:
        return f"Entry({self.op!r}, {self.backend!r}, {self.launcher!r})"


#: (op, backend) -> Entry. Per op, the order is the order names are listed in messages.
TABLE: dict[tuple[str, str], Entry] = {(e.op, e.backend): e for e in (
    Entry("step", "torch", "fastdiff.ops.step:step_reference", _step_reference_inputs),
    Entry("step", "cpp", "fastdiff.kernels.cpp.step:launch", _step_inputs),
    Entry("step", "cuda", "fastdiff.kernels.cuda.step:launch", _step_inputs),
    Entry("step", "triton", "fastdiff.kernels.triton.step:launch", _step_inputs),
    Entry("step", "torch-fast", "fastdiff.kernels.torch_fast.step:step_fast", _step_reference_inputs, host_coef=True),
    Entry("attention", "torch", "fastdiff.ops.attention:attention_reference"),
    Entry("attention", "triton", "fastdiff.kernels.triton.attention:launch", _attention_triton_inputs,
          _attention_auto),
    Entry("group_norm", "torch", "fastdiff.ops.groupnorm:group_norm_reference"),
    Entry("group_norm", "triton", "fastdiff.kernels.triton.groupnorm:launch",
          _group_norm_inputs(MAX_CHANNELS_PER_GROUP)),
    Entry("group_norm", "cpp", "fastdiff.kernels.cpp.groupnorm:launch", _group_norm_inputs(None)),
    Entry("group_norm", "cuda", "fastdiff.kernels.cuda.groupnorm:launch", _group_norm_inputs(MAX_CHANNELS_PER_GROUP)),
    Entry("geglu", "torch", "fastdiff.ops.geglu:geglu_reference"),
    Entry("geglu", "triton", "fastdiff.kernels.triton.geglu:launch", _geglu_triton_inputs),
)}
MODEL_OPS = ("attention", "group_norm", "geglu")


def backends(op: str) -> tuple[str, ...]:
    """The backends ``op`` has, the torch reference first."""
    return tuple(b for o, b in TABLE if o == op)


def kernels(op: str) -> tuple[str, ...]:
    """The compiled kernels ``op`` has (its backends besides the torch reference)."""
    return tuple(b for b in backends(op) if b != "torch")


#: The step's backends by name (``fastdiff.ops.BACKENDS``).
BACKENDS: dict[str, Entry] = {b: TABLE["step", b] for b in backends("step")}
#: The kernels each model op has; `python -m fastdiff info` prints it and fastdiff.optimize reports from it.
OP_KERNELS: dict[str, tuple[str, ...]] = {op: kernels(op) for op in MODEL_OPS}
MODEL_OP_BACKENDS = tuple(dict.fromkeys(b for op in MODEL_OPS for b in backends(op)))
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch-fast"), "cpu": ("cpp", "torch-fast")}
PYTORCH_STEPS = ("torch", "torch-fast")  # the step backends that are plain PyTorch (no compiled kernel)
_logged_fallbacks: set = set()
_logged: set = set()


# --- the step's rule ----------------------------------------------------------------------------------------------

def get_backend(name: str) -> Entry:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackend(
            f"unknown step backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
        ) from None


def resolve(name: str, x: torch.Tensor) -> Entry:
    """The step entry that will run on tensors like ``x``; raises if a named backend cannot."""
    if name == "auto":
        name = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if name != "auto":
        entry = get_backend(name)
        reasons = entry.not_supported_reasons(x)
        if reasons:
            raise BackendUnavailable(name, reasons)
        return entry
    tried = []
    for candidate in AUTO_ORDER.get(x.device.type, ("torch-fast",)):
        entry = BACKENDS[candidate]
        reasons = entry.not_supported_reasons(x)
        if not reasons:
            key = (x.device.type, candidate, tuple(tried))
            if tried and key not in _logged_fallbacks:
                _logged_fallbacks.add(key)
                # Landing on PyTorch means no compiled kernel runs at all (e.g. the compiled module is not
                # built, or Python imports an uncompiled source tree): say so where users see it, once.
                slow = candidate in PYTORCH_STEPS
                log.log(logging.WARNING if slow else logging.INFO, "fastdiff: using step backend %r (%s)%s",
                        candidate, "; ".join(tried), "; `python -m fastdiff info` says what can run" if slow else "")
            return entry
        tried.append(f"{candidate}: {reasons[0]}")
    raise BackendUnavailable("auto", tried)


def availability(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """{step backend name: reasons it cannot run on ``device`` / ``dtype``} (empty list: available)."""
    device = torch.device(device)
    probe = torch.empty(0, dtype=dtype, device="meta")  # a tensor of that dtype; its device is not looked at
    return {name: ([] if not entry.input_reasons(probe) else [f"dtype {dtype} is not supported"])
            + entry.environment_reasons(device) for name, entry in BACKENDS.items()}


# --- the model ops' rule ------------------------------------------------------------------------------------------

def check_backend_name(backend: str) -> None:
    """Raise :class:`~fastdiff.errors.UnknownBackend` unless ``backend`` names a model-op backend or ``"auto"``."""
    if backend != "auto" and backend not in MODEL_OP_BACKENDS:
        raise UnknownBackend(f"unknown backend {backend!r} for the model ops; choose one of: "
                             f"{', '.join(('auto',) + MODEL_OP_BACKENDS)}")


def environment_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend``'s kernels cannot run on ``device`` at all (not installed or built, wrong device, ...)."""
    return ENVIRONMENT[backend](device)


def choose(op: str, backend: str, device: torch.device, *args) -> Entry:
    """The entry that runs one call of model op ``op`` with arguments ``args`` (those its input reasons take): its
    torch reference or one of its kernels."""
    check_backend_name(backend)
    if backend == "auto":
        env = os.environ.get("FASTDIFF_BACKEND", "")
        if env in ("torch", "triton"):
            backend = env
    if backend == "torch":
        return TABLE[op, "torch"]
    hint = f"Use backend='auto' or 'torch' for {op}."
    if backend != "auto":
        entry = TABLE.get((op, backend))
        if entry is None:
            raise BackendUnavailable(backend, [f"{op} has no {backend} kernel (it has: {', '.join(kernels(op))})"],
                                     hint=hint)
        reasons = entry.environment_reasons(device) + entry.input_reasons(*args)
        if reasons:
            raise BackendUnavailable(backend, reasons, hint=hint)
        return entry
    triton = TABLE[op, "triton"]
    if device.type != "cuda":
        reasons = [f"auto uses Triton only on CUDA tensors, these are on {device}"]
    else:
        reasons = triton.environment_reasons(device) + triton.input_reasons(*args) + triton.auto_reasons(*args)
    if not reasons:
        return triton
    key = (op, reasons[0])
    if key not in _logged:
        _logged.add(key)
        log.info("fastdiff: %s runs the PyTorch reference (%s)", op, reasons[0])
    return TABLE[op, "torch"]


def tracing(*tensors: torch.Tensor | None) -> bool:
    """Whether this call is being traced (torch.compile, make_fx, fake tensors), so a kernel must go through its
    registered custom op. Eager calls skip the custom-op dispatcher (some microseconds per call, hundreds of calls
    per UNet forward) and launch the kernel directly: same kernel, same result."""
    if torch.compiler.is_compiling():
        return True
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return True
    return any(t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)
