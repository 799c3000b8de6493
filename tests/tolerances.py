"""The one table of tolerances, and comparison helpers that say where tensors differ."""

from __future__ import annotations

import torch

# (rtol, atol) per storage dtype for "fast backend vs torch reference" comparisons.
STEP_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
# Scheduler parity against diffusers: max |a - b| / max |b| over a step (fp32), and over a full loop.
SCHED_STEP_RTOL = 1e-5
SCHED_LOOP_RTOL = 1e-4
# A full loop of the trained digits network against a diffusers loop, fp32: the network amplifies rounding, and with
# its cosine schedule Euler starts at sigma 2.0e4; diffusers' own fp32 loop is 2.7e-4 from its float64 run there.
TRAINED_LOOP_RTOL = 1e-3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's dtype)."""
    rtol, atol = STEP_TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny), computed in float64."""
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so an element the kernel forgets to write fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)
