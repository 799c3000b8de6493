"""The typed errors of fastdiff.

Every error a user can meet is a subclass of :class:`FastDiffError`, and its message says what was wrong and what
to do about it. Several also subclass the matching builtin (``ValueError``, ``TypeError``, ``RuntimeError``) so
code written against those keeps working.
"""

from __future__ import annotations


class FastDiffError(Exception):
    """Base class of every fastdiff error."""


class InvalidInput(FastDiffError, ValueError):
    """An argument has the wrong value, shape, dtype or device."""


class UnknownScheduler(InvalidInput):
    """A scheduler name or diffusers scheduler class that fastdiff does not support."""


class UnknownBackend(InvalidInput):
    """A backend name that does not exist."""


class BackendUnavailable(FastDiffError, RuntimeError):
    """A backend asked for by name cannot run these inputs; the message lists every reason."""

    def __init__(self, backend: str, reasons: list[str], hint: str = ""):
        self.backend = backend
        self.reasons = list(reasons)
        lines = [f"backend {backend!r} cannot run here:"] + [f"  - {r}" for r in self.reasons]
        lines.append(hint or "Pick another backend (see `python -m fastdiff info`) or use backend='auto'.")
        super().__init__("\n".join(lines))


class ExtensionNotBuilt(BackendUnavailable):
    """A compiled fastdiff module (C++ or CUDA) is missing or failed to load."""


class MissingDependency(FastDiffError, ImportError):
    """A package this feature needs is not installed; the message says what to install."""


class NonFiniteError(FastDiffError, RuntimeError):
    """The sampling loop produced NaN or Inf values."""

    def __init__(self, step: int, num_steps: int, dtype: str, hint: str = ""):
        self.step = step
        msg = (
            f"non-finite values (NaN or Inf) appeared in the sample at step {step} of {num_steps} (dtype {dtype}). "
            + (hint or "Try running the model in bfloat16 or float32 (fp16 attention often overflows), "
               "lower the guidance scale, or check the model weights.")
        )
        super().__init__(msg)


class ExportError(FastDiffError, RuntimeError):
    """Exporting a model to ONNX / TensorRT failed, or a parity check did not hold."""


class ModelNotFound(InvalidInput):
    """An unknown embedded model name or a path that holds no model."""


class ModelConfigError(ModelNotFound):
    """A model folder's ``config.json`` cannot describe a model: not a JSON object, keys missing, values of the
    wrong type, or a network too large to build in this machine's memory."""


class ServingUnavailable(FastDiffError, RuntimeError):
    """``python -m fastdiff serve`` cannot run here: PyTriton / tritonclient missing or an environment the bundled
    Triton server cannot use (the message says which and how to fix it)."""
