"""What the kernel test files (attention, GroupNorm, GEGLU, the steps, optimize) share: the GPU-only and
interpreter-only class decorators, skips for an unbuilt compiled module, fixtures that run Triton interpreted or
compiled, the check that a Triton kernel picks its flavour at launch, and a recording ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from fastdiff import _ext

#: Skip (with the load error) where the compiled C++ / CUDA module is not built or does not load.
needs_cpu_ext = pytest.mark.skipif(not _ext.cpu_available(), reason=f"fastdiff._C_cpu is not built: {_ext.cpu_error()}")
needs_cuda_ext = pytest.mark.skipif(not _ext.cuda_available(),
                                    reason=f"fastdiff._C_cuda is not built: {_ext.cuda_error()}")


def cuda_only(obj):
    """Mark ``obj`` (a test or class) ``cuda`` and skip it, with the reason, where no NVIDIA GPU is visible."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA not available)")
    return pytest.mark.cuda(skip(obj))


@pytest.fixture
def compiled_triton(monkeypatch):
    """Unset TRITON_INTERPRET for the test: Triton kernels are compiled for the GPU, not interpreted."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def interpreted_triton(monkeypatch):
    """Set TRITON_INTERPRET=1 for the test: Triton kernels run in the interpreter, on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def interpret_only(cls):
    """Mark the test class ``triton_interpret`` and run each of its tests under TRITON_INTERPRET=1 (set per test:
    every kernel is a :class:`~fastdiff.kernels.triton.twin.Twin`, which picks its flavour at launch)."""
    return pytest.mark.triton_interpret(pytest.mark.usefixtures("interpreted_triton")(cls))


def assert_follows_env_at_launch(kernel, monkeypatch) -> None:
    """``kernel`` (a Twin) is interpreted while TRITON_INTERPRET=1 is set (by the test) and, once it is unset, a
    compiled ``JITFunction`` of the same Python function, built once."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert isinstance(kernel.kernel(), InterpretedFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = kernel.kernel()
    assert isinstance(compiled, JITFunction) and compiled.fn is kernel.fn
    assert kernel.kernel() is compiled  # built once


def compile_recording(fn, graphs: list):
    """torch.compile(fn, fullgraph=True) through aot_eager (fake-tensor tracing, functionalisation), recording each
    captured graph's code so a test can check that the custom op -- not its implementation -- was traced."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True)
