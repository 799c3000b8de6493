"""The CUDA fused step (``fused_step(backend="cuda")``, module ``fastdiff._C_cuda``) against the torch reference.

- marker ``cuda``: the cases of :mod:`tests.step_cases` on a GPU, plus CUDA-graph capture and a side stream
  (skipped without a GPU or without the built module, with the reason);
- marker ``ext``: the module imports on a machine without a GPU and raises a clear error only when called;
- unmarked / ``slow``: the generated instantiation table is up to date, and nvcc compiles ``csrc/cuda/step.cu``
  (skipped when nvcc is absent), so CPU-only CI catches CUDA compile errors.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import _ext
from fastdiff.ops import fused_step
from tests.kernel_helpers import needs_cuda_ext
from tests.step_cases import (
    ALL_ON,
    CASES,
    StepCase,
    assert_close_nan,
    assert_module_constants_match_python,
    check_case,
    make_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
HAS_GPU = torch.cuda.is_available()


def gpu_test(fn):
    """Marker ``cuda``; skipped (with the reason) without a GPU of compute capability >= 8.0 or the module."""
    marks = [
        pytest.mark.cuda,
        pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to torch"),
        pytest.mark.skipif(HAS_GPU and torch.cuda.get_device_capability() < (8, 0),
                           reason="the cuda backend needs compute capability >= 8.0"),
        needs_cuda_ext,
    ]
    for mark in marks:
        fn = mark(fn)
    return fn


def module_test(fn):
    """Marker ``ext``; needs the built module but no GPU."""
    return pytest.mark.ext(needs_cuda_ext(fn))


def _copy(kw: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


# ---- on a GPU ------------------------------------------------------------------------------------------------


@gpu_test
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_reference(case):
    check_case(case, backend="cuda", device="cuda")


def _graph_inputs(seed: int):
    case = StepCase(shape=(2, 4, 33, 17), dtype=torch.float16, seed=seed, **ALL_ON)
    return case, make_inputs(case, "cuda")


@gpu_test
def test_cuda_graph_capture_and_replay():
    """The coefficient row and flag stay on the device: the step captures in a CUDA graph and replays correctly."""
    case, kw = _graph_inputs(11)
    ref = _copy(kw)
    fused_step(**ref, backend="torch")
    static = _copy(kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, as torch.cuda.graphs recommends
        fused_step(**_copy(kw), backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_step(**static, backend="cuda")
    for k in ("out", "hist", "saved", "next_in", "flag"):  # capture does not run the kernel; replay must
        static[k].copy_(kw[k])
    graph.replay()
    torch.cuda.synchronize()
    for k in ("out", "hist", "saved", "next_in"):
        assert_close_nan(static[k], ref[k], case.dtype, msg=f"graph replay {k}")
    assert torch.equal(static["flag"], ref["flag"])


@gpu_test
def test_cuda_side_stream():
    case, kw = _graph_inputs(12)
    ref = _copy(kw)
    fused_step(**ref, backend="torch")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_step(**kw, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for k in ("out", "hist", "saved", "next_in"):
        assert_close_nan(kw[k], ref[k], case.dtype, msg=f"side stream {k}")


# ---- without a GPU -----------------------------------------------------------------------------------------


@module_test
def test_module_constants_match_python():
    mod = _ext.require_cuda()
    assert_module_constants_match_python(mod)
    assert mod.BUILD_INFO["cuda_runtime"] == mod.runtime_version_built() > 0


@module_test
def test_call_without_gpu_raises_clear_error():
    """Statically linked runtime: the module imported above; calling it with no GPU / driver is a CudaError."""
    if HAS_GPU:
        pytest.skip("a GPU is visible: this checks the no-GPU path")
    mod = _ext.require_cuda()
    assert mod.device_count() == 0
    args = (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, False, 1.0, False, 0.0, 0, 0)
    with pytest.raises(mod.CudaError, match="needs an NVIDIA GPU") as info:
        mod.step(*args)
    assert isinstance(info.value, RuntimeError)


def test_generated_instantiations_are_up_to_date():
    script = ROOT / "csrc" / "cuda" / "gen_instantiations.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_nvcc_compiles_step_cu(tmp_path):
    """csrc/cuda/step.cu for sm_80 and sm_90: compiles, no kernel spills (the 8-wide kernels sit at their
    __launch_bounds__ register cap), and the vector kernels move 16 bytes at a time."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    base = [nvcc, "-std=c++17", "--fmad=false", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / "cuda" / "step.cu")]
    cmd = [*base, "-c", "-o", str(tmp_path / "step.o"), "-Xptxas", "-v",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "step.o").stat().st_size > 0
    spills = [line for line in res.stderr.splitlines() if "spill" in line]
    assert len(spills) == 2 * 2 * 3, res.stderr  # 2 archs x 2 widths x 3 dtypes
    assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), spills
    ptx = subprocess.run([*base, "-ptx", "-arch=sm_90", "-o", "-"], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    assert "ld.global.nc.v4" in ptx.stdout or "ld.global.v4" in ptx.stdout
    assert "st.global.v4" in ptx.stdout


FAST_DIV_CHECK = r"""
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/fast_div.h"
using fastdiff::FastDiv32;

static int bad = 0;
static uint64_t rng = 88172645463325252ull;
static uint64_t next(uint64_t n) {  // xorshift64, uniform enough in [0, n)
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng % n;
}
static void check(int64_t i, int64_t d, const FastDiv32& f) {
  const uint32_t got = f.div(uint32_t(i));
  if (got != uint32_t(i / d) && bad++ < 5) std::printf("wrong: %lld / %lld gave %u\n", (long long)i, (long long)d, got);
}

int main() {
  const int64_t top = FastDiv32::kMax;  // the largest dividend and divisor
  std::vector<int64_t> ds;
  for (int64_t d = 1; d <= 4096; ++d) ds.push_back(d);
  for (int k = 12; k <= 31; ++k)
    for (int64_t e = -1; e <= 1; ++e)
      if ((int64_t(1) << k) + e <= top) ds.push_back((int64_t(1) << k) + e);
  for (int64_t d : {3 * 64 * 64, 4 * 128 * 128, 16 * 128 * 128, 1000003, 46341, 715827883}) ds.push_back(d);
  for (int64_t d : {top / 3, top / 2, top - 1, top}) ds.push_back(d);
  for (int n = 0; n < 2000; ++n) ds.push_back(1 + int64_t(next(uint64_t(top))));
  for (int64_t d : ds) {
    if (!FastDiv32::fits(d, top + 1)) {
      std::printf("fits() refused %lld\n", (long long)d);
      return 1;
    }
    const FastDiv32 f = FastDiv32::make(d);
    for (int64_t i = 0; i < 3000; ++i) check(i, d, f);
    for (int64_t i = top; i > top - 3000; --i) check(i, d, f);
    for (int64_t q = top / d; q >= 1 && q > top / d - 300; --q)  // next to the largest multiples of d
      for (int64_t i = q * d - 1; i <= q * d + 1; ++i)
        if (i <= top) check(i, d, f);
    for (int n = 0; n < 3000; ++n) check(int64_t(next(uint64_t(top) + 1)), d, f);
  }
  if (FastDiv32::fits(top + 1, top + 1) || FastDiv32::fits(2, top + 2) || FastDiv32::fits(0, 5)) {
    std::printf("fits() accepted out-of-range sizes\n");
    return 1;
  }
  if (bad) {
    std::printf("%d wrong quotients\n", bad);
    return 1;
  }
  std::printf("ok: %zu divisors\n", ds.size());
  return 0;
}
"""


def test_fast_divisor_matches_division(tmp_path):
    """csrc/cuda/fast_div.h (the sample index e / N of the CUDA step, a multiply and shift) is the exact quotient
    over its whole range: every divisor up to 4096, powers of two and their neighbours up to 2^31, the largest
    dividends and those next to multiples of the divisor. Host C++ only, so it runs without a GPU."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "fast_div_check.cpp"
    src.write_text(FAST_DIV_CHECK)
    exe = tmp_path / "fast_div_check"
    res = subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
