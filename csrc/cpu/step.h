// The fused sampler step on CPU (OpenMP), over raw pointers: see csrc/step_params.h.
#pragma once

#include "../step_params.h"

namespace fastdiff {

// Runs one step. Reads the coefficient row from host memory. num_threads <= 0 means OpenMP's default.
// Throws std::invalid_argument for a malformed StepParams and std::out_of_range for a coefficient row whose
// WSLOT / STEP column does not index hist / flag; nothing is written when it throws.
void step_cpu(const StepParams& p, int num_threads);

// Whether the hot loop has an AVX2 clone selected at load time (x86-64 GCC / clang builds).
bool cpu_has_isa_clones();

}  // namespace fastdiff
