// Exact unsigned division by a divisor fixed for a whole launch, as a multiply and a shift.
//
// The fused step needs the sample index i / N of an element when guidance rescale or dynamic thresholding is on.
// On the GPU a 64-bit integer division is a long emulated subroutine (and a 32-bit one still ~20 instructions);
// with the divisor known on the host, floor(i / d) is one 32x32->64 multiply and a shift (Granlund & Montgomery,
// "Division by invariant integers using multiplication", 1994, round-up variant):
//
//   c = ceil(log2 d), p = 31 + c, m = ceil(2^p / d)   =>   floor(i * m / 2^p) == floor(i / d)
//   for 0 <= i < 2^31 and 1 <= d < 2^31.
//
// Why exact: m * d = 2^p + e with 0 <= e < d, so i * m / 2^p = i / d + i * e / (d * 2^p), and i * e < 2^31 * 2^c
// = 2^p keeps the extra term below 1 / d, too small to reach the next integer. m < 2^32 because d > 2^(c-1).
//
// Plain C++ (host and device): the launch wrapper builds it, the kernel applies it, and a host-only test
// (tests/kernels/test_step_cuda.py) checks it against '/' without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__ __forceinline__
#else
#define FASTDIFF_HD inline
#endif

namespace fastdiff {

struct FastDiv32 {
  uint32_t mul = 0;
  uint32_t shift = 0;

  // The largest dividend and divisor it is exact for.
  static constexpr int64_t kMax = (int64_t(1) << 31) - 1;

  // d in [1, kMax]; the caller checks (fits()).
  static FastDiv32 make(int64_t d) {
    uint32_t c = 0;
    while ((int64_t(1) << c) < d) ++c;
    FastDiv32 f;
    f.shift = 31 + c;
    f.mul = uint32_t(((uint64_t(1) << f.shift) + uint64_t(d) - 1) / uint64_t(d));
    return f;
  }

  // Whether every dividend below `count` and the divisor d are in range.
  static bool fits(int64_t d, int64_t count) { return d >= 1 && d <= kMax && count >= 0 && count <= kMax + 1; }

  FASTDIFF_HD uint32_t div(uint32_t i) const { return uint32_t((uint64_t(i) * mul) >> shift); }
};

}  // namespace fastdiff
