// The fused sampler step on CUDA: CFG + x0 prediction + clamp + linear update + hist / saved / next_in writes +
// non-finite flag, in one pass over memory. The math is fastdiff/schedulers/plan.py; the oracle is
// step_reference in fastdiff/ops/step.py: same operation order and, built with --fmad=false (setup.py), the same
// roundings, so results match the reference bit for bit.
//
// Memory-bound by design: each thread moves 16-byte vectors (float4, or 8 halves / bfloat16s in a uint4) over a
// grid-stride loop and computes in fp32. The vector path needs every buffer (and the B*N offset between CFG halves,
// hist slots and next_in halves) 16-byte aligned; the last (B*N mod V) elements are done by a scalar tail, and
// misaligned inputs fall back to a scalar kernel. The sample index (for m_scale / x0_limit) is computed per
// element, so N need not be a multiple of the vector width; it is a multiply and shift (fast_div.h) rather than a
// 64-bit division whenever B*N < 2^31.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "fast_div.h"
#include "step.h"

namespace fastdiff {
namespace {

using namespace gpu;  // NOLINT: storage packs and runtime helpers of common.cuh

constexpr int kThreads = 256;
// Caps registers at 80 for the 8-wide kernels (no spills on sm_80 / sm_90; 4 would spill): 3+ resident blocks of
// 8 warps per SM, each thread with several independent 16-byte loads in flight, is enough to cover DRAM latency.
constexpr int kMinBlocksPerSm = 3;

// ---- the step ---------------------------------------------------------------------------------------------

// The coefficient row, read by every thread from device memory (same addresses grid-wide: one cached broadcast).
struct Row {
  float px, pm, ox, om, o0, os, on, oh[kHistSlots], sx, sm, s0, ss, sh[kHistSlots], in_next;
  int wslot;          // -1: no history write (also when WSLOT does not index hist)
  long long step;     // -1: no flag write (also when STEP does not index flag)
};

__device__ __forceinline__ Row read_row(const StepParams& p) {
  const float* c = p.coef;
  Row k;
  k.px = __ldg(c + col::PX);
  k.pm = __ldg(c + col::PM);
  k.ox = __ldg(c + col::OX);
  k.om = __ldg(c + col::OM);
  k.o0 = __ldg(c + col::O0);
  k.os = __ldg(c + col::OS);
  k.on = __ldg(c + col::ON);
  k.sx = __ldg(c + col::SX);
  k.sm = __ldg(c + col::SM);
  k.s0 = __ldg(c + col::S0);
  k.ss = __ldg(c + col::SS);
#pragma unroll
  for (int h = 0; h < kHistSlots; ++h) {
    k.oh[h] = __ldg(c + col::OH0 + h);
    k.sh[h] = __ldg(c + col::SH0 + h);
  }
  k.in_next = __ldg(c + col::IN_NEXT);
  // Truncation toward zero, like tensor.long() in the reference.
  const float w = __ldg(c + col::WSLOT);
  k.wslot = (p.hist != nullptr && w >= 0.f && w < float(kHistSlots)) ? int(w) : -1;
  const float s = __ldg(c + col::STEP);
  k.step = (p.flag != nullptr && s > -1.f && s < float(p.flag_len)) ? (long long)s : -1;
  return k;
}

// Sample index e / N of flat element e. `nd` is N's multiply-and-shift divisor, or mul == 0 when B*N or N is too
// large for it (2^31 elements or more): then the (slow, emulated) 64-bit division. The branch is uniform.
__device__ __forceinline__ long long sample_of(const StepParams& p, const FastDiv32& nd, long long e) {
  return nd.mul != 0 ? (long long)nd.div(uint32_t(e)) : e / p.per_sample;
}

// Elements [i, i + V) of the flat (B * N) array; returns whether a result is non-finite. All reads come before
// the first write, so out may alias x and saved is updated in place.
template <typename T, int V>
__device__ __forceinline__ bool step_elems(const StepParams& p, const FastDiv32& nd, const Row& k, long long i) {
  const long long bn = p.batch * p.per_sample;
  const T* mo = static_cast<const T*>(p.model_out);
  float x[V], m[V], t[V], x0[V], prev[V], ns[V], sv[V];

  Pack<T, V>::load(static_cast<const T*>(p.x) + i, x);
  Pack<T, V>::load(mo + i, m);
  if (p.cfg) {
    Pack<T, V>::load(mo + bn + i, t);
#pragma unroll
    for (int j = 0; j < V; ++j) m[j] = m[j] + p.guidance_scale * (t[j] - m[j]);
  }

  long long b[V];  // sample of each element: a vector may straddle samples when N % V != 0
  if (p.m_scale != nullptr || p.x0_limit != nullptr) {
    long long s = sample_of(p, nd, i), end = (s + 1) * p.per_sample;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (i + j >= end) {
        s = sample_of(p, nd, i + j);
        end = (s + 1) * p.per_sample;
      }
      b[j] = s;
    }
  }
  if (p.m_scale != nullptr) {
#pragma unroll
    for (int j = 0; j < V; ++j) m[j] *= __ldg(p.m_scale + b[j]);
  }

#pragma unroll
  for (int j = 0; j < V; ++j) x0[j] = k.px * x[j] + k.pm * m[j];
  if (p.has_clip) {
    // clamp(x0, -r, r) as torch does it: max then min, NaN passes through
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float v = x0[j] < -p.clip_range ? -p.clip_range : x0[j];
      x0[j] = v > p.clip_range ? p.clip_range : v;
    }
  } else if (p.x0_limit != nullptr) {
    // maximum(minimum(x0, s), -s) / s (dynamic thresholding), NaN passes through
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float s = __ldg(p.x0_limit + b[j]);
      float v = x0[j] > s ? s : x0[j];
      v = v < -s ? -s : v;
      x0[j] = v / s;
    }
  }

#pragma unroll
  for (int j = 0; j < V; ++j) prev[j] = k.ox * x[j] + k.om * m[j] + k.o0 * x0[j];
  // A zero coefficient means the term is not read (uniform branch: the row is the same for the whole grid).
  if (p.noise != nullptr && k.on != 0.f) {
    Pack<T, V>::load(static_cast<const T*>(p.noise) + i, t);
#pragma unroll
    for (int j = 0; j < V; ++j) prev[j] += k.on * t[j];
  }
  const bool has_saved = p.saved != nullptr;
  if (has_saved) {
#pragma unroll
    for (int j = 0; j < V; ++j) ns[j] = k.sx * x[j] + k.sm * m[j] + k.s0 * x0[j];
    if (k.os != 0.f || k.ss != 0.f) Pack<T, V>::load(static_cast<const T*>(p.saved) + i, sv);
    if (k.ss != 0.f) {
#pragma unroll
      for (int j = 0; j < V; ++j) ns[j] += k.ss * sv[j];
    }
  }
  if (p.hist != nullptr) {
#pragma unroll
    for (int h = 0; h < kHistSlots; ++h) {
      const float oh = k.oh[h], sh = has_saved ? k.sh[h] : 0.f;
      if (oh == 0.f && sh == 0.f) continue;
      Pack<T, V>::load(static_cast<const T*>(p.hist) + h * bn + i, t);
      // Each side stays a separate (uniform) branch: 0 * Inf would be NaN, and a zero term must not be read.
      if (oh != 0.f) {
#pragma unroll
        for (int j = 0; j < V; ++j) prev[j] += oh * t[j];
      }
      if (sh != 0.f) {
#pragma unroll
        for (int j = 0; j < V; ++j) ns[j] += sh * t[j];
      }
    }
  }
  if (has_saved && k.os != 0.f) {
#pragma unroll
    for (int j = 0; j < V; ++j) prev[j] += k.os * sv[j];
  }

  // Writes, in the reference's order.
  if (k.wslot >= 0) Pack<T, V>::store(static_cast<T*>(p.hist) + k.wslot * bn + i, x0);
  if (has_saved) Pack<T, V>::store(static_cast<T*>(p.saved) + i, ns);
  Pack<T, V>::store(static_cast<T*>(p.out) + i, prev);
  if (p.next_in != nullptr) {
    // next_in = out as stored (rounded to the storage dtype) * IN_NEXT, into every CFG half
#pragma unroll
    for (int j = 0; j < V; ++j) t[j] = Elem<T>::round(prev[j]) * k.in_next;
    for (int h = 0; h < p.next_halves; ++h) Pack<T, V>::store(static_cast<T*>(p.next_in) + h * bn + i, t);
  }
  bool bad = false;
#pragma unroll
  for (int j = 0; j < V; ++j) bad |= !isfinite(prev[j]);
  return bad;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) step_kernel(const StepParams p, const FastDiv32 nd) {
  const Row k = read_row(p);
  const long long total = p.batch * p.per_sample;
  const long long nvec = total / V;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  bool bad = false;
  for (long long v = tid; v < nvec; v += stride) bad |= step_elems<T, V>(p, nd, k, v * V);
  if (V > 1) {
    const long long t = nvec * V + tid;  // scalar tail, fewer than V elements
    if (t < total) bad |= step_elems<T, 1>(p, nd, k, t);
  }
  // Plain store: every writer stores the same 1, so no atomic is needed; the host reads the flag after the loop.
  if (bad && k.step >= 0) p.flag[k.step] = 1;
}

// ---- host side --------------------------------------------------------------------------------------------

bool aligned16(const void* q) { return (reinterpret_cast<std::uintptr_t>(q) & 15u) == 0; }

template <typename T>
bool can_vectorize(const StepParams& p) {
  const long long bn = p.batch * p.per_sample;
  const bool offsets = p.cfg || p.hist != nullptr || (p.next_in != nullptr && p.next_halves > 1);
  if (offsets && (bn * (long long)sizeof(T)) % 16 != 0) return false;
  const void* bufs[] = {p.model_out, p.x, p.out, p.noise, p.saved, p.hist, p.next_in};
  for (const void* q : bufs)
    if (q != nullptr && !aligned16(q)) return false;
  return true;
}

// Blocks of one full wave for this kernel on `device` (queried once per device): a grid-stride grid larger than
// one wave would leave its last blocks starting late, a smaller one idles SMs.
template <typename T, int V>
long long wave_blocks(int device, int sm_count) {
  static std::atomic<int> cache[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  int per_sm = cacheable ? cache[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel<T, V>, kThreads, 0);
    if (e != cudaSuccess) fail("cannot query the occupancy of the fused step kernel", e);
    per_sm = std::max(per_sm, 1);
    if (cacheable) cache[device].store(per_sm, std::memory_order_relaxed);
  }
  return (long long)per_sm * sm_count;
}

template <typename T, int V>
void launch_width(const StepParams& p, cudaStream_t stream, int device, int sm_count) {
  const long long total = p.batch * p.per_sample;
  const long long work = std::max(1LL, total / V);
  const long long blocks = std::min((work + kThreads - 1) / kThreads, wave_blocks<T, V>(device, sm_count));
  // Only the m_scale / x0_limit paths divide; mul == 0 keeps the 64-bit division (see sample_of).
  const FastDiv32 nd = FastDiv32::fits(p.per_sample, total) ? FastDiv32::make(p.per_sample) : FastDiv32{};
  step_kernel<T, V><<<(unsigned)blocks, kThreads, 0, stream>>>(p, nd);
}

template <typename T>
void launch_typed(const StepParams& p, cudaStream_t stream, int device, int sm_count) {
  if (can_vectorize<T>(p))
    launch_width<T, 16 / sizeof(T)>(p, stream, device, sm_count);
  else
    launch_width<T, 1>(p, stream, device, sm_count);
}

// Explicit kernel instantiations and the dtype-code -> launch_typed<T> switch (generated; see
// gen_instantiations.py): `void dispatch_dtype(const StepParams&, cudaStream_t, int device, int sm_count)`.
#include "step_instantiations.inc"

void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("fastdiff._C_cuda.step: " + msg);
}

}  // namespace

void step_cuda(const StepParams& p, std::uintptr_t stream, int device) {
  check(p.model_out && p.x && p.coef && p.out, "model_out, x, coef and out are required");
  check(p.batch > 0 && p.per_sample > 0, "batch and per-sample size must be positive");
  check(p.next_in == nullptr || p.next_halves == 1 || p.next_halves == 2, "next_in must have 1 or 2 halves");
  check(p.flag == nullptr || p.flag_len > 0, "flag must not be empty");
  check(p.dtype == kF32 || p.dtype == kF16 || p.dtype == kBF16, "unknown dtype code " + std::to_string(p.dtype));

  DeviceGuard guard(device);
  const int sms = sm_count(device);
  // An error left pending by earlier work would otherwise be reported as ours.
  raise_pending("the fused step");
  dispatch_dtype(p, reinterpret_cast<cudaStream_t>(stream), device, sms);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail("fused step kernel launch failed", e);
}

int cuda_runtime_version_built() { return CUDART_VERSION; }

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // do not leave the "no device" error pending for the next caller
    return 0;
  }
  return n;
}

}  // namespace fastdiff
