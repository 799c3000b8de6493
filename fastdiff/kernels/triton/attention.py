"""Flash-attention forward (non-causal, no mask, no dropout) for UNet self- and cross-attention, in Triton.

    out[b, h] = softmax(q[b, h] @ k[b, h]^T * scale) @ v[b, h]      q: (Lq, D), k / v: (Lk, D), out: (Lq, D)

One program computes BLOCK_M query rows of one (batch, head): it streams K / V in BLOCK_N-row tiles and keeps the
online-softmax state (running max m, running sum l, unnormalised accumulator) in registers, so the (Lq, Lk) score
matrix never reaches memory. Grid: (cdiv(Lq, BLOCK_M), B * H); programs of one (b, h) are adjacent in launch order,
so its K / V tiles are re-read from L2, not HBM. Scores and accumulators are fp32; ``p`` is rounded to the input
dtype for the second matmul (as FlashAttention-2 does); ``exp2`` with ``log2(e)`` folded into the scale.

Head dims that are not a power of two (SD1.5 uses 40, 80, 160) are split into two power-of-two parts, D = D1 + D2
(40 = 32 + 16 (8 masked), 80 = 64 + 16, 160 = 128 + 32), each with its own ``tl.dot`` and accumulator, instead of
padding to the next power of two (64 / 128 / 256): 25-60% fewer MMA FLOPs and registers for those dims.

Floor: 4·Lq·Lk·D FLOPs per (b, h) (two matmuls) at the tensor-core rate (~989 TFLOP/s dense fp16 on an H100
SXM with wgmma; FlashAttention-2's forward reaches about a third of it, benches/NOTES.md); cross-attention
(Lk = 77) is bound by reading q and writing out (2·Lq·D elements per head) rather than FLOPs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdiff.kernels.triton.twin import interpreting, twin

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
LOG2E = 1.4426950408889634


@twin()
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, STRIDES_X8: tl.constexpr,
):
    # No calls to jit functions in here (see twin.py): reductions go through tl.reduce with the standard combines.
    # The last dim of q / k / v / out has stride 1 (the launcher guarantees it).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + h * stride_kh
    v_off = b * stride_vb + h * stride_vh
    o_off = b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, D1)
    m_ok = offs_m < seq_q
    q_rows = offs_m * stride_qm
    k_rows = offs_n * stride_kn
    v_rows = offs_n * stride_vn
    o_rows = offs_m * stride_om
    if STRIDES_X8:
        # The launcher checked every base pointer (16 bytes) and stride (8 elements): every row starts 16-byte aligned
        # (fp16 / bf16). Triton's launch specialisation only records divisibility by 16: a head stride of 40
        # (diffusers' (B, L, H·D) layout at D = 40) leaves it assuming 2-byte alignment, i.e. scalar loads, no
        # cp.async and no K / V pipelining. The hints go on computed offsets: on a kernel argument they are ignored.
        q_off = tl.multiple_of(q_off, 8)
        k_off = tl.multiple_of(k_off, 8)
        v_off = tl.multiple_of(v_off, 8)
        o_off = tl.multiple_of(o_off, 8)
        q_rows = tl.multiple_of(q_rows, 8)
        k_rows = tl.multiple_of(k_rows, 8)
        v_rows = tl.multiple_of(v_rows, 8)
        o_rows = tl.multiple_of(o_rows, 8)
    q_base = q_ptr + q_off
    k_base = k_ptr + k_off
    v_base = v_ptr + v_off
    o_base = o_ptr + o_off

    # Q stays in registers for the whole loop. Rows past seq_q load as 0 (their output is never stored).
    if EVEN_M:
        q1 = tl.load(q_base + q_rows[:, None] + offs_d1[None, :])
    else:
        q1 = tl.load(q_base + q_rows[:, None] + offs_d1[None, :], mask=m_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's fp16 / bf16 arithmetic is unreliable: compute in fp32 there
        q1 = q1.to(tl.float32)
    acc1 = tl.full([BLOCK_M, D1], 0.0, tl.float32)
    if D2 > 0:  # the second head-dim part: columns D1 .. D1 + D2, those >= HEAD_DIM masked
        offs_d2 = D1 + tl.arange(0, D2)
        d2_ok = offs_d2 < HEAD_DIM
        kt2_ptrs = k_base + k_rows[None, :] + offs_d2[:, None]
        v2_ptrs = v_base + v_rows[:, None] + offs_d2[None, :]
        q2 = tl.load(q_base + q_rows[:, None] + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :],
                     other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        acc2 = tl.full([BLOCK_M, D2], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)

    # K is read transposed, (D, BLOCK_N), so q @ kT needs no in-register transpose.
    kt1_ptrs = k_base + k_rows[None, :] + offs_d1[:, None]
    v1_ptrs = v_base + v_rows[:, None] + offs_d1[None, :]
    for start_n in range(0, seq_k, BLOCK_N):
        n_ok = (start_n + offs_n) < seq_k
        koff = start_n * stride_kn
        voff = start_n * stride_vn
        if EVEN_N:
            kt1 = tl.load(kt1_ptrs + koff)
        else:
            kt1 = tl.load(kt1_ptrs + koff, mask=n_ok[None, :], other=0.0)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
        s = tl.dot(q1, kt1, input_precision=PRECISION)
        if D2 > 0:
            kt2 = tl.load(kt2_ptrs + koff, mask=d2_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                kt2 = kt2.to(tl.float32)
            s += tl.dot(q2, kt2, input_precision=PRECISION)
        s = s * qk_scale  # now in log2 units
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        # Online softmax: rescale what we have by exp2(m_old - m_new). m_new is finite from the first tile on (every
        # tile has at least one valid column), so alpha = exp2(-inf) = 0 on the first tile, never NaN.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        m_i = m_new
        if EVEN_N:
            v1 = tl.load(v1_ptrs + voff)
        else:
            v1 = tl.load(v1_ptrs + voff, mask=n_ok[:, None], other=0.0)
        if UPCAST:
            v1 = v1.to(tl.float32)
        p = p.to(v1.dtype)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
        if D2 > 0:
            v2 = tl.load(v2_ptrs + voff, mask=n_ok[:, None] & d2_ok[None, :], other=0.0)
            if UPCAST:
                v2 = v2.to(tl.float32)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=PRECISION)

    inv_l = 1.0 / l_i
    out_ty = o_ptr.dtype.element_ty
    o1_ptrs = o_base + o_rows[:, None] + offs_d1[None, :]
    if EVEN_M:
        tl.store(o1_ptrs, (acc1 * inv_l[:, None]).to(out_ty))
    else:
        tl.store(o1_ptrs, (acc1 * inv_l[:, None]).to(out_ty), mask=m_ok[:, None])
    if D2 > 0:
        o2_ptrs = o_base + o_rows[:, None] + offs_d2[None, :]
        tl.store(o2_ptrs, (acc2 * inv_l[:, None]).to(out_ty), mask=m_ok[:, None] & d2_ok[None, :])


def split_head_dim(d: int) -> tuple[int, int]:
    """(D1, D2): D1 the largest power of two <= d, D2 the power of two (>= 16, tl.dot's minimum) covering the rest,
    0 when d is a power of two. 40 -> (32, 16), 64 -> (64, 0), 80 -> (64, 16), 160 -> (128, 32)."""
    d1 = 1 << (d.bit_length() - 1)
    rest = d - d1
    return d1, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def config(head_dim: int, seq_q: int, seq_k: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes and launch options: a heuristic, not an autotune (no benchmarking inside a CUDA-graph capture,
    and no GPU time spent tuning at startup). Chosen from a sweep of 13 configs per shape on an H100 (kernel time
    replayed from a CUDA graph; ``FASTDIFF_BENCH_TUNE=1 benches/bench_model.py``, results in
    benches/results/NVIDIA_H100_80GB_HBM3-2026-11-26-session3-gpu.md); register and shared-memory use checked
    offline for sm80 / sm90 (tests/ops/test_attention.py)."""
    if interpret:
        # Small tiles: several query blocks and key tiles, so the online-softmax rescaling and tails are exercised.
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    d1, d2 = split_head_dim(head_dim)
    if dtype == torch.float32:
        # fp32 (tests, not a speed target; ``auto`` sends fp32 to SDPA): tl.dot in IEEE fp32 runs on FMA units with
        # big register tiles, so small tiles (no spills up to D = 128 on sm90).
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
    stages = 2 if d1 + d2 > 128 else 3  # K / V pipeline depth: 2 at D = 160 to stay within shared memory
    if seq_k <= 128:
        # Cross-attention over a text encoder's 77 tokens: 32-key tiles waste least on the masked tail (77 = 2 x 32
        # + 13 against 64 + 13), 4 warps. H100, us (the former 128 / 64 / 8 warps -> this): SD1.5 4096 x 77 d40
        # 12.6 -> 10.0 (128-row tiles keep the most work per program at 4,096 queries), SDXL 1024 x 77 d64
        # 9.0 -> 6.9, SD1.5 256 x 77 d160 7.0 -> 5.0; cuDNN's SDPA 13.8 / 10.7 / 8.8.
        if seq_q >= 4096 and d1 + d2 <= 128:  # a 128 x 160 fp32 accumulator on 4 warps spills (sm90, offline)
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if seq_q <= 256:
        # Short self-attention: 128-row tiles leave most SMs idle (SD1.5's 256 tokens x 16 (batch, head) pairs =
        # 32 programs on 132 SMs); 64-row tiles double that. H100, SD1.5 256 x 256 d160: 9.6 -> 7.4 us (cuDNN 10.7).
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=stages)
    # 8 warps (two warpgroups on sm90): half the registers per thread of 4 warps (no spills at any head dim with
    # 16-byte-aligned rows, which UNet projections have: token stride H·D = 320 / 640 / 1280, head stride D = 40 /
    # 80 / 160, the latter known to the compiler through the STRIDES_X8 hint), 3-stage K / V pipeline (2 at
    # D = 160 to stay within shared memory). Best of the sweep at 4,096 and 1,024 tokens (within 1 %), yet 0.83x /
    # 0.95x cuDNN's SDPA there (H100): long self-attention is where this kernel still loses.
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=stages)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
           cfg: dict | None = None) -> None:
    """out = softmax(q k^T * scale) v for (B, H, L, D) tensors whose last dim has stride 1 (any other strides).

    ``cfg`` overrides :func:`config` (BLOCK_M, BLOCK_N, num_warps, num_stages; the tuning sweep in
    benches/bench_model.py). Shapes and dtypes are checked by :func:`fastdiff.ops.attention.attention`; here only
    the launch."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    interpret = interpreting()
    cfg = dict(cfg) if cfg else config(head_dim, seq_q, seq_k, q.dtype, interpret)
    d1, d2 = split_head_dim(head_dim)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    grid = (triton.cdiv(seq_q, bm), batch * heads)
    meta = dict(
        HEAD_DIM=head_dim, D1=d1, D2=d2, BLOCK_M=bm, BLOCK_N=bn, EVEN_M=seq_q % bm == 0, EVEN_N=seq_k % bn == 0,
        UPCAST=interpret, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STRIDES_X8=strides_x8(q, k, v, out),
    )
    args = (q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], heads, seq_q, seq_k,
            float(scale) * LOG2E)
    kernel = _attn_fwd_kernel.kernel()
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device
            kernel[grid](*args, **meta, **cfg)
    else:
        kernel[grid](*args, **meta, **cfg)


def strides_x8(*tensors: torch.Tensor) -> bool:
    """Whether the kernel may assume 16-byte-aligned rows (its STRIDES_X8 hint): every base pointer 16-byte aligned
    and every batch, head and row stride a multiple of 8 elements. A batch or head dim of size 1 is exempt: its
    index is always 0, so its stride never reaches an address. False for views that break it (e.g. a slice offset
    by one element), which then run with the alignment Triton can prove by itself."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        (nb, nh, _), (sb, sh, sm) = t.shape[:3], t.stride()[:3]
        if (sb % 8 and nb > 1) or (sh % 8 and nh > 1) or sm % 8:
            return False
    return True


def flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> float:
    """FLOPs of one forward: two matmuls of 2·Lq·Lk·D each per (b, h)."""
    return 4.0 * batch * heads * seq_q * seq_k * head_dim


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
