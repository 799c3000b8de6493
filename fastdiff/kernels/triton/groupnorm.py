"""GroupNorm with an optional fused input add and SiLU, in Triton: NCHW, channels-last, or any (N, C, L) strides.

    z = x + add[n, c]                                                   (optional: a ResnetBlock's time embedding)
    mean, var = mean / biased variance of z over group g's C/G channels and all L positions of sample n
    y = (z - mean) / sqrt(var + eps) * weight[c] + bias[c];   y = y * sigmoid(y) when ``silu``

Two launches over the same (N·G, SPLIT, CB) grid. A group's C/G channels are cut into CB blocks of BLOCK_C and its
L positions into SPLIT chunks; program (ng, s, cb) owns one (channel block, chunk) piece:

1. stats: the piece's mean and M2 (sum of squared deviations), by Chan's parallel merge of per-tile two-pass
   statistics. No sum / sum-of-squares shortcut: that loses every digit when |mean| >> std in fp32.
2. apply: merge the group's CB·SPLIT partials (Chan again, vectorised), fold add / mean / rstd / weight / bias
   into a per-channel center, scale and shift, and write y = (x - center)·scale + shift (then SiLU) for the
   piece -- which the stats pass just read, so at UNet sizes (a few to tens of MB) the second read mostly hits L2.

Tiles follow the memory layout. When positions are contiguous (NCHW), BLOCK_C is a power of two that divides C/G
(SD's 10 / 20 / 40 channels per group: 2 / 4 / 8), so no lane is padding and loads are 16-byte vectors along L;
otherwise (channels-last) one block holds all C/G channels, padded to a power of two, contiguous along C. Pieces
keep an H100 busy at UNet shapes, where N·G = 2 × 32 = 64 groups alone would leave half of its 132 SMs idle.
Arithmetic is fp32 on fp16 / bf16 / fp32 storage.

Floor: read x once, write y once (the second read is from L2): 2·N·C·L·s bytes (s bytes per element) at copy
bandwidth -- the goal is >= 80% of a device-to-device copy of the same tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff.kernels.triton.twin import interpreting, twin

MAX_CHANNELS_PER_GROUP = 1024  # a channels-last block holds every channel of a group
MAX_BLOCK_C_CONTIGUOUS = 16  # NCHW: channel rows per tile (the rest of the tile runs along L)
# Under the interpreter: elements per tile and programs wanted per launch. Small, so tests exercise several tiles
# per program and several programs per group; the interpreter's cost is per operation, not per element, so a test
# that only needs the result may raise them.
INTERPRET_TILE = 64
INTERPRET_PROGRAMS = 8
# On a GPU: elements per tile (16 per thread at 8 warps) and programs per SM to aim for (the tuning sweep in
# benches/bench_model.py varies both).
GPU_TILE = 4096
PROGRAMS_PER_SM = 4


@twin()
def _gn_stats_kernel(
    x_ptr, add_ptr, mean_ptr, m2_ptr,
    stride_n, stride_c, stride_l, stride_an, stride_ac,
    L, groups, split, chunk,
    CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, HAS_ADD: tl.constexpr,
):
    # No calls to jit functions in here (see twin.py): sums go through tl.reduce(..., tl.standard._sum_combine).
    ng = tl.program_id(0)
    s = tl.program_id(1)
    cb = tl.program_id(2)
    n = (ng // groups).to(tl.int64)
    c0 = (ng % groups).to(tl.int64) * CPG + cb * BLOCK_C  # first channel of this block
    base = x_ptr + n * stride_n + c0 * stride_c
    offs_c = tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    c_ok = cb * BLOCK_C + offs_c < CPG
    cw = tl.minimum(CPG - cb * BLOCK_C, BLOCK_C)  # valid channels in this block
    if HAS_ADD:
        a = tl.load(add_ptr + n * stride_an + (c0 + offs_c) * stride_ac, mask=c_ok, other=0.0).to(tl.float32)
    l0 = s * chunk
    count = tl.full([], 0.0, tl.float32)  # tensors, not Python floats: loop-carried values keep one type
    mean = tl.full([], 0.0, tl.float32)
    m2 = tl.full([], 0.0, tl.float32)
    for start in range(0, chunk, BLOCK_L):
        ls = l0 + start + offs_l
        mask = c_ok[:, None] & (ls < L)[None, :]
        x = tl.load(base + offs_c[:, None] * stride_c + ls[None, :] * stride_l, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            x = tl.where(mask, x + a[:, None], 0.0)  # masked slots must stay 0 for the tile sum
        # Tile statistics, two-pass in registers; the tile's valid count is known without counting the mask.
        n_t = (tl.minimum(tl.maximum(L - (l0 + start), 0), BLOCK_L) * cw).to(tl.float32)
        mean_t = tl.reduce(x, None, tl.standard._sum_combine) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, x - mean_t, 0.0)
        m2_t = tl.reduce(d * d, None, tl.standard._sum_combine)
        # Chan et al.: merge (count, mean, m2) with the tile's (n_t, mean_t, m2_t).
        total = count + n_t
        delta = mean_t - mean
        frac = n_t / tl.maximum(total, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * count * frac
        count = total
    slot = (ng * tl.num_programs(2) + cb) * split + s
    tl.store(mean_ptr + slot, mean)
    tl.store(m2_ptr + slot, m2)


@twin()
def _gn_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, add_ptr, mean_ptr, m2_ptr,
    stride_xn, stride_xc, stride_xl, stride_yn, stride_yc, stride_yl, stride_an, stride_ac,
    L, groups, split, chunk, total, eps,
    CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    cb = tl.program_id(2)
    num_cb = tl.num_programs(2)
    n = (ng // groups).to(tl.int64)
    c0 = (ng % groups).to(tl.int64) * CPG + cb * BLOCK_C

    # The group's statistics from its num_cb·split partials (≤ BLOCK_S). Partial (b, i) covers channel block b and
    # positions [i·chunk, min((i+1)·chunk, L)); total = L·CPG (a host float: L may be a constexpr 1).
    offs_p = tl.arange(0, BLOCK_S)
    p_ok = offs_p < num_cb * split
    p_mean = tl.load(mean_ptr + ng * num_cb * split + offs_p, mask=p_ok, other=0.0)
    p_m2 = tl.load(m2_ptr + ng * num_cb * split + offs_p, mask=p_ok, other=0.0)
    p_cw = tl.minimum(CPG - (offs_p // split) * BLOCK_C, BLOCK_C)
    p_len = tl.minimum(tl.maximum(L - (offs_p % split) * chunk, 0), chunk)
    p_n = tl.where(p_ok, p_cw * p_len, 0).to(tl.float32)
    mean = tl.reduce(p_n * p_mean, 0, tl.standard._sum_combine) / total
    dev = p_mean - mean
    m2 = tl.reduce(tl.where(p_ok, p_m2 + p_n * dev * dev, 0.0), 0, tl.standard._sum_combine)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)

    # Per channel: y = (x - center) * scale + shift, with center = mean - add and scale = rstd * w. Not folded into
    # one x * scale' + shift' FMA: with |mean| >> std that cancels catastrophically in fp32 (x - center is exact).
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = cb * BLOCK_C + offs_c < CPG
    scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    center = tl.full([BLOCK_C], 0.0, tl.float32) + mean
    if HAS_ADD:
        center = center - tl.load(add_ptr + n * stride_an + (c0 + offs_c) * stride_ac, mask=c_ok,
                                  other=0.0).to(tl.float32)
    shift = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_BIAS:
        shift = shift + tl.load(b_ptr + c0 + offs_c, mask=c_ok, other=0.0).to(tl.float32)

    x_base = x_ptr + n * stride_xn + c0 * stride_xc
    y_base = y_ptr + n * stride_yn + c0 * stride_yc
    offs_l = tl.arange(0, BLOCK_L)
    l0 = s * chunk
    for start in range(0, chunk, BLOCK_L):
        ls = l0 + start + offs_l
        mask = c_ok[:, None] & (ls < L)[None, :]
        x = tl.load(x_base + offs_c[:, None] * stride_xc + ls[None, :] * stride_xl, mask=mask, other=0.0)
        y = (x.to(tl.float32) - center[:, None]) * scale[:, None] + shift[:, None]
        if SILU:
            y = y / (1.0 + tl.exp(-y))  # y·sigmoid(y); exp overflow to inf gives -0, the right limit
        tl.store(y_base + offs_c[:, None] * stride_yc + ls[None, :] * stride_yl, y.to(y_ptr.dtype.element_ty),
                 mask=mask)


_sm_count: dict = {}


def _programs_wanted(device: torch.device) -> int:
    """About 4 programs per SM keep an H100 streaming; cached per device."""
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * _sm_count[device]


def plan(n: int, c: int, length: int, groups: int, positions_contiguous: bool, device: torch.device,
         interpret: bool) -> dict:
    """Channel blocks, tiles, and the split of each group's positions over programs.

    ``chunk`` is a multiple of BLOCK_L and ``split`` = cdiv(L, chunk): every program has at least one position and
    no position has two owners. Parallelism first (split until ~4 programs per SM), then the biggest tile that fits
    a chunk (up to 4096 elements: 16 per thread at 8 warps)."""
    cpg = c // groups
    if positions_contiguous and length > 1:
        block_c = min(cpg & -cpg, MAX_BLOCK_C_CONTIGUOUS)  # the largest power of two dividing cpg
    else:
        block_c = triton.next_power_of_2(cpg)
    num_cb = triton.cdiv(cpg, block_c)
    tile = INTERPRET_TILE if interpret else GPU_TILE
    max_block_l = max(1, tile // block_c)
    min_block_l = min(max_block_l, 16 if interpret else 64)
    want = triton.cdiv(_programs_wanted(device), n * groups * num_cb)
    split = max(1, min(want, triton.cdiv(length, min_block_l), 1024))
    block_l = max(1, min(max_block_l, triton.next_power_of_2(triton.cdiv(length, split))))
    chunk = triton.cdiv(triton.cdiv(length, split), block_l) * block_l
    split = triton.cdiv(length, chunk)
    num_warps = 1 if interpret else (8 if block_c * block_l >= 4096 else 4)  # 8-16 elements per thread
    return dict(CPG=cpg, BLOCK_C=block_c, BLOCK_L=block_l, num_cb=num_cb, split=split, chunk=chunk,
                num_warps=num_warps)


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, add: torch.Tensor | None,
           y: torch.Tensor, groups: int, eps: float, silu: bool) -> None:
    """y = GroupNorm(x + add[:, :, None]) (then SiLU) for (N, C, L) views ``x`` / ``y`` with any strides; weight /
    bias (C,) or None, add (N, C) or None.

    Shapes are checked by :func:`fastdiff.ops.groupnorm.group_norm`; here only the launch."""
    n, c, length = x.shape
    interpret = interpreting()
    p = plan(n, c, length, groups, x.stride(2) == 1, x.device, interpret)
    num_cb, split, chunk, num_warps = p.pop("num_cb"), p.pop("split"), p.pop("chunk"), p.pop("num_warps")
    mean = torch.empty(n * groups * num_cb * split, dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    grid = (n * groups, split, num_cb)
    opts = dict(num_warps=num_warps, num_stages=1 if interpret else 2)
    # Absent inputs get a dummy pointer (x); their constexpr switch keeps the kernels from reading it.
    a, a_strides = (x, (0, 0)) if add is None else (add, add.stride())

    def run():
        _gn_stats_kernel[grid](x, a, mean, m2, *x.stride(), *a_strides, length, groups, split, chunk, **p,
                               HAS_ADD=add is not None, **opts)
        _gn_apply_kernel[grid](
            x, y, x if weight is None else weight, x if bias is None else bias, a, mean, m2, *x.stride(), *y.stride(),
            *a_strides, length, groups, split, chunk, float(length * p["CPG"]), float(eps), **p,
            BLOCK_S=max(2, triton.next_power_of_2(num_cb * split)), HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_ADD=add is not None, SILU=bool(silu), **opts,
        )

    if x.is_cuda and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # Triton launches on the current device
            run()
    else:
        run()
