// The fused GroupNorm (+ add, + SiLU) on CUDA: the math of csrc/groupnorm_params.h in two launches over the same
// (N * G, split) grid. A group's elements are walked as rows x cols with the unit (or smaller) stride inside a row
// (NCHW: a row is one channel's positions; channels-last: the group's channels at one position), numbered
// row-major and cut into `split` contiguous pieces, one per block:
//
//   1. stats: each thread folds its elements into (count, mean, M2) -- two-pass over each 16-byte vector, merged
//      by Chan's formula, never a sum / sum-of-squares (that loses every digit in fp32 when |mean| >> std) -- then
//      warp shuffles and shared memory merge the block's, written to the workspace.
//   2. apply: each block merges its group's `split` partials (the same few hundred bytes for every block of the
//      group: an L2 hit), puts the group's per-channel add / scale / shift in shared memory and writes
//      y = (z - mean) * scale + shift, then SiLU, over its piece -- which the stats pass just read, so at UNet sizes
//      the second read mostly comes from L2.
//
// The vector path moves 16-byte packs (float4, 8 halves / bfloat16s) when the walk's inner stride is 1, the row
// length and strides are multiples of the pack and the buffers are 16-byte aligned; otherwise one element per
// access. fp32 arithmetic for every storage dtype.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "groupnorm.h"

namespace fastdiff {
namespace {

using namespace gpu;  // NOLINT: storage packs and runtime helpers of common.cuh

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 8;  // what one launch aims for: 2048 resident threads per SM on sm_80 / sm_90
constexpr int kMaxCpg = kGroupNormMaxChannelsPerGroup;

struct Stats {
  float n, mean, m2;  // count, mean, sum of squared deviations
};

// Chan et al.'s merge of two partial statistics; an empty side leaves the other unchanged.
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// The block's merged statistics, returned to every thread.
__device__ Stats block_merge(Stats s) {
  __shared__ Stats warp_stats[kWarps];
  __shared__ Stats total;
  for (int off = 16; off > 0; off >>= 1) {
    const Stats o{__shfl_down_sync(0xffffffffu, s.n, off), __shfl_down_sync(0xffffffffu, s.mean, off),
                  __shfl_down_sync(0xffffffffu, s.m2, off)};
    s = merge(s, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stats t = warp_stats[0];
    for (int w = 1; w < kWarps; ++w) t = merge(t, warp_stats[w]);
    total = t;
  }
  __syncthreads();
  return total;
}

// Where one (sample, group) lives and how its rows x cols walk is cut into pieces of `chunk` units (a unit is V
// elements, V dividing cols).
struct Walk {
  long long xr, xc, yr, yc;  // row / column strides of x and y (elements)
  unsigned rows, cols, units, chunk;
  int split;
  bool channels_inner;  // columns are channels (channels-last) rather than positions
  float count;          // elements per group
};

__device__ __forceinline__ float load_param(const void* p, long long i, int code) {
  switch (code) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// The group's per-channel add into shared memory (0 without one).
__device__ __forceinline__ void load_add(const GroupNormParams& p, long long n, long long c0, int cpg, float* add_s) {
  for (int c = threadIdx.x; c < cpg; c += kThreads)
    add_s[c] = p.add != nullptr ? load_param(p.add, n * p.san + (c0 + c) * p.sac, p.add_dtype) : 0.f;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(const GroupNormParams p, const Walk w, float* ws) {
  __shared__ float add_s[kMaxCpg];
  const long long ng = blockIdx.x, n = ng / p.groups;
  const int cpg = int(p.c / p.groups);
  const long long c0 = (ng % p.groups) * cpg;
  load_add(p, n, c0, cpg, add_s);
  __syncthreads();
  const T* x = static_cast<const T*>(p.x) + n * p.sxn + c0 * p.sxc;
  const unsigned u0 = blockIdx.y * w.chunk, u1 = min(w.units, u0 + w.chunk);
  Stats s{0.f, 0.f, 0.f};
  for (unsigned u = u0 + threadIdx.x; u < u1; u += kThreads) {
    const unsigned e = u * V, r = e / w.cols, k = e - r * w.cols;
    float v[V];
    Pack<T, V>::load(x + r * w.xr + k * w.xc, v);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] += add_s[w.channels_inner ? k + j : r];
      sum += v[j];
    }
    const float mean = sum / V;
    float m2 = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) m2 += (v[j] - mean) * (v[j] - mean);
    s = merge(s, Stats{float(V), mean, m2});
  }
  s = block_merge(s);
  if (threadIdx.x == 0) {
    float* out = ws + (ng * kGroupNormMaxSplit + blockIdx.y) * 3;
    out[0] = s.n, out[1] = s.mean, out[2] = s.m2;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) gn_apply_kernel(const GroupNormParams p, const Walk w, const float* ws) {
  __shared__ float add_s[kMaxCpg], scale_s[kMaxCpg], shift_s[kMaxCpg];
  const long long ng = blockIdx.x, n = ng / p.groups;
  const int cpg = int(p.c / p.groups);
  const long long c0 = (ng % p.groups) * cpg;

  Stats s{0.f, 0.f, 0.f};
  if (threadIdx.x < w.split) {
    const float* in = ws + (ng * kGroupNormMaxSplit + threadIdx.x) * 3;
    s = Stats{in[0], in[1], in[2]};
  }
  s = block_merge(s);
  const float mean = s.mean, rstd = 1.f / sqrtf(s.m2 / w.count + p.eps);
  load_add(p, n, c0, cpg, add_s);
  for (int c = threadIdx.x; c < cpg; c += kThreads) {
    scale_s[c] = p.weight != nullptr ? rstd * load_param(p.weight, c0 + c, p.weight_dtype) : rstd;
    shift_s[c] = p.bias != nullptr ? load_param(p.bias, c0 + c, p.weight_dtype) : 0.f;
  }
  __syncthreads();

  const T* x = static_cast<const T*>(p.x) + n * p.sxn + c0 * p.sxc;
  T* y = static_cast<T*>(p.y) + n * p.syn + c0 * p.syc;
  const unsigned u0 = blockIdx.y * w.chunk, u1 = min(w.units, u0 + w.chunk);
  for (unsigned u = u0 + threadIdx.x; u < u1; u += kThreads) {
    const unsigned e = u * V, r = e / w.cols, k = e - r * w.cols;
    float v[V];
    Pack<T, V>::load(x + r * w.xr + k * w.xc, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const unsigned c = w.channels_inner ? k + j : r;
      float t = (v[j] + add_s[c] - mean) * scale_s[c] + shift_s[c];
      if (p.silu) t = t / (1.f + expf(-t));  // y * sigmoid(y); expf overflow to inf gives -0, the right limit
      v[j] = t;
    }
    Pack<T, V>::store(y + r * w.yr + k * w.yc, v);
  }
}

bool aligned16(const void* q) { return (reinterpret_cast<std::uintptr_t>(q) & 15u) == 0; }

template <typename T, int V>
bool can_vectorize(const GroupNormParams& p, const Walk& w) {
  const long long cpg = p.c / p.groups;
  return w.xc == 1 && w.yc == 1 && w.cols % V == 0 && w.xr % V == 0 && w.yr % V == 0 && p.sxn % V == 0 &&
         p.syn % V == 0 && (cpg * p.sxc) % V == 0 && (cpg * p.syc) % V == 0 && aligned16(p.x) && aligned16(p.y);
}

template <typename T, int V>
void launch_width(const GroupNormParams& p, Walk w, float* ws, cudaStream_t stream, int sms) {
  const long long groups = p.n * p.groups;
  w.units = w.rows * w.cols / V;
  // Enough blocks to fill the GPU, but at least a block's worth of units each and at most kGroupNormMaxSplit.
  const long long want = (long long)kBlocksPerSm * sms;
  long long split = std::min<long long>((want + groups - 1) / groups, kGroupNormMaxSplit);
  split = std::max(1LL, std::min<long long>(split, (w.units + kThreads - 1) / kThreads));
  w.chunk = unsigned((w.units + split - 1) / split);
  w.split = int((w.units + w.chunk - 1) / w.chunk);
  const dim3 grid(unsigned(groups), unsigned(w.split));
  gn_stats_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, w, ws);
  gn_apply_kernel<T, V><<<grid, kThreads, 0, stream>>>(p, w, ws);
}

template <typename T>
void launch_typed(const GroupNormParams& p, const Walk& w, float* ws, cudaStream_t stream, int sms) {
  constexpr int kVec = 16 / sizeof(T);
  if (can_vectorize<T, kVec>(p, w))
    launch_width<T, kVec>(p, w, ws, stream, sms);
  else
    launch_width<T, 1>(p, w, ws, stream, sms);
}

void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("fastdiff._C_cuda.group_norm: " + msg);
}

bool known_dtype(int code) { return code == kF32 || code == kF16 || code == kBF16; }

}  // namespace

void group_norm_cuda(const GroupNormParams& p, float* workspace, std::int64_t workspace_len, std::uintptr_t stream,
                     int device) {
  check(p.x != nullptr && p.y != nullptr && workspace != nullptr, "x, y and the workspace are required");
  check(p.n > 0 && p.c > 0 && p.l > 0, "N, C and L must be positive");
  check(p.groups > 0 && p.c % p.groups == 0, "groups must be a positive divisor of C");
  const long long cpg = p.c / p.groups;
  check(cpg <= kMaxCpg, std::to_string(cpg) + " channels per group exceed " + std::to_string(kMaxCpg));
  check(cpg * p.l < (1LL << 31), "a group of 2^31 or more elements");
  check(known_dtype(p.dtype) && known_dtype(p.weight_dtype) && known_dtype(p.add_dtype), "unknown dtype code");
  check(std::isfinite(p.eps) && p.eps >= 0.f, "eps must be finite and >= 0");
  check(workspace_len >= p.n * p.groups * kGroupNormWorkspacePerGroup, "workspace too small");

  Walk w{};
  // Walk along the unit (or smaller) stride: positions when they are contiguous, else channels (channels-last).
  w.channels_inner = p.sxl != 1 && std::llabs(p.sxc) < std::llabs(p.sxl);
  w.rows = unsigned(w.channels_inner ? p.l : cpg);
  w.cols = unsigned(w.channels_inner ? cpg : p.l);
  w.xr = w.channels_inner ? p.sxl : p.sxc;
  w.xc = w.channels_inner ? p.sxc : p.sxl;
  w.yr = w.channels_inner ? p.syl : p.syc;
  w.yc = w.channels_inner ? p.syc : p.syl;
  w.count = float(cpg * p.l);

  DeviceGuard guard(device);
  const int sms = sm_count(device);
  raise_pending("the GroupNorm");
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kF16: launch_typed<__half>(p, w, workspace, s, sms); break;
    case kBF16: launch_typed<__nv_bfloat16>(p, w, workspace, s, sms); break;
    default: launch_typed<float>(p, w, workspace, s, sms); break;
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail("GroupNorm kernel launch failed", e);
}

}  // namespace fastdiff
