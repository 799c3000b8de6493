"""What the kernel test files (attention, GroupNorm, GEGLU, the steps, optimize) share: the GPU-only class
decorator, skips for an unbuilt compiled module, a fixture that runs Triton compiled rather than interpreted, and a
recording ``torch.compile``."""

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


def compile_recording(fn, graphs: list):
    """torch.compile(fn, fullgraph=True) through aot_eager (fake-tensor tracing, functionalisation), recording each
    captured graph's code so a test can check that the custom op -- not its implementation -- was traced."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    return torch.compile(fn, backend=backend, fullgraph=True)
