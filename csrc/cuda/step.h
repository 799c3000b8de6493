// Host-side interface of the CUDA fused step. Compiled by both nvcc (step.cu) and the plain C++ compiler
// (bindings_cuda.cpp), so it includes no CUDA header: the stream is an integer handle (cudaStream_t's address).
#pragma once

#include <cstdint>
#include <stdexcept>

#include "../step_params.h"

namespace fastdiff {

// Raised for every CUDA runtime failure (no device, no driver, launch error); the message holds the CUDA error.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Enqueues one step on `stream` (0 = legacy default stream) on device `device`. All pointers are device memory,
// the coefficient row included: the host never reads it, so the call does not synchronize and can be captured in
// a CUDA graph. An out-of-range WSLOT / STEP column skips that write (it cannot raise without a sync).
void step_cuda(const StepParams& p, std::uintptr_t stream, int device);

int cuda_runtime_version_built();  // CUDART_VERSION the module was compiled against
int cuda_driver_version();         // 0 when no driver is installed
int cuda_device_count();           // 0 when no GPU is visible (or no driver)

}  // namespace fastdiff
