// Pieces shared by the two pybind11 modules (fastdiff._C_cpu, fastdiff._C_cuda): the constants the Python side
// cross-checks, and the one positional calling convention of `step`. Tensors are passed as integer addresses
// (tensor.data_ptr(), 0 for None): no torch headers, so one binary serves any torch version.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "groupnorm_params.h"
#include "step_params.h"

namespace fastdiff {

namespace py = pybind11;

inline void add_constants(py::module_& m) {
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("NCOEF") = kNcoef;
  m.attr("HIST_SLOTS") = kHistSlots;
  py::dict cols;
  cols["PX"] = col::PX;
  cols["PM"] = col::PM;
  cols["OX"] = col::OX;
  cols["OM"] = col::OM;
  cols["O0"] = col::O0;
  cols["OS"] = col::OS;
  cols["ON"] = col::ON;
  cols["OH0"] = col::OH0;
  cols["SX"] = col::SX;
  cols["SM"] = col::SM;
  cols["S0"] = col::S0;
  cols["SS"] = col::SS;
  cols["SH0"] = col::SH0;
  cols["WSLOT"] = col::WSLOT;
  cols["IN_NEXT"] = col::IN_NEXT;
  cols["NOISE"] = col::NOISE;
  cols["STEP"] = col::STEP;
  m.attr("COLUMNS") = cols;
  py::dict dtypes;
  dtypes["float32"] = int(kF32);
  dtypes["float16"] = int(kF16);
  dtypes["bfloat16"] = int(kBF16);
  m.attr("DTYPES") = dtypes;
}

template <class T>
inline T* as_ptr(std::uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

// The positional arguments of `step` (see fastdiff/kernels/compiled_args.py:step_args), in this order.
inline StepParams make_params(std::uintptr_t model_out, std::uintptr_t x, std::uintptr_t coef, std::uintptr_t out,
                              std::uintptr_t hist, std::uintptr_t saved, std::uintptr_t noise,
                              std::uintptr_t next_in, std::uintptr_t m_scale, std::uintptr_t x0_limit,
                              std::uintptr_t flag, std::int64_t flag_len, std::int64_t batch,
                              std::int64_t per_sample, int next_halves, int dtype, bool cfg, float guidance_scale,
                              bool has_clip, float clip_range) {
  StepParams p;
  p.model_out = as_ptr<const void>(model_out);
  p.x = as_ptr<const void>(x);
  p.coef = as_ptr<const float>(coef);
  p.out = as_ptr<void>(out);
  p.hist = as_ptr<void>(hist);
  p.saved = as_ptr<void>(saved);
  p.noise = as_ptr<const void>(noise);
  p.next_in = as_ptr<void>(next_in);
  p.m_scale = as_ptr<const float>(m_scale);
  p.x0_limit = as_ptr<const float>(x0_limit);
  p.flag = as_ptr<std::int32_t>(flag);
  p.flag_len = flag_len;
  p.batch = batch;
  p.per_sample = per_sample;
  p.next_halves = next_halves;
  p.dtype = dtype;
  p.cfg = cfg;
  p.guidance_scale = guidance_scale;
  p.has_clip = has_clip;
  p.clip_range = clip_range;
  return p;
}

#define FASTDIFF_STEP_ARGS                                                                                        \
  py::arg("model_out"), py::arg("x"), py::arg("coef"), py::arg("out"), py::arg("hist"), py::arg("saved"),       \
      py::arg("noise"), py::arg("next_in"), py::arg("m_scale"), py::arg("x0_limit"), py::arg("flag"),            \
      py::arg("flag_len"), py::arg("batch"), py::arg("per_sample"), py::arg("next_halves"), py::arg("dtype"),    \
      py::arg("cfg"), py::arg("guidance_scale"), py::arg("has_clip"), py::arg("clip_range")

// The positional arguments of `group_norm` (see fastdiff/kernels/compiled_args.py:group_norm_args), in this order.
inline GroupNormParams make_group_norm_params(std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight,
                                              std::uintptr_t bias, std::uintptr_t add, std::int64_t n,
                                              std::int64_t c, std::int64_t l, std::int64_t groups, std::int64_t sxn,
                                              std::int64_t sxc, std::int64_t sxl, std::int64_t syn, std::int64_t syc,
                                              std::int64_t syl, std::int64_t san, std::int64_t sac, int dtype,
                                              int weight_dtype, int add_dtype, float eps, bool silu) {
  GroupNormParams p;
  p.x = as_ptr<const void>(x);
  p.y = as_ptr<void>(y);
  p.weight = as_ptr<const void>(weight);
  p.bias = as_ptr<const void>(bias);
  p.add = as_ptr<const void>(add);
  p.n = n, p.c = c, p.l = l, p.groups = groups;
  p.sxn = sxn, p.sxc = sxc, p.sxl = sxl, p.syn = syn, p.syc = syc, p.syl = syl, p.san = san, p.sac = sac;
  p.dtype = dtype, p.weight_dtype = weight_dtype, p.add_dtype = add_dtype;
  p.eps = eps, p.silu = silu;
  return p;
}

#define FASTDIFF_GROUP_NORM_SIGNATURE                                                                             \
  std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t add,             \
      std::int64_t n, std::int64_t c, std::int64_t l, std::int64_t groups, std::int64_t sxn, std::int64_t sxc,      \
      std::int64_t sxl, std::int64_t syn, std::int64_t syc, std::int64_t syl, std::int64_t san, std::int64_t sac,   \
      int dtype, int weight_dtype, int add_dtype, float eps, bool silu
#define FASTDIFF_GROUP_NORM_CALL                                                                                  \
  make_group_norm_params(x, y, weight, bias, add, n, c, l, groups, sxn, sxc, sxl, syn, syc, syl, san, sac, dtype, \
                         weight_dtype, add_dtype, eps, silu)
#define FASTDIFF_GROUP_NORM_ARGS                                                                                  \
  py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("add"), py::arg("n"), py::arg("c"),     \
      py::arg("l"), py::arg("groups"), py::arg("sxn"), py::arg("sxc"), py::arg("sxl"), py::arg("syn"),            \
      py::arg("syc"), py::arg("syl"), py::arg("san"), py::arg("sac"), py::arg("dtype"), py::arg("weight_dtype"),  \
      py::arg("add_dtype"), py::arg("eps"), py::arg("silu")

}  // namespace fastdiff
