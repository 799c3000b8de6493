// The fused GroupNorm (+ add, + SiLU) on CPU (OpenMP), over raw pointers: see csrc/groupnorm_params.h.
#pragma once

#include "../groupnorm_params.h"

namespace fastdiff {

// y = GroupNorm(x + add) (then SiLU). num_threads <= 0 means OpenMP's default. Throws std::invalid_argument for
// malformed parameters (nothing is written then).
void group_norm_cpu(const GroupNormParams& p, int num_threads);

}  // namespace fastdiff
