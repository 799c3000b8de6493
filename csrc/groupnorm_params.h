// The argument block of the fused GroupNorm (+ add, + SiLU), shared by the C++ (CPU) and CUDA implementations.
//
//   z = x + add[n, c]                                         (when add is given: a ResnetBlock's time embedding)
//   mean, var = mean / biased variance of z over group g's C/G channels and all L positions of sample n
//   y = (z - mean) / sqrt(var + eps) * weight[c] + bias[c];   y = y * sigmoid(y) when silu
//
// Plain C++ only, like step_params.h: tensors arrive as raw addresses plus element strides, so x and y may be NCHW,
// channels-last or any (N, C, L) view. The Python side is fastdiff/kernels/{cpu,cuda}_groupnorm.py; the oracle is
// fastdiff/ops/groupnorm.py:group_norm_reference.
#pragma once

#include <cstdint>

#include "step_params.h"  // DType codes

namespace fastdiff {

struct GroupNormParams {
  const void* x = nullptr;       // (N, C, L), strides sxn / sxc / sxl (elements)
  void* y = nullptr;             // (N, C, L), strides syn / syc / syl; must not overlap x unless y == x exactly
  const void* weight = nullptr;  // optional (C,), contiguous
  const void* bias = nullptr;    // optional (C,), contiguous
  const void* add = nullptr;     // optional (N, C), strides san / sac
  int64_t n = 0, c = 0, l = 0, groups = 0;
  int64_t sxn = 0, sxc = 0, sxl = 0, syn = 0, syc = 0, syl = 0, san = 0, sac = 0;
  int dtype = kF32;         // x and y
  int weight_dtype = kF32;  // weight and bias: x's dtype or float32 (mixed precision keeps norms in fp32)
  int add_dtype = kF32;
  float eps = 1e-5f;
  bool silu = false;
};

}  // namespace fastdiff
