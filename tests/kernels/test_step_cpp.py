"""The C++ fused step (``fused_step(backend="cpp")``, module ``fastdiff._C_cpu``) against the torch reference.

Cases come from :mod:`tests.step_cases` (every coefficient column, zero coefficients, WSLOT -1..2, CFG, noise,
hist, saved, next_in, m_scale, clip / threshold, flag, NaN injection, odd shapes, non-contiguous and misaligned
views, poisoned outputs, in-place ``out=x``, fp32 / fp16 / bf16). Skipped with the load error when the module is
not built (``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import _ext
from fastdiff.errors import InvalidInput
from fastdiff.kernels.cpp import step as cpp_step
from fastdiff.ops import fused_step, resolve
from fastdiff.schedulers.plan import NCOEF, Col
from tests.kernel_helpers import needs_cpu_ext
from tests.step_cases import CASES, FLAG_LEN, StepCase, assert_module_constants_match_python, check_case, make_inputs

pytestmark = [
    pytest.mark.ext,
    needs_cpu_ext,
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpp_matches_reference(case):
    check_case(case, backend="cpp")


def test_module_constants_match_python():
    assert_module_constants_match_python(_ext.require_cpu())


def test_auto_backend_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert resolve("auto", torch.empty(1)).name == "cpp"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_next", [0.7, 1.7, 1 / 1024, 3e-5, -1e30])
def test_every_16bit_pattern_converts_like_torch(dtype, in_next):
    """All 65536 encodings in (incl. subnormals, Inf, NaN), rounded results out (overflow, underflow, ties)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(2, -1)
    coef = torch.zeros(NCOEF)
    coef[Col.OX], coef[Col.IN_NEXT], coef[Col.WSLOT] = 1.0, in_next, -1
    model_out = torch.zeros_like(x)
    res = {}
    for backend in ("torch", "cpp"):
        out, nxt = torch.empty_like(x), torch.empty_like(x)
        fused_step(model_out, x, coef, out, next_in=nxt, backend=backend)
        res[backend] = (out.view(torch.int16), nxt.view(torch.int16), torch.isnan(out), torch.isnan(nxt))
    (o_r, n_r, on_r, nn_r), (o_c, n_c, on_c, nn_c) = res["torch"], res["cpp"]
    assert torch.equal(on_r, on_c) and torch.equal(nn_r, nn_c)
    assert torch.equal(o_r[~on_r], o_c[~on_c]), "out differs from torch's conversion"
    assert torch.equal(n_r[~nn_r], n_c[~nn_c]), "fp32 -> 16-bit rounding differs from torch's"


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_results(threads):
    case = StepCase(shape=(3, 4, 97, 61), dtype=torch.bfloat16, seed=77, cfg=True, hist=True, saved=True, noise=True,
                    next_in=True, m_scale=True, clamp="threshold", flag=True, wslot=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_case(case, backend="cpp")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("column,value", [(Col.WSLOT, 3.0), (Col.STEP, float(FLAG_LEN)), (Col.STEP, -1.0)])
def test_out_of_range_row_raises_before_writing(column, value):
    kw = make_inputs(StepCase(hist=True, flag=True, wslot=0, seed=3))
    kw["coef"][column] = value
    out = kw["out"]
    with pytest.raises(IndexError):
        fused_step(**kw, backend="cpp")
    assert torch.isnan(out).all(), "nothing may be written when the row is rejected"


def test_launcher_rejects_strided_views():
    kw = make_inputs(StepCase(seed=4))
    kw["x"] = kw["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(InvalidInput, match="contiguous"):
        cpp_step.launch(**kw)


def test_op_returns_out():
    """The op registered by fastdiff.ops dispatches to this backend (and returns the caller's out)."""
    kw = make_inputs(StepCase(cfg=True, next_in=True, seed=5))
    out = kw["out"]
    assert fused_step(**kw, backend="cpp") is out
    assert torch.isfinite(out).all()
