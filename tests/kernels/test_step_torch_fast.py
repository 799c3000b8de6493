"""The fast PyTorch step (``fused_step(backend="torch-fast")``) against the torch reference, and ``auto`` falling to
it when no compiled kernel can run.

Cases come from :mod:`tests.step_cases` (every scheduler-like feature set, zero coefficients whose inputs are NaN,
WSLOT -1..2, odd shapes, non-contiguous and misaligned views, in-place ``out=x``, NaN injection, fp32 / fp16 / bf16).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.kernels.torch_fast.step import step_fast
from fastdiff.ops import BACKENDS, fused_step, registry
from fastdiff.schedulers.plan import NCOEF, Col
from tests.step_cases import CASES, check_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_fast_matches_reference(case):
    check_case(case, backend="torch-fast")


def test_float64_matches_reference():
    x, mo = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    row = torch.rand(NCOEF)
    row[Col.WSLOT] = 1
    hist = torch.randn(3, 2, 3, 4, 4, dtype=torch.float64)
    res = {}
    for backend in ("torch", "torch-fast"):
        h = hist.clone()
        res[backend] = (fused_step(mo, x, row, guidance_scale=3.0, cfg=True, hist=h, backend=backend), h)
    torch.testing.assert_close(res["torch-fast"], res["torch"], rtol=1e-12, atol=1e-12)


def test_host_row_is_used_instead_of_the_tensor():
    """The loop passes the row's host copy; the device row is then not read (no sync on a GPU)."""
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    row = torch.zeros(NCOEF)
    row[Col.OX], row[Col.OM], row[Col.WSLOT] = 0.5, -2.0, -1
    want = torch.empty_like(x)
    step_fast(mo, x, row, want)
    got = torch.empty_like(x)
    step_fast(mo, x, torch.full((NCOEF,), float("nan")), got, host_coef=row.tolist())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want, 0.5 * x - 2.0 * mo)


def test_registered_as_its_own_backend_and_not_graph_capturable():
    assert BACKENDS["torch-fast"].host_coef and not BACKENDS["torch"].host_coef
    assert BACKENDS["torch"].launch_fn().__name__ == "step_reference"  # "torch" stays the reference


def test_auto_falls_to_torch_fast_when_no_kernel_runs(monkeypatch, caplog):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    monkeypatch.setitem(registry.ENVIRONMENT, "cpp", lambda device: ["not built (test)"])
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert registry.resolve("auto", torch.empty(3)).name == "torch-fast"
        assert registry.resolve("auto", torch.empty(3)).name == "torch-fast"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'torch-fast'" in warnings[0].getMessage()
    assert "not built (test)" in warnings[0].getMessage()
    assert registry.resolve("auto", torch.empty(3, device="meta")).name == "torch-fast"  # any other device


def test_auto_without_compiled_modules_is_torch_fast():
    code = (
        "import sys; sys.modules['fastdiff._C_cpu'] = None; sys.modules['fastdiff._C_cuda'] = None\n"
        "import torch\n"
        "from fastdiff.ops import resolve\n"
        "print(resolve('auto', torch.empty(1)).name)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "torch-fast", res.stderr
