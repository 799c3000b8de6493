"""``python -m fastdiff info`` names what to install for each backend that cannot run for want of a package or a
build, and the extra it names exists in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from fastdiff.cli.info import install_hint, tensorrt_extra

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("cuda,extra", [("13.0", "tensorrt"), ("12.8", "tensorrt-cu12"), (None, "tensorrt")])
def test_tensorrt_extra_follows_torch_cuda_major(cuda, extra):
    assert tensorrt_extra(cuda) == extra
    assert extra in EXTRAS and any(dep.startswith(f"tensorrt-cu{13 if extra == 'tensorrt' else 12}")
                                   for dep in EXTRAS[extra])


@pytest.mark.parametrize("backend,reason,wanted", [
    ("triton", "triton does not import (ModuleNotFoundError: No module named 'triton')", "fastdiff[gpu]"),
    ("onnxruntime", "the onnxruntime package is not importable (No module named 'onnxruntime')", "fastdiff[export]"),
    ("onnxruntime", "device cuda:0 needs onnxruntime's CUDAExecutionProvider (install onnxruntime-gpu)",
     "fastdiff[gpu]"),
    ("tensorrt", "the tensorrt Python package is not importable (No module named 'tensorrt')", "fastdiff[tensorrt]"),
    ("cuda", "the CUDA extension is not built or failed to load: no module", "FASTDIFF_CUDA=1"),
    ("cpp", "the C++ extension is not built or failed to load: no module", "pip install -e ."),
])
def test_install_hint_names_the_extra(backend, reason, wanted):
    hint = install_hint(backend, [reason], "13.0")
    assert wanted in hint
    for extra in EXTRAS:
        if f"fastdiff[{extra}]" in wanted:
            assert extra in EXTRAS


@pytest.mark.parametrize("backend,reason", [
    ("cuda", "the cuda backend runs on CUDA tensors, these are on cpu"),
    ("triton", "triton runs CPU tensors only under TRITON_INTERPRET=1 (a slow debugging mode)"),
    ("cuda", "the cuda backend needs compute capability >= 8.0 (Ampere or newer)"),
])
def test_no_hint_where_installing_does_not_help(backend, reason):
    assert install_hint(backend, [reason], "13.0") == ""


def test_info_prints_the_hint_for_a_missing_package():
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: its line has no install hint")
    except ImportError:
        pass
    out = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.strip().startswith("tensorrt ") and "unavailable" in line)
    assert "pip install 'fastdiff[tensorrt" in line
