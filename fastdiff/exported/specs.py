"""Tensor specs and dimension ranges: how an exported graph describes its inputs and outputs.

A :class:`TensorSpec` names each axis either with a size (static) or with a profile dimension (``"batch"``,
``"height"``, ``"width"``, ``"tokens"``), and a :class:`DimRange` says which sizes a named dimension may take. The
exporter writes both into a file's metadata (``TensorSpec.to_dict``, ``DimRange.as_list``); the same specs drive
``torch.export``'s dynamic shapes, the ONNX input names, the parity inputs, the onnxruntime / TensorRT input checks
and the TensorRT optimization profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastdiff.errors import InvalidInput

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


@dataclass(frozen=True)
class DimRange:
    """A named input dimension's range ``[min, max]`` with the size the engine is tuned for (``opt``); every value
    must be a multiple of ``multiple``."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self):
        for k in ("min", "opt", "max", "multiple"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInput(f"dimension {self.name!r}: {k} must be an integer >= 1, got {v!r}")
        if not self.min <= self.opt <= self.max:
            raise InvalidInput(f"dimension {self.name!r}: need min <= opt <= max, got {self.min}, {self.opt}, "
                               f"{self.max}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    def describe(self, unit_scale: int = 1) -> str:
        text = f"[{self.min}, {self.max}]"
        if self.multiple > 1:
            text += f" in multiples of {self.multiple}"
        if unit_scale > 1 and self.name in ("height", "width"):
            text += f" (= {self.min * unit_scale}..{self.max * unit_scale} pixels)"
        return text

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple == 0

    def check(self, value: int, where: str = "", unit_scale: int = 1) -> None:
        """Raise :class:`InvalidInput` naming the dimension and the range if ``value`` is not allowed."""
        if not self.contains(value):
            raise InvalidInput(f"{self.name}={value} is outside {where or 'the allowed range'}: {self.name} must be "
                               f"in {self.describe(unit_scale)}; pick a {self.name} inside it, or use another "
                               "profile (--profile) / re-export or rebuild with a wider range")

    def narrow(self, req: DimRange, where: str, unit_scale: int = 1) -> DimRange:
        """``req`` inside this range (raising if it leaves it), keeping this range's ``multiple``."""
        for v in (req.min, req.opt, req.max):
            self.check(v, where, unit_scale)
        return DimRange(self.name, req.min, req.opt, req.max, max(self.multiple, req.multiple))

    def with_multiple(self, multiple: int) -> DimRange:
        """Round min up / max down / opt to the nearest allowed value for a stricter ``multiple``."""
        m = max(self.multiple, multiple)
        lo = -(-self.min // m) * m
        hi = self.max // m * m
        if lo > hi:
            raise InvalidInput(f"dimension {self.name!r}: no multiple of {m} lies in [{self.min}, {self.max}] "
                               f"(the model needs {self.name} divisible by {m})")
        opt = min(max(round(self.opt / m) * m, lo), hi)
        return DimRange(self.name, lo, opt, hi, m)

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max, self.multiple]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``dims`` holds ints (static sizes) and dimension names."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["dims"]))

    def check(self, t: torch.Tensor, dims: dict[str, DimRange], sizes: dict[str, int], where: str,
              unit_scale: int = 1) -> None:
        """Raise :class:`InvalidInput` when ``t`` does not fit this spec: rank, static sizes, a named dimension
        outside its range, or a named dimension that differs from the same name on another input (``sizes``
        collects those)."""
        if t.dim() != len(self.dims):
            raise InvalidInput(f"{where}: input {self.name!r} must have {len(self.dims)} dimensions "
                               f"{self.describe()}, got shape {tuple(t.shape)}")
        for axis, (d, n) in enumerate(zip(self.dims, t.shape, strict=True)):
            if isinstance(d, int):
                if n != d:
                    raise InvalidInput(f"{where}: input {self.name!r} {self.describe()} must have size {d} on axis "
                                       f"{axis}, got shape {tuple(t.shape)}")
                continue
            if sizes.setdefault(d, n) != n:
                raise InvalidInput(f"{where}: input {self.name!r} has {d}={n} but another input has "
                                   f"{d}={sizes[d]}; they must agree")
            if d in dims:
                dims[d].check(n, where, unit_scale)

    def describe(self) -> str:
        return "(" + ", ".join(str(d) for d in self.dims) + ")"


