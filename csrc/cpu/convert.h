// Storage <-> fp32 conversions and build macros shared by the CPU kernels (step.cpp, groupnorm.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "../step_params.h"

#if defined(__GNUC__)
#define FD_INLINE inline __attribute__((always_inline))
#else
#define FD_INLINE inline
#endif

// Wheels are built for the baseline x86-64 ISA (portable); the hot loop is compiled a second time for AVX2 and
// the loader picks the clone at load time (ifunc). FMA is deliberately not enabled, so results round like the
// separate multiplies and adds of the torch reference.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(FASTDIFF_NO_CLONES)
#define FD_CLONES __attribute__((target_clones("avx2", "default")))
#define FD_HAS_CLONES 1
#else
#define FD_CLONES
#define FD_HAS_CLONES 0
#endif

namespace fastdiff {
namespace cpu {

FD_INLINE uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FD_INLINE float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE binary16 <-> fp32 by bit manipulation, written as selects (no branches) so the loops vectorize without F16C.
FD_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const int32_t mag = h & 0x7fff;
  const uint32_t normal = (uint32_t(mag) << 13) + (112u << 23);      // rebias the exponent from 15 to 127
  const uint32_t special = (uint32_t(mag) << 13) | 0x7f800000u;      // Inf / NaN keep their payload
  const uint32_t sub = f2u(float(mag) * 5.9604644775390625e-08f);    // subnormal or zero: mag * 2^-24, exact
  uint32_t bits = mag >= 0x7c00 ? special : normal;
  bits = mag < 0x0400 ? sub : bits;
  return u2f(bits | sign);
}

FD_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t a = int32_t(u & 0x7fffffffu);
  // Normal results: rebias, then round to nearest even on the 13 dropped bits. A rounding carry into the exponent
  // is correct, and anything at or above the Inf encoding (incl. fp32 Inf) saturates to Inf.
  uint32_t normal = (uint32_t(a) - (112u << 23) + 0x0fffu + ((uint32_t(a) >> 13) & 1u)) >> 13;
  normal = normal > 0x7c00u ? 0x7c00u : normal;
  // |f| < 2^-14 (half subnormal): adding 0.5 puts the 2^-24 half ulp at fp32's last bit, so the FPU does the
  // round-to-nearest-even; the mantissa of the sum is the half encoding (0x400 when it rounds up to 2^-14).
  const uint32_t sub = f2u(u2f(uint32_t(a)) + 0.5f) - 0x3f000000u;
  uint32_t h = a < 0x38800000 ? sub : normal;
  h = a > 0x7f800000 ? 0x7e00u : h;  // NaN stays a (quiet) NaN
  return uint16_t(h | sign);
}

FD_INLINE float bf16_to_float(uint16_t b) { return u2f(uint32_t(b) << 16); }

FD_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even; overflow carries to Inf
  const uint32_t nan = (u >> 16) | 0x0040u;                        // keep NaN quiet: rounding could make it Inf
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

struct F32 {
  using Raw = float;
  static FD_INLINE float load(float v) { return v; }
  static FD_INLINE float store(float v) { return v; }
};
struct F16 {
  using Raw = uint16_t;
  static FD_INLINE float load(uint16_t v) { return half_to_float(v); }
  static FD_INLINE uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using Raw = uint16_t;
  static FD_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static FD_INLINE uint16_t store(float v) { return float_to_bf16(v); }
};

// Element i of a buffer whose dtype code (step_params.h) is only known at run time: for small per-channel
// parameters, read once per channel, where a switch costs nothing.
FD_INLINE float load_code(const void* p, int64_t i, int code) {
  switch (code) {
    case kF16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

}  // namespace cpu
}  // namespace fastdiff
