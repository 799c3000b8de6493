"""The generic fused sampler step as one Triton kernel (the ``triton`` backend of :func:`fastdiff.ops.fused_step`).

Math and semantics are those of :func:`fastdiff.ops.step.step_reference` (see :mod:`fastdiff.schedulers.plan`):
CFG, per-sample guidance rescale, x0 prediction, clip / dynamic-threshold clamp, the linear update of ``out`` and
``saved``, the history-ring write, ``next_in`` (into every CFG half) and the non-finite flag, in one pass. The
coefficient row is read by the kernel from device memory (the host never looks at it, so a step whose row is
selected on the device can be captured in a CUDA graph); an optional term whose coefficient is zero is skipped by a
scalar branch, so its tensor is not read. Arithmetic is fp32 on fp32 / fp16 / bf16 storage.

Floor (bytes the step must move per latent element, s = bytes per stored element; achieved GB/s = bytes / time, to
be compared with the measured device-to-device copy bandwidth, ~3 TB/s on an H100 SXM):

- Euler / DDIM with CFG: read 2 model outputs + x, write out + 2 next_in halves = 6s (fp16: 12 B; fp32: 24 B).
- the same without CFG: read model output + x, write out + next_in = 4s (fp16: 8 B).
- Euler-ancestral with CFG: + noise = 7s (fp16: 14 B).
- DPM-Solver++ 2M with CFG: + read one history slot + write the new x0 slot = 8s (fp16: 16 B).
- UniPC-bh2 with CFG (corrector): + read saved and up to 2 history slots, write saved and one slot = ~11s.

The coefficient row (96 B) and per-sample factors are per launch, not per element. At SD-sized latents
(1x4x128x128 fp16, ~0.8 MB for CFG Euler) the floor is well under a microsecond, so there the launch latency, not
bandwidth, is what the benchmark will see; bandwidth matters for video latents and large batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels.triton.twin import interpreting, twin
from fastdiff.schedulers.plan import HIST_SLOTS, Col

# Column indices as compile-time constants (Triton only lets a kernel read globals that are constexpr).
_PX = tl.constexpr(int(Col.PX))
_PM = tl.constexpr(int(Col.PM))
_OX = tl.constexpr(int(Col.OX))
_OM = tl.constexpr(int(Col.OM))
_O0 = tl.constexpr(int(Col.O0))
_OS = tl.constexpr(int(Col.OS))
_ON = tl.constexpr(int(Col.ON))
_OH0 = tl.constexpr(int(Col.OH0))
_SX = tl.constexpr(int(Col.SX))
_SM = tl.constexpr(int(Col.SM))
_S0 = tl.constexpr(int(Col.S0))
_SS = tl.constexpr(int(Col.SS))
_SH0 = tl.constexpr(int(Col.SH0))
_WSLOT = tl.constexpr(int(Col.WSLOT))
_IN_NEXT = tl.constexpr(int(Col.IN_NEXT))
_STEP = tl.constexpr(int(Col.STEP))
_HIST_SLOTS = tl.constexpr(HIST_SLOTS)

CLAMP_NONE, CLAMP_CLIP, CLAMP_THRESHOLD = 0, 1, 2
# FMA contraction (the launcher's enable_fp_fusion): off, for a step that is the reference's bit for bit (_launch).
FP_FUSION = False


# flag_len is only a bound check: specializing on it (== 1, % 16) would just compile more variants.
@twin(do_not_specialize=["flag_len"])
def _fused_step_kernel(  # no calls to jit functions in here: see twin.py
    model_out_ptr, x_ptr, coef_ptr, out_ptr, hist_ptr, saved_ptr, noise_ptr, next_ptr, m_scale_ptr, x0_limit_ptr,
    flag_ptr, guidance_scale, clip_range, numel, per_sample, flag_len,
    CFG: tl.constexpr, HAS_HIST: tl.constexpr, HAS_SAVED: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_NEXT: tl.constexpr, HAS_MSCALE: tl.constexpr, CLAMP: tl.constexpr, HAS_FLAG: tl.constexpr,
    WIDE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program handles BLOCK consecutive elements of the flat (B * per_sample) sample; model_out / next_in /
    # hist hold 2 or 3 such planes back to back, addressed as plane * numel + offs.
    pid = tl.program_id(0)
    if WIDE:
        # plane * numel can pass 2**31 for video latents: do all address arithmetic in int64.
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        numel = numel.to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel

    px = tl.load(coef_ptr + _PX)
    pm = tl.load(coef_ptr + _PM)
    ox = tl.load(coef_ptr + _OX)
    om = tl.load(coef_ptr + _OM)
    o0 = tl.load(coef_ptr + _O0)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(model_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(model_out_ptr + numel + offs, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (c - u)
    else:
        m = tl.load(model_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MSCALE or CLAMP == 2:
        b = offs // per_sample  # sample index for the per-sample factors (B floats, cached)
    if HAS_MSCALE:
        m = m * tl.load(m_scale_ptr + b, mask=mask, other=1.0)

    x0 = px * x + pm * m
    # Clamps via where (not min/max) so a NaN x0 stays NaN, as torch.clamp / minimum / maximum keep it.
    if CLAMP == 1:
        x0 = tl.where(x0 > clip_range, clip_range, x0)
        x0 = tl.where(x0 < -clip_range, -clip_range, x0)
    elif CLAMP == 2:
        s = tl.load(x0_limit_ptr + b, mask=mask, other=1.0)
        x0 = tl.where(x0 > s, s, x0)
        x0 = tl.where(x0 < -s, -s, x0)
        # Correctly rounded, as torch divides. Triton's `/` on fp32 is div.full.f32 (about 2 ulp) on NVIDIA GPUs, and
        # on an H200 with Triton 3.6 tl.fdiv(..., ieee_rounding=True) also missed torch's quotient in 28 % of 1M
        # random fp32 pairs; div_rn matched it in all (measured 2026-11-26).
        x0 = tl.math.div_rn(x0, s)

    # x, m and x0 are always read, so their terms are plain products (0 * NaN = NaN, as in the reference). The
    # optional inputs below are read only when a coefficient that uses them is nonzero: a uniform scalar branch.
    prev = ox * x + om * m + o0 * x0
    if HAS_NOISE:
        c_on = tl.load(coef_ptr + _ON)
        if c_on != 0:
            prev += c_on * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SAVED:
        c_os = tl.load(coef_ptr + _OS)
        c_ss = tl.load(coef_ptr + _SS)
        new_saved = tl.load(coef_ptr + _SX) * x + tl.load(coef_ptr + _SM) * m + tl.load(coef_ptr + _S0) * x0
        saved_term = tl.full([BLOCK], 0.0, tl.float32)  # c_os * saved, added to prev after the history terms (below)
        if (c_os != 0) | (c_ss != 0):
            sv = tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if c_os != 0:
                saved_term = c_os * sv
            if c_ss != 0:
                new_saved += c_ss * sv
    if HAS_HIST:
        for j in tl.static_range(_HIST_SLOTS):
            c_oh = tl.load(coef_ptr + _OH0 + j)
            used = c_oh != 0
            if HAS_SAVED:
                c_sh = tl.load(coef_ptr + _SH0 + j)
                used = used | (c_sh != 0)
            if used:
                h = tl.load(hist_ptr + j * numel + offs, mask=mask, other=0.0).to(tl.float32)
                if c_oh != 0:
                    prev += c_oh * h
                if HAS_SAVED:
                    if c_sh != 0:
                        new_saved += c_sh * h
    if HAS_SAVED:
        # The terms are summed in the reference's order (noise, history, saved), and FMA contraction is off (see
        # _launch): the step is then the reference's bit for bit. Summed in another order, a one-ulp difference grew
        # over a 10-step UniPC loop (random UNet, CFG 4) to 1.5e-4 on CPU, and to 0.099 on an H200, whose TF32
        # convolutions turn a one-ulp change of their input into a change at the 1e-3 level. Adding the zero of an
        # unused term is what the reference does too (its _term is 0 there).
        prev += saved_term

    # All reads of this element are done: now the writes (out may alias x; saved and hist are updated in place).
    # Each lane writes only the offsets it read, so in-place updates need no barrier.
    if HAS_HIST:
        wslot = tl.load(coef_ptr + _WSLOT)
        if (wslot >= 0) & (wslot < _HIST_SLOTS):  # -1: this step keeps no x0; the bound keeps a bad row in memory
            ws = wslot.to(tl.int32)
            tl.store(hist_ptr + ws * numel + offs, x0.to(hist_ptr.dtype.element_ty), mask=mask)
    if HAS_SAVED:
        tl.store(saved_ptr + offs, new_saved.to(saved_ptr.dtype.element_ty), mask=mask)
    prev_stored = prev.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, prev_stored, mask=mask)
    if HAS_NEXT:
        # The next model input is scaled from the *stored* sample, as the reference does (out.to(fp32) * IN_NEXT).
        nxt = (prev_stored.to(tl.float32) * tl.load(coef_ptr + _IN_NEXT)).to(next_ptr.dtype.element_ty)
        tl.store(next_ptr + offs, nxt, mask=mask)
        if CFG:
            tl.store(next_ptr + numel + offs, nxt, mask=mask)
    if HAS_FLAG:
        step = tl.load(coef_ptr + _STEP).to(tl.int32)
        if (step >= 0) & (step < flag_len):  # a bad row must not write outside flag
            # Only lanes that saw a non-finite value store, and they all store the same 1: no atomics needed. (The
            # one-address pointer gets a 1-element-per-thread layout, so `bad` goes through shared memory: one
            # barrier per program, the only one in the kernel.)
            bad = ((prev != prev) | (tl.abs(prev) == float("inf"))) & mask
            tl.store(flag_ptr + tl.full([BLOCK], step, tl.int32), tl.full([BLOCK], 1, tl.int32), mask=bad)


def _config(numel: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps). A starting heuristic for a bandwidth-bound elementwise op (8-16 elements per thread,
    so fp16 moves in 16-byte vectors); to be tuned on the H100 (benches/NOTES.md)."""
    if interpret:
        # One small config: many programs, so block tails and blocks that straddle two samples get exercised.
        return 256, 1
    if numel < (1 << 20):
        return 1024, 4
    if numel < (1 << 23):
        return 2048, 8
    return 4096, 8


def _launch(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range, x0_limit,
            flag, force_wide: bool = False) -> None:
    numel = x.numel()
    per_sample = numel // x.shape[0]
    interpret = interpreting()
    block, num_warps = _config(numel, interpret)
    clamp = CLAMP_CLIP if clip_range is not None else CLAMP_THRESHOLD if x0_limit is not None else CLAMP_NONE
    # The largest offset is (HIST_SLOTS - 1) * numel + numel (hist), or 2 * numel (CFG model_out / next_in).
    wide = force_wide or (max(HIST_SLOTS, 2) * numel + block >= 2**31)

    def ptr(t, dummy):
        # Absent inputs get a dummy pointer; their constexpr switch keeps the kernel from touching it.
        return dummy if t is None else t

    grid = (triton.cdiv(numel, block),)
    args = (
        model_out, x, coef, out, ptr(hist, x), ptr(saved, x), ptr(noise, x), ptr(next_in, x), ptr(m_scale, coef),
        ptr(x0_limit, coef), ptr(flag, coef), float(guidance_scale), float(clip_range or 0.0), numel, per_sample,
        0 if flag is None else flag.numel(),
    )
    meta = dict(
        CFG=bool(cfg), HAS_HIST=hist is not None, HAS_SAVED=saved is not None, HAS_NOISE=noise is not None,
        HAS_NEXT=next_in is not None, HAS_MSCALE=m_scale is not None, CLAMP=clamp, HAS_FLAG=flag is not None,
        WIDE=wide, BLOCK=block,
    )
    # FMA contraction off, as the C++ / CUDA builds compile (-ffp-contract=off / --fmad=false): with it, a * b + c
    # rounds once where the reference rounds twice, and the step is no longer the reference's bit for bit (costs
    # nothing measurable here: the kernel is bandwidth-bound). Explicit, since Triton 3.9 warns on the default.
    options = dict(num_warps=num_warps, enable_fp_fusion=FP_FUSION)
    kernel = _fused_step_kernel.kernel()  # the flavour TRITON_INTERPRET asks for now
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device and its current stream: make that x's device.
        with torch.cuda.device(x.device):
            kernel[grid](*args, **meta, **options)
    else:
        kernel[grid](*args, **meta, **options)


def launch(
    model_out: torch.Tensor,
    x: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
    guidance_scale: float = 1.0,
    cfg: bool = False,
    hist: torch.Tensor | None = None,
    saved: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    next_in: torch.Tensor | None = None,
    m_scale: torch.Tensor | None = None,
    clip_range: float | None = None,
    x0_limit: torch.Tensor | None = None,
    flag: torch.Tensor | None = None,
) -> None:
    """Run one fused step; same arguments, shapes and effects as :func:`fastdiff.ops.step.step_reference`.

    Tensors must be contiguous, on one device, and already validated (:func:`fastdiff.ops.fused_step` does both).
    ``coef`` is a (NCOEF,) float32 row in device memory; it is never read on the host. Differences from the
    reference only where the reference would raise: a WSLOT >= HIST_SLOTS writes no history slot, and a STEP
    outside ``flag`` sets no flag.
    """
    _launch(model_out, x, coef, out, guidance_scale, cfg, hist, saved, noise, next_in, m_scale, clip_range, x0_limit,
            flag)
