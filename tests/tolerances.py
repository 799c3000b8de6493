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
# Decoded pipeline images in [0, 1], fp32: the same latents through the same VAE, so only fp32 rounding differs.
IMG_ATOL = 2e-5

# Fused model ops (attention, GroupNorm) against a float64 truth computed from the same rounded inputs, stated as in
# flash-attention's tests: the kernel's max abs error may be k x the max abs error of PyTorch's own op run at the
# test's precision (SDPA; x + add, F.group_norm, F.silu) plus a floor. {op: {dtype: (k, floor)}}.
#   k = 2 (flash-attention's multiple): the kernel rounds in another order than PyTorch, not more coarsely.
#     Measured (CPU: Triton interpreter and C++ kernel), kernel error / PyTorch error at most: attention fp32 1.13,
#     fp16 1.0; GroupNorm fp32 2.96 (only where PyTorch's error is ~1e-7 and the floor decides), fp16 1.0, bf16 0.97.
#   floor, fp32: PyTorch is sometimes exact (one query and one key: error 0) or within 1.3e-7, and the kernel may
#     still round outputs of up to |y| ~ 8 once: ulp(8) = 9.5e-7. Measured need at k = 2: 0 (attention), 1.8e-7
#     (GroupNorm). fp16 / bf16: PyTorch's own error is never below 2.4e-4 (attention) / 1.8e-3 (GroupNorm) in these
#     tests, so the floor there only keeps the bound positive.
#   attention_interpret: the Triton interpreter truncates fp32 -> bf16 stores instead of rounding to nearest (up to
#     one bf16 ulp where rounding makes half of one), so bf16 gets twice the multiple (measured ratio 2.86).
_HALF_FLOOR = 1e-5
REF_ERR_TOL = {
    "attention": {torch.float32: (2.0, 1e-6), torch.float16: (2.0, _HALF_FLOOR), torch.bfloat16: (2.0, _HALF_FLOOR)},
    "group_norm": {torch.float32: (2.0, 1e-6), torch.float16: (2.0, _HALF_FLOOR), torch.bfloat16: (2.0, _HALF_FLOOR)},
}
REF_ERR_TOL["attention_interpret"] = {**REF_ERR_TOL["attention"], torch.bfloat16: (4.0, _HALF_FLOOR)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = ""):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's dtype)."""
    rtol, atol = STEP_TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{msg}\n{m}")


def assert_within_reference_error(actual: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, op: str):
    """max |actual - truth| <= k * max |reference - truth| + floor, (k, floor) = REF_ERR_TOL[op][actual.dtype].

    ``reference`` is PyTorch's own op at the test's precision, ``truth`` the float64 result from the same inputs."""
    assert actual.shape == truth.shape == reference.shape, (actual.shape, reference.shape, truth.shape)
    k, floor = REF_ERR_TOL[op][actual.dtype]
    diff = (actual.double() - truth.double()).abs()
    err, err_ref = diff.max().item(), (reference.double() - truth.double()).abs().max().item()
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert err <= k * err_ref + floor, (
        f"{op} {actual.dtype}: kernel error {err:.3g} (at {where}) > {k:g} x PyTorch's error {err_ref:.3g} + "
        f"{floor:g}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny), computed in float64."""
    a, b = actual.double(), expected.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so an element the kernel forgets to write fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)
# Served images (uint8, 256 levels) against the same rows sampled alone or by `python -m fastdiff sample`: the same
# noise and network; batching rows together may change fp32 rounding by an ulp, which can flip a pixel's rounding
# to the next level. Measured on CPU (digits, tiny models): 0 levels.
SERVED_LEVELS_ATOL = 1
# onnxruntime (CPU, fp32) running an exported graph against the PyTorch module it was traced from, on fresh random
# inputs: max |a - b| / max |b|. Measured on the shapes pipeline's components (tiny UNet and text encoder, the
# shipped VAE decoder; batches 1, 3, 5, 16): at most 2.5e-6 (ONNX's fused ops round in another order).
ONNX_FP32_RTOL = 2e-5
# The three exported shapes graphs in the pipeline's DPM-Solver++ loop against the PyTorch pipeline, fp32 images in
# [0, 1]: each step's rounding difference passes through the solver and CFG 5. Measured: 9.6e-6 (a tiny random UNet,
# 4 and 20 steps); the shipped architecture, 8 prompts, 20 steps: 5.2e-6 after 1000 training steps, 3.7e-6 trained.
ONNX_PIPELINE_IMG_ATOL = 1e-4
