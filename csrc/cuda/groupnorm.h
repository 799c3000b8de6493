// Host-side interface of the CUDA fused GroupNorm (+ add, + SiLU). Like step.h, no CUDA header: compiled by nvcc
// (groupnorm.cu) and by the plain C++ compiler (bindings_cuda.cpp).
#pragma once

#include <cstdint>

#include "../groupnorm_params.h"
#include "step.h"  // CudaError

namespace fastdiff {

// Statistics partials per (sample, group): (count, mean, M2) for each of at most kGroupNormMaxSplit pieces.
constexpr int kGroupNormMaxSplit = 64;
constexpr int kGroupNormWorkspacePerGroup = 3 * kGroupNormMaxSplit;  // floats
// Channels per group the kernels hold in shared memory (add, scale, shift).
constexpr int kGroupNormMaxChannelsPerGroup = 1024;

// Enqueues the two kernels (statistics, then normalise) on `stream` of `device`. `workspace` is device memory of
// at least N * groups * kGroupNormWorkspacePerGroup floats (workspace_len), scratch for this call only. No host
// sync, so the call can be captured in a CUDA graph. Throws std::invalid_argument for malformed parameters and
// CudaError for CUDA failures.
void group_norm_cuda(const GroupNormParams& p, float* workspace, std::int64_t workspace_len, std::uintptr_t stream,
                     int device);

}  // namespace fastdiff
