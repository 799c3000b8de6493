// pybind11 module fastdiff._C_cuda: the fused sampler step on CUDA. Compiled by the host C++ compiler (no CUDA
// or torch header); the kernels come from csrc/cuda/step.cu (nvcc) and the CUDA runtime is linked statically, so
// the module imports on machines with no GPU, driver or toolkit and fails only when called.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings_common.h"
#include "cuda/groupnorm.h"
#include "cuda/step.h"

namespace py = pybind11;
using fastdiff::make_group_norm_params;
using fastdiff::make_params;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastdiff fused sampler step and GroupNorm, CUDA (raw device pointers; called by fastdiff.kernels.cuda.*)";
  fastdiff::add_constants(m);
  // A RuntimeError subclass, so callers may catch either.
  py::register_exception<fastdiff::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.def(
      "step",
      [](std::uintptr_t model_out, std::uintptr_t x, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t hist,
         std::uintptr_t saved, std::uintptr_t noise, std::uintptr_t next_in, std::uintptr_t m_scale,
         std::uintptr_t x0_limit, std::uintptr_t flag, std::int64_t flag_len, std::int64_t batch,
         std::int64_t per_sample, int next_halves, int dtype, bool cfg, float guidance_scale, bool has_clip,
         float clip_range, std::uintptr_t stream, int device) {
        const fastdiff::StepParams p =
            make_params(model_out, x, coef, out, hist, saved, noise, next_in, m_scale, x0_limit, flag, flag_len,
                        batch, per_sample, next_halves, dtype, cfg, guidance_scale, has_clip, clip_range);
        fastdiff::step_cuda(p, stream, device);
      },
      FASTDIFF_STEP_ARGS, py::arg("stream"), py::arg("device"),
      "Enqueue one fused step on `stream` (cudaStream_t as int) of `device`; all addresses are device memory, "
      "the coefficient row included (never read by the host).");

  m.def(
      "group_norm",
      [](FASTDIFF_GROUP_NORM_SIGNATURE, std::uintptr_t workspace, std::int64_t workspace_len, std::uintptr_t stream,
         int device) {
        const fastdiff::GroupNormParams p = FASTDIFF_GROUP_NORM_CALL;
        fastdiff::group_norm_cuda(p, reinterpret_cast<float*>(workspace), workspace_len, stream, device);
      },
      FASTDIFF_GROUP_NORM_ARGS, py::arg("workspace"), py::arg("workspace_len"), py::arg("stream"), py::arg("device"),
      "Enqueue y = GroupNorm(x + add) (then SiLU) on `stream` of `device`; workspace: float32 device scratch of "
      "at least N * groups * GROUP_NORM_WORKSPACE_PER_GROUP elements.");
  m.attr("GROUP_NORM_WORKSPACE_PER_GROUP") = fastdiff::kGroupNormWorkspacePerGroup;
  m.attr("GROUP_NORM_MAX_CHANNELS_PER_GROUP") = fastdiff::kGroupNormMaxChannelsPerGroup;

  m.def("runtime_version_built", &fastdiff::cuda_runtime_version_built,
        "CUDART_VERSION the module was compiled against (e.g. 13000).");
  m.def("driver_version", &fastdiff::cuda_driver_version, "Installed driver's CUDA version, 0 when none.");
  m.def("device_count", &fastdiff::cuda_device_count, "Visible CUDA devices, 0 when none (or no driver).");

  py::dict info;
#if defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  info["cuda_runtime"] = fastdiff::cuda_runtime_version_built();
#ifdef FASTDIFF_CUDA_ARCHS
  info["archs"] = FASTDIFF_CUDA_ARCHS;
#endif
  info["pybind11"] = PYBIND11_VERSION_MAJOR * 10000 + PYBIND11_VERSION_MINOR * 100 + PYBIND11_VERSION_PATCH;
  m.attr("BUILD_INFO") = info;
}
