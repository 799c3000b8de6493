// The argument block of the fused sampler step, shared by the C++ (CPU) and CUDA implementations.
//
// Plain C++ only: no torch, no CUDA headers. Tensors arrive as raw addresses of contiguous buffers (the Python
// launchers pass tensor.data_ptr()), so one compiled module works with any torch version. The math is the one in
// fastdiff/schedulers/plan.py; step_reference in fastdiff/ops/step.py is the oracle the kernels are tested against.
#pragma once

#include <cstdint>

namespace fastdiff {

// Bumped whenever the Python <-> C++ calling convention changes; fastdiff/_ext.py refuses a stale build.
constexpr int kAbiVersion = 2;  // 2: group_norm added

// Column indices of a coefficient row: must match fastdiff.schedulers.plan.Col (a test compares them).
namespace col {
constexpr int PX = 0, PM = 1, OX = 2, OM = 3, O0 = 4, OS = 5, ON = 6, OH0 = 7;
constexpr int SX = 10, SM = 11, S0 = 12, SS = 13, SH0 = 14;
constexpr int WSLOT = 17, IN_NEXT = 18, NOISE = 19, STEP = 20;
}  // namespace col
constexpr int kNcoef = 24;
constexpr int kHistSlots = 3;

// Storage dtype codes (fastdiff/kernels/compiled_args.py holds the Python side of this table).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct StepParams {
  // Inputs. model_out is (2B, N) with CFG (unconditional half first), else (B, N); the others are (B, N).
  const void* model_out = nullptr;
  const void* x = nullptr;
  const float* coef = nullptr;  // one row of kNcoef float32 (host memory for CPU, device memory for CUDA)
  const void* noise = nullptr;  // optional
  const float* m_scale = nullptr;   // optional (B,) float32
  const float* x0_limit = nullptr;  // optional (B,) float32
  // Outputs (out may alias x, saved is read then written in place).
  void* out = nullptr;
  void* hist = nullptr;     // optional (kHistSlots, B, N): read and written
  void* saved = nullptr;    // optional (B, N): read and written
  void* next_in = nullptr;  // optional (next_halves * B, N)
  int32_t* flag = nullptr;  // optional (flag_len,) int32
  int64_t flag_len = 0;
  int64_t batch = 0;       // B
  int64_t per_sample = 0;  // N, elements per sample
  int next_halves = 0;     // 1 or 2 when next_in is given
  int dtype = kF32;
  bool cfg = false;
  float guidance_scale = 1.f;
  bool has_clip = false;
  float clip_range = 0.f;
};

}  // namespace fastdiff
