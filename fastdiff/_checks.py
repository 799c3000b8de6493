"""Argument checks shared by the sampler API, the model / scheduler / exported-file readers and the command line.

One place decides what counts as an integer, a number, a device or a dtype, so every surface refuses the same
inputs with the same words: ``True`` is not a step count, ``3.7`` is not a label, ``"cuda"`` on a machine without
CUDA is refused before anything is built. The command-line adapters (:func:`cli_int`, :func:`cli_number`,
:func:`cli_device`) turn the same checks into argparse types, so a bad flag is argparse's one-line error.
"""

from __future__ import annotations

import argparse
import math
import numbers

import torch

from fastdiff.errors import InvalidInput

#: dtypes a sampler can run in; integer or complex dtypes only fail later, deep inside the model.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def _int_problem(value, minimum: int | None, maximum: int | None) -> str | None:
    # bool is a subclass of int, but True as a step count or a label is a bug, not a 1. numbers.Integral covers
    # numpy's integer scalars (np.int64 from an array), which are real integers.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"must be an integer{_range_text(minimum, maximum)}, got {value!r} ({type(value).__name__})"
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        return f"must be an integer{_range_text(minimum, maximum)}, got {value!r}"
    return None


def _number_problem(value, minimum: float | None, maximum: float | None, finite: bool = True) -> str | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number, got {value!r} ({type(value).__name__})"
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        return f"must be a {'finite ' if finite else ''}number, got {value!r}"
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        return f"must be a number{_range_text(minimum, maximum)}, got {value!r}"
    return None


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int; raises :class:`InvalidInput` naming ``name`` for anything that is not an integer
    (bools, floats, strings) or lies outside ``[minimum, maximum]``."""
    problem = _int_problem(value, minimum, maximum)
    if problem:
        raise InvalidInput(f"{name} {problem}" + (f"; {hint}" if hint else ""))
    return int(value)


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 hint: str = "", finite: bool = True) -> float:
    """``value`` as a float; raises :class:`InvalidInput` for bools, strings, None, NaN, a value outside
    ``[minimum, maximum]`` and (unless ``finite=False``) +-Inf."""
    problem = _number_problem(value, minimum, maximum, finite)
    if problem:
        raise InvalidInput(f"{name} {problem}" + (f"; {hint}" if hint else ""))
    return float(value)


def check_device(device, name: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` this machine can use (None stays None); refuses unknown names and CUDA /
    MPS devices that are not there, before any model is moved (torch would fail mid-way with an AssertionError)."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InvalidInput(f"{name} must be a device name like 'cpu', 'cuda' or 'cuda:1' (or a torch.device), got "
                           f"{device!r} ({type(device).__name__})")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # torch's message lists every device type it was built with
        raise InvalidInput(f"{name} {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"{name} {str(device)!r} needs CUDA, which is not available here (no GPU, or torch "
                               "built without CUDA); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInput(f"{name} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s), numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInput(f"{name} {str(device)!r} needs Apple's MPS, which is not available here; use 'cpu'")
    elif dev.type != "cpu":
        raise InvalidInput(f"{name} {str(device)!r}: fastdiff samples on 'cpu', 'cuda' or 'mps' devices")
    return dev


def check_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """``dtype`` as a floating torch dtype (a ``torch.dtype`` or its name, e.g. ``"float16"``); None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise InvalidInput(f"{name} must be a floating torch dtype ({names}), got {dtype!r}")
    return dtype


def _cli_type(convert, kind: str, problem):
    """An argparse ``type``: ``convert(text)`` (ValueError: not a {kind}), then ``problem(value)`` (a message, or
    empty when the value is fine). argparse turns ArgumentTypeError into its one-line error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {text!r}") \
                from None
        message = problem(value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def cli_int(minimum: int | None = 1, maximum: int | None = None):
    """An argparse ``type`` for an integer flag in ``[minimum, maximum]``."""
    return _cli_type(int, "integer", lambda v: _int_problem(v, minimum, maximum))


def cli_number(minimum: float | None = None, maximum: float | None = None):
    """An argparse ``type`` for a finite number flag in ``[minimum, maximum]``."""
    return _cli_type(float, "number", lambda v: _number_problem(v, minimum, maximum))


def cli_device(text: str) -> str:
    """An argparse ``type`` for ``--device``: refuses a device this machine cannot use while parsing."""
    try:
        check_device(text, "--device")
    except InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None
    return text
