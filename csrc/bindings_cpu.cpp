// pybind11 module fastdiff._C_cpu: the fused sampler step on CPU. See csrc/README.md for the ABI rule.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings_common.h"
#include "cpu/groupnorm.h"
#include "cpu/step.h"

namespace py = pybind11;
using fastdiff::make_group_norm_params;
using fastdiff::make_params;

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastdiff fused sampler step and GroupNorm, C++ / OpenMP (raw pointers; called by fastdiff.kernels.cpp.*)";
  fastdiff::add_constants(m);

  m.def(
      "step",
      [](std::uintptr_t model_out, std::uintptr_t x, std::uintptr_t coef, std::uintptr_t out, std::uintptr_t hist,
         std::uintptr_t saved, std::uintptr_t noise, std::uintptr_t next_in, std::uintptr_t m_scale,
         std::uintptr_t x0_limit, std::uintptr_t flag, std::int64_t flag_len, std::int64_t batch,
         std::int64_t per_sample, int next_halves, int dtype, bool cfg, float guidance_scale, bool has_clip,
         float clip_range, int num_threads) {
        const fastdiff::StepParams p =
            make_params(model_out, x, coef, out, hist, saved, noise, next_in, m_scale, x0_limit, flag, flag_len,
                        batch, per_sample, next_halves, dtype, cfg, guidance_scale, has_clip, clip_range);
        // Pure C++ on buffers the caller keeps alive: other Python threads may run meanwhile.
        py::gil_scoped_release release;
        fastdiff::step_cpu(p, num_threads);
      },
      FASTDIFF_STEP_ARGS, py::arg("num_threads"),
      "One fused step over contiguous CPU buffers given by address (0 = absent); coef is read on the host.");

  m.def(
      "group_norm",
      [](FASTDIFF_GROUP_NORM_SIGNATURE, int num_threads) {
        const fastdiff::GroupNormParams p = FASTDIFF_GROUP_NORM_CALL;
        py::gil_scoped_release release;
        fastdiff::group_norm_cpu(p, num_threads);
      },
      FASTDIFF_GROUP_NORM_ARGS, py::arg("num_threads"),
      "y = GroupNorm(x + add) (then SiLU) over CPU buffers given by address and element strides (0 = absent).");

  py::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = py::none();
#endif
  info["isa_clones"] = fastdiff::cpu_has_isa_clones();
  info["pybind11"] = PYBIND11_VERSION_MAJOR * 10000 + PYBIND11_VERSION_MINOR * 100 + PYBIND11_VERSION_PATCH;
  m.attr("BUILD_INFO") = info;
}
