// What the CUDA kernels share (step.cu, groupnorm.cu): fp32 <-> storage loads and 16-byte packs, the CudaError
// raiser, a device guard and the cached SM count. nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "step.h"  // CudaError

namespace fastdiff {
namespace gpu {

constexpr int kMaxDevices = 64;

// ---- storage <-> fp32 -------------------------------------------------------------------------------------

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

// V consecutive elements at p <-> V floats. V == 1 is the scalar path; the wider ones are one 16-byte access.
template <typename T, int V>
struct Pack {
  static_assert(V == 1, "only the scalar pack is generic");
  static __device__ __forceinline__ void load(const T* p, float* f) { f[0] = Elem<T>::load(p); }
  static __device__ __forceinline__ void store(T* p, const float* f) { Elem<T>::store(p, f[0]); }
};
template <>
struct Pack<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float* f) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* f) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  }
};
// The 2-wide type of a 16-bit storage type and its conversions (for the 8-element packs below).
template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
// 8 halves / bfloat16s in one 16-byte access.
template <typename T>
struct Pack<T, 8> {
  using T2 = typename Pair<T>::T2;
  static __device__ __forceinline__ void load(const T* p, float* f) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T2* h = reinterpret_cast<const T2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 v = Pair<T>::to_float2(h[k]);
      f[2 * k] = v.x, f[2 * k + 1] = v.y;
    }
  }
  static __device__ __forceinline__ void store(T* p, const float* f) {
    uint4 raw;
    T2* h = reinterpret_cast<T2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = Pair<T>::from_floats(f[2 * k], f[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

// ---- runtime -----------------------------------------------------------------------------------------------

[[noreturn]] inline void fail(const std::string& what, cudaError_t e) {
  throw CudaError("fastdiff._C_cuda: " + what + ": " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) +
                  "). The CUDA module imports without a GPU but needs an NVIDIA GPU and driver to run.");
}

// Restores the caller's current device (torch's tensors may live on another device than the current one).
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    cudaError_t e = cudaGetDevice(&prev);
    if (e != cudaSuccess) fail("cannot query the current CUDA device", e);
    if (prev != device) {
      e = cudaSetDevice(device);
      if (e != cudaSuccess) fail("cannot select CUDA device " + std::to_string(device), e);
    } else {
      prev = -1;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

inline std::atomic<int> g_sm_count[kMaxDevices];  // 0 = not queried yet

inline int sm_count(int device) {
  if (device >= 0 && device < kMaxDevices) {
    const int cached = g_sm_count[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) fail("cannot query CUDA device " + std::to_string(device), e);
  if (device >= 0 && device < kMaxDevices) g_sm_count[device].store(n, std::memory_order_relaxed);
  return n;
}

// Raises for an error left pending by earlier work, which would otherwise be reported as the next launch's.
inline void raise_pending(const std::string& before) {
  const cudaError_t e = cudaPeekAtLastError();
  if (e != cudaSuccess) {
    cudaGetLastError();
    fail("a CUDA error was pending before " + before + " (raised by earlier work)", e);
  }
}

}  // namespace gpu
}  // namespace fastdiff
