"""The ``torch`` backend of the fused step: plain PyTorch, the oracle every faster backend is tested against.

The math is the one in :mod:`fastdiff.schedulers.plan`. Arithmetic runs in float32 (float64 if the inputs are
float64) whatever the storage dtype, as the kernels do. Nothing here reads a tensor value on the host, so the
reference step is free of host<->device syncs and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from fastdiff.ops.guidance import compute_dtype, guided_output
from fastdiff.schedulers.plan import HIST_SLOTS, Col


def _term(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # A zero coefficient means "not read" in the kernels: 0 * NaN must stay 0 here too.
    return torch.where(c != 0, c * t, torch.zeros((), dtype=t.dtype, device=t.device))


def step_reference(
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
    """One generic linear sampler step (see :mod:`fastdiff.schedulers.plan`), writing ``out`` and the optional
    ``hist`` / ``saved`` / ``next_in`` / ``flag`` buffers in place. Shapes: ``x``, ``out``, ``noise``, ``saved``:
    (B, *S); ``model_out``, ``next_in``: (2B, *S) with CFG else (B, *S); ``hist``: (HIST_SLOTS, B, *S);
    ``coef``: (NCOEF,); ``m_scale``, ``x0_limit``: (B,) float32; ``flag``: (num_steps,) int32."""
    ct = compute_dtype(x)
    batch = x.shape[0]
    bshape = (batch,) + (1,) * (x.dim() - 1)
    k = coef.to(device=x.device, dtype=ct)
    xf = x.to(ct)
    m = guided_output(model_out, batch, guidance_scale, cfg)
    if m_scale is not None:
        m = m * m_scale.to(ct).view(bshape)

    x0 = k[Col.PX] * xf + k[Col.PM] * m
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    elif x0_limit is not None:
        s = x0_limit.to(ct).view(bshape)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s

    prev = k[Col.OX] * xf + k[Col.OM] * m + k[Col.O0] * x0
    if noise is not None:
        prev = prev + _term(k[Col.ON], noise.to(ct))
    hist_f = [hist[j].to(ct) for j in range(HIST_SLOTS)] if hist is not None else []
    for j, h in enumerate(hist_f):
        prev = prev + _term(k[Col.OH0 + j], h)
    new_saved = None
    if saved is not None:
        sv = saved.to(ct)
        prev = prev + _term(k[Col.OS], sv)
        new_saved = k[Col.SX] * xf + k[Col.SM] * m + k[Col.S0] * x0 + _term(k[Col.SS], sv)
        for j, h in enumerate(hist_f):
            new_saved = new_saved + _term(k[Col.SH0 + j], h)

    # All reads are done: now the writes (out / saved may alias x / saved).
    if hist is not None:
        wslot = k[Col.WSLOT]
        idx = wslot.clamp(min=0).long().view(1)
        current = hist.index_select(0, idx)
        hist.index_copy_(0, idx, torch.where(wslot >= 0, x0.to(hist.dtype).unsqueeze(0), current))
    if new_saved is not None:
        saved.copy_(new_saved)
    out.copy_(prev)
    if next_in is not None:
        scaled = (out.to(ct) * k[Col.IN_NEXT]).to(next_in.dtype)
        for half in range(next_in.shape[0] // batch):
            next_in[half * batch:(half + 1) * batch].copy_(scaled)
    if flag is not None:
        bad = (~torch.isfinite(prev)).any().to(flag.dtype).view(1)
        sidx = k[Col.STEP].long().view(1)
        flag.index_copy_(0, sidx, torch.maximum(flag.index_select(0, sidx), bad))
