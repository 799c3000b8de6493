"""The torch reference step against the plan.py math written out independently in float64, plus op plumbing."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff.errors import InvalidInput, UnknownBackend
from fastdiff.ops import fused_step
from fastdiff.schedulers.plan import HIST_SLOTS, NCOEF, Col, StepPlan, empty_coefs


def random_row(rng: np.random.Generator, wslot: int) -> np.ndarray:
    row = rng.normal(size=NCOEF)
    row[Col.WSLOT], row[Col.STEP], row[Col.NOISE] = wslot, 1, 1
    return row


def expected(row, mo, x, hist, saved, noise, g, m_scale, clip):
    """plan.py's docstring, line by line, in float64 numpy."""
    b = x.shape[0]
    u, c = mo[:b], mo[b:]
    m = (u + g * (c - u)) * m_scale.reshape(-1, 1, 1, 1)
    x0 = np.clip(row[Col.PX] * x + row[Col.PM] * m, -clip, clip)
    hsum_o = sum(row[Col.OH0 + j] * hist[j] for j in range(HIST_SLOTS))
    hsum_s = sum(row[Col.SH0 + j] * hist[j] for j in range(HIST_SLOTS))
    saved_new = row[Col.SX] * x + row[Col.SM] * m + row[Col.S0] * x0 + row[Col.SS] * saved + hsum_s
    prev = (row[Col.OX] * x + row[Col.OM] * m + row[Col.O0] * x0 + row[Col.OS] * saved + row[Col.ON] * noise
            + hsum_o)
    return prev, saved_new, x0


@pytest.mark.parametrize("wslot", [-1, 0, 2])
def test_reference_matches_written_out_math(wslot):
    rng = np.random.default_rng(wslot + 5)
    row = random_row(rng, wslot)
    shape = (3, 4, 5, 7)
    mo, x, noise, saved = (rng.normal(size=s) for s in ((6,) + shape[1:], shape, shape, shape))
    hist = rng.normal(size=(HIST_SLOTS,) + shape)
    m_scale = rng.uniform(0.5, 1.5, size=3)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    hist_t, saved_t = t(hist), t(saved)
    next_in = torch.full((6,) + shape[1:], float("nan"), dtype=torch.float64)
    out = torch.full(shape, float("nan"), dtype=torch.float64)
    fused_step(t(mo), t(x), torch.tensor(row, dtype=torch.float32), out, guidance_scale=2.5, cfg=True, hist=hist_t,
               saved=saved_t, noise=t(noise), next_in=next_in, m_scale=torch.tensor(m_scale, dtype=torch.float32),
               clip_range=1.5, backend="torch")
    row32 = row.astype(np.float32).astype(np.float64)  # the op takes float32 coefficients
    ms32 = m_scale.astype(np.float32).astype(np.float64)
    prev, saved_new, x0 = expected(row32, mo, x, hist, saved, noise, 2.5, ms32, 1.5)
    np.testing.assert_allclose(out.numpy(), prev, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(saved_t.numpy(), saved_new, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(next_in[:3].numpy(), prev * row32[Col.IN_NEXT], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(next_in[3:].numpy(), prev * row32[Col.IN_NEXT], rtol=1e-6, atol=1e-6)
    for j in range(HIST_SLOTS):
        np.testing.assert_allclose(hist_t[j].numpy(), x0 if j == wslot else hist[j], rtol=1e-6, atol=1e-6)


def test_zero_coefficient_terms_are_not_read():
    row = np.zeros(NCOEF, dtype=np.float32)
    row[Col.PX], row[Col.OX], row[Col.WSLOT] = 1.0, 1.0, -1.0
    x = torch.randn(2, 3, 4, 4)
    nan = torch.full_like(x, float("nan"))
    out = fused_step(torch.randn(2, 3, 4, 4), x, torch.tensor(row), hist=torch.full((3, 2, 3, 4, 4), float("nan")),
                     saved=nan.clone(), noise=nan, backend="torch")
    torch.testing.assert_close(out, x)


def test_flag_marks_the_step():
    row = empty_coefs(4)[2].astype(np.float32)
    row[Col.PM], row[Col.OM] = 1.0, 1.0
    flag = torch.zeros(4, dtype=torch.int32)
    mo = torch.randn(1, 2, 3, 3)
    mo[0, 1, 1, 1] = float("inf")
    fused_step(mo, torch.randn(1, 2, 3, 3), torch.tensor(row), flag=flag, backend="torch")
    assert flag.tolist() == [0, 0, 1, 0]


def test_op_validation_errors():
    row = torch.zeros(NCOEF)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(InvalidInput, match=r"model_out must have shape \(4, 4, 8, 8\) \(2B for CFG"):
        fused_step(torch.randn(2, 4, 8, 8), x, row, cfg=True)
    with pytest.raises(InvalidInput, match="dtype torch.float16 but x has torch.float32"):
        fused_step(torch.randn(2, 4, 8, 8, dtype=torch.float16), x, row)
    with pytest.raises(InvalidInput, match="coef must be one coefficient row"):
        fused_step(torch.randn(2, 4, 8, 8), x, torch.zeros(3))
    with pytest.raises(InvalidInput, match="guidance_scale must be finite"):
        fused_step(torch.randn(4, 4, 8, 8), x, row, cfg=True, guidance_scale=float("nan"))
    with pytest.raises(UnknownBackend, match="unknown step backend 'fast'"):
        fused_step(torch.randn(2, 4, 8, 8), x, row, backend="fast")


def test_non_contiguous_inputs_and_outputs():
    rng = np.random.default_rng(0)
    row = torch.tensor(random_row(rng, 1), dtype=torch.float32)
    x = torch.randn(4, 8, 8, 2).permute(3, 0, 1, 2)  # (2, 4, 8, 8), non-contiguous
    mo = torch.randn(4, 4, 8, 16)[..., ::2]
    out = torch.full((2, 4, 8, 8, 2), float("nan"))[..., 0]
    ref = fused_step(mo.contiguous(), x.contiguous(), row, cfg=True, guidance_scale=2.0, backend="torch")
    fused_step(mo, x, row, out, cfg=True, guidance_scale=2.0, backend="torch")
    torch.testing.assert_close(out, ref)


def test_plan_validation():
    with pytest.raises(ValueError, match="coefs must be"):
        StepPlan("x", np.zeros(3), np.zeros((2, NCOEF)))


def test_import_without_compiled_modules():
    code = ("import sys; sys.modules['fastdiff._C_cpu'] = None; sys.modules['fastdiff._C_cuda'] = None\n"
            "import fastdiff; from fastdiff import _ext\n"
            "assert not _ext.cpu_available() and 'import' in _ext.cpu_error().lower()\n"
            "from fastdiff.errors import ExtensionNotBuilt\n"
            "try:\n    _ext.require_cpu()\nexcept ExtensionNotBuilt as e:\n    print('OK', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK backend 'cpp' cannot run here" in res.stdout and "Rebuild with" in res.stdout


def test_info_command_lists_backends_with_reasons():
    res = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "step backends" in res.stdout and re.search(r"cpu\s+torch\s+available", res.stdout)
    assert "cuda" in res.stdout and "unavailable:" in res.stdout
    assert "model-op kernels" in res.stdout and "[group_norm]" in res.stdout


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_op_under_torch_compile(backend):
    """Compiled code goes through the fastdiff::fused_step custom op (eager calls launch directly)."""
    from fastdiff.ops import BACKENDS

    if BACKENDS[backend].not_supported_reasons(torch.empty(1)):
        pytest.skip(f"{backend} backend not available here")
    rng = np.random.default_rng(3)
    row = torch.tensor(random_row(rng, 0), dtype=torch.float32)
    x, mo = torch.randn(2, 4, 6, 6), torch.randn(4, 4, 6, 6)

    def step(mo, x, row, hist):
        return fused_step(mo, x, row, guidance_scale=3.0, cfg=True, hist=hist, backend=backend)

    hist_e, hist_c = torch.zeros(3, 2, 4, 6, 6), torch.zeros(3, 2, 4, 6, 6)
    eager = step(mo, x, row, hist_e)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(mo, x, row, hist_c)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(hist_c, hist_e)
