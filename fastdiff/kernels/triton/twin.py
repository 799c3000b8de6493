"""Kernels that follow TRITON_INTERPRET at launch, and an offline compile for GPU-less CI.

``@triton.jit`` decides compiled-vs-interpreted once, when the decorator runs (module import), but one pytest
process may run interpreter tests (``TRITON_INTERPRET=1`` set per test) and compiled GPU tests. :class:`Twin`
wraps the plain Python function and builds the right flavour at launch. Every kernel in this package is a twin.

The rule that makes this valid: a twin kernel calls no ``@triton.jit`` function -- neither our own helpers nor
triton.language's jit-defined ones (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.sigmoid``, ``tl.cdiv``): those keep
the mode triton was imported in. Builtins are fine (``tl.full``, ``tl.where``, ``tl.dot``, ``tl.exp2``,
``tl.math.erf``), and so is ``tl.reduce(x, axis, tl.standard._sum_combine)`` / ``_elementwise_max``: ``tl.reduce`` is
a builtin, and the interpreter recognises those two combine functions by identity and reduces with numpy.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime.jit import JITFunction


def interpreting() -> bool:
    """Whether Triton interprets now (TRITON_INTERPRET as it is at this moment)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class Twin:
    """A Triton kernel in both flavours; ``twin[grid](...)`` launches the one TRITON_INTERPRET asks for now."""

    def __init__(self, fn, **jit_options):
        self.fn = fn
        self.jit_options = jit_options
        self._by_mode: dict[bool, object] = {}

    def kernel(self, interpret: bool | None = None):
        interpret = interpreting() if interpret is None else interpret
        k = self._by_mode.get(interpret)
        if k is None:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction  # only imported when interpreting

                k = InterpretedFunction(self.fn, **self.jit_options)
            else:
                k = JITFunction(self.fn, **self.jit_options)
            self._by_mode[interpret] = k
        return k

    def __getitem__(self, grid):
        return self.kernel()[grid]

    @property
    def arg_names(self) -> list[str]:
        return JITFunction(self.fn, **self.jit_options).arg_names


def twin(**jit_options):
    """Decorator: ``@twin()`` in place of ``@triton.jit`` (same options)."""
    return lambda fn: Twin(fn, **jit_options)


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_offline(kernel: Twin, arch: int, types: dict[str, str], constexprs: dict, num_warps: int = 4,
                    num_stages: int = 3, aligned: tuple[str, ...] = (), fp_fusion: bool = True):
    """Compile ``kernel`` for NVIDIA sm_<arch> without a GPU (Triton ships LLVM and ptxas).

    ``types``: the Triton type of every runtime argument ("*fp16", "i32", "fp32", ...); ``constexprs``: the values
    of the constexpr arguments; ``aligned``: arguments that get the 16-divisibility hint a real launch gives
    aligned pointers and sizes divisible by 16; ``fp_fusion``: FMA contraction, as the kernel's launcher sets it.
    Returns the compiled kernel (``.asm["ptx"]``, ``.n_regs``,
    ``.n_spills``, ``.metadata.shared``): a compile check for CPU-only CI, and register / shared-memory numbers to
    read before benchmarking."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.kernel(interpret=False)
    signature, cexpr, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], cexpr[(i,)] = "constexpr", constexprs[name]
        else:
            signature[name] = types[name]
        if name in aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, cexpr, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fp_fusion})


def triton_type(dtype: torch.dtype) -> str:
    return _TRITON_DTYPE[dtype]


def resource_usage(compiled) -> dict[str, int]:
    """{"regs", "stack", "shared", "local"} of an offline-compiled kernel, read from its cubin with the cuobjdump
    that Triton ships (a kernel that spills has stack / local > 0)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{text}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups()), strict=True))
