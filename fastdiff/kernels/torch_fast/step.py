"""The ``torch-fast`` step: plain PyTorch like the reference, but in place and reading the coefficient row on the host.

It is what ``auto`` runs when no compiled kernel can (the C++ / CUDA modules not built, no Triton), so a user without
a compiled module is not slower than the diffusers loop. The reference (:func:`fastdiff.ops.step.step_reference`)
stays the oracle; this one is tested against it over :mod:`tests.step_cases`.

What makes it faster than the reference, which keeps every coefficient on the device (graph-capturable, no sync):

- the row is read on the host (``host_coef``: the loop passes ``plan.coefs[i]``, so no device read), so a term
  whose coefficient is exactly 0 is skipped (not read, as in the kernels) instead of ``torch.where(c != 0, c * t, 0)``
  over the whole tensor, and the history slot is a Python index;
- float32 storage is accumulated in place (``mul`` into the output, then ``add_(t, alpha=c)``): one pass per term and
  no temporaries beyond the guided output and x0; the next model input is one broadcast ``mul`` into both CFG halves.

Measured on a 2-core x86 VM, SDXL-size x4 fp32 (4x4x128x128), DPM-Solver++ 2M with CFG, per step: reference
2.35 ms, diffusers' pipeline arithmetic 1.79 ms (benches/results/*-step.md); see benches/bench_loop.py for this one.
Without ``host_coef`` the row is read with ``coef.tolist()``, a host<->device sync on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff.ops.guidance import compute_dtype
from fastdiff.schedulers.plan import HIST_SLOTS, Col


def _accumulate(dst: torch.Tensor | None, terms: list, like: torch.Tensor) -> torch.Tensor:
    """sum(c * t for c, t in terms) written into ``dst`` (a new tensor like ``like`` when None). ``dst`` may be the
    first term's tensor (scaled in place first) but no later one's. No terms: zeros."""
    if not terms:
        return torch.zeros_like(like) if dst is None else dst.zero_()
    c0, t0 = terms[0]
    if dst is None:
        dst = torch.mul(t0, c0)
    elif dst is t0:
        dst.mul_(c0)
    else:
        torch.mul(t0, c0, out=dst)
    for c, t in terms[1:]:
        dst.add_(t, alpha=c)
    return dst


def _storage(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.untyped_storage().data_ptr()


def step_fast(
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
    host_coef: Sequence[float] | None = None,
) -> None:
    """Same arguments and math as :func:`fastdiff.ops.step.step_reference` (contiguous tensors, validated by
    :func:`fastdiff.ops.fused_step`), plus ``host_coef``: the row ``coef`` holds, as host numbers."""
    k = coef.tolist() if host_coef is None else host_coef
    ct = compute_dtype(x)
    batch = x.shape[0]
    bshape = (batch,) + (1,) * (x.dim() - 1)

    def f(t: torch.Tensor) -> torch.Tensor:  # a stored tensor in compute precision (itself when it already is)
        return t if t.dtype == ct else t.to(ct)

    xf = f(x)
    if cfg:
        # u + g * (c - u) in one pass (lerp); g = 1 gives c and g = 0 gives u exactly, as the reference does
        m = torch.lerp(f(model_out[:batch]), f(model_out[batch:]), guidance_scale)
        if m_scale is not None:
            m.mul_(m_scale.to(ct).view(bshape))
    else:
        m = f(model_out)
        if m_scale is not None:
            m = m * m_scale.to(ct).view(bshape)  # not in place: m may be model_out itself

    def nz(col, t):  # the term, unless its tensor is absent or its coefficient 0 (then it is not read)
        return [(k[col], t)] if t is not None and k[col] != 0 else []

    x0 = _accumulate(None, nz(Col.PX, xf) + nz(Col.PM, m), xf)
    if clip_range is not None:
        x0.clamp_(-clip_range, clip_range)
    elif x0_limit is not None:
        s = x0_limit.to(ct).view(bshape)
        torch.maximum(torch.minimum(x0, s, out=x0), -s, out=x0).div_(s)

    hist_f = {}
    if hist is not None:  # only the slots a nonzero coefficient reads (the others may hold anything, NaN included)
        for j in range(HIST_SLOTS):
            if k[Col.OH0 + j] != 0 or (saved is not None and k[Col.SH0 + j] != 0):
                hist_f[j] = f(hist[j])
    sv = f(saved) if saved is not None and (k[Col.OS] != 0 or k[Col.SS] != 0) else None
    nf = f(noise) if noise is not None and k[Col.ON] != 0 else None

    def hist_terms(first):
        return [(k[first + j], h) for j, h in hist_f.items() if k[first + j] != 0]

    # prev goes straight into out (float32 storage) when out is x itself -- x's term comes first, so x is scaled in
    # place before any other term is added -- or shares memory with no input; else through a temporary.
    inputs = {_storage(t) for t in (model_out, hist, saved, noise)} - {None}
    if out.data_ptr() != x.data_ptr():
        inputs.add(_storage(x))
    direct = out.dtype == ct and _storage(out) not in inputs
    new_saved = None
    if saved is not None:  # reads x, saved and hist: before out (maybe x), saved and hist are written
        new_saved = _accumulate(None, nz(Col.SX, xf) + nz(Col.SM, m) + nz(Col.S0, x0) + nz(Col.SS, sv)
                                + hist_terms(Col.SH0), xf)
    prev_terms = nz(Col.OX, xf) + nz(Col.OM, m) + nz(Col.O0, x0) + nz(Col.OS, sv) + nz(Col.ON, nf) + hist_terms(Col.OH0)
    prev = _accumulate(out if direct else None, prev_terms, xf)

    # All reads are done: now the writes.
    wslot = int(k[Col.WSLOT])
    if hist is not None and wslot >= 0:
        hist[wslot].copy_(x0)
    if new_saved is not None:
        saved.copy_(new_saved)
    if prev is not out:
        out.copy_(prev)
    if next_in is not None:
        # out * IN_NEXT into every CFG half at once (a broadcast multiply); from out's stored value, as the reference
        halves = next_in.shape[0] // batch
        nxt = next_in.view((halves,) + tuple(out.shape))
        src = f(out).unsqueeze(0).expand_as(nxt)
        if next_in.dtype == ct:
            torch.mul(src, k[Col.IN_NEXT], out=nxt)
        else:
            nxt.copy_(src * k[Col.IN_NEXT])
    if flag is not None:
        step = int(k[Col.STEP])
        # min and max are both finite iff every element is (they propagate NaN): one reduction, 30 us here where
        # isfinite(prev).all() took 785 us (4x4x128x128 fp32, 1 thread)
        bad = torch.isfinite(torch.stack(torch.aminmax(prev))).all().logical_not().to(flag.dtype)
        fv = flag.narrow(0, step, 1)
        torch.maximum(fv, bad, out=fv)
