// The fused GroupNorm (+ add, + SiLU) on CPU: the math of csrc/groupnorm_params.h. Two walks:
//
// - dense channels-last: one OpenMP work item per sample, its positions in memory order, each a row of all C
//   channels, with per-channel accumulators (run_sample_channels_last);
// - anything else: one work item per (sample, group), the group walked as rows x cols, each row a run along the
//   smaller of its two strides (NCHW: a row is one channel's positions, and a dense group is a single run of all
//   its channels; other strides: the group's channels at one position).
//
// Either way three passes over the data, which at UNet sizes stays in L2:
//
//   1. sum of z = x + add           -> mean        (fp32 lanes per 512-element tile, double across tiles)
//   2. sum of (z - mean)^2           -> variance    (two-pass: no cancellation when |mean| >> std)
//   3. y = (z - mean) * rstd * w + b, SiLU, store
//
// Every inner loop is a plain loop over an fp32 tile, so it vectorizes (the SiLU's exp included, see fast_exp).
#include "groupnorm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"

namespace fastdiff {
namespace {

using namespace cpu;  // NOLINT: the conversions of convert.h

constexpr int kTile = 512;                 // one fp32 tile = 2 KiB
constexpr int kLanes = 16;                 // independent partial sums: vectorizable without reassociation
constexpr int64_t kMinParallel = 1 << 15;  // elements; below this one thread is faster than a fork / join

// exp(v) as plain arithmetic, so the SiLU loop vectorizes: glibc's expf is one call per element (without
// -ffast-math GCC does not use its vector variants). v = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite: ln2 in two
// parts, k ln2_hi exact), exp(r) by its degree-7 Taylor polynomial (truncation 5e-9 relative), times 2^k built in
// the exponent bits. Within 1.2 ulp of exp over [-87, 88] (every 64th float there, against double exp; the SiLU
// tests compare with float64). v is clamped to [-87, 88] so 2^k stays
// a normal float; for the SiLU that only matters at y < -87, where y * sigmoid(y) is below 1e-36 either way.
FD_INLINE float fast_exp(float v) {
  v = v < -87.f ? -87.f : v;
  v = v > 88.f ? 88.f : v;
  const float k = (v * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (v - k * 0.693359375f) - k * -2.12194440e-4f;
  float e = 1.f / 5040.f;
  e = e * r + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  return e * u2f(uint32_t(int32_t(k) + 127) << 23);
}

FD_INLINE float tile_sum(const float* __restrict t, int m) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= m; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += t[i + j];
  float s = 0.f;
  for (; i < m; ++i) s += t[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

FD_INLINE float tile_sq_dev(const float* __restrict t, int m, float mean) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= m; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = t[i + j] - mean;
      acc[j] += d * d;
    }
  float s = 0.f;
  for (; i < m; ++i) s += (t[i] - mean) * (t[i] - mean);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <class S>
FD_INLINE void load_run(const typename S::Raw* __restrict src, int64_t stride, float* __restrict dst, int m) {
  if (stride == 1) {
    for (int j = 0; j < m; ++j) dst[j] = S::load(src[j]);
  } else {
    for (int j = 0; j < m; ++j) dst[j] = S::load(src[j * stride]);
  }
}

template <class S>
FD_INLINE void store_run(typename S::Raw* __restrict dst, int64_t stride, const float* __restrict src, int m) {
  if (stride == 1) {
    for (int j = 0; j < m; ++j) dst[j] = S::store(src[j]);
  } else {
    for (int j = 0; j < m; ++j) dst[j * stride] = S::store(src[j]);
  }
}

// One (sample, group). chan: per channel of the group, [add | scale | shift] (3 x cpg floats of scratch).
template <class S>
FD_INLINE void run_group(const GroupNormParams& p, int64_t n, int64_t g, bool channels_inner, float* chan) {
  using Raw = typename S::Raw;
  const int64_t cpg = p.c / p.groups, c0 = g * cpg;
  const Raw* x = static_cast<const Raw*>(p.x) + n * p.sxn + c0 * p.sxc;
  Raw* y = static_cast<Raw*>(p.y) + n * p.syn + c0 * p.syc;
  float* add = chan;
  float* scale = chan + cpg;
  float* shift = chan + 2 * cpg;
  for (int64_t c = 0; c < cpg; ++c)
    add[c] = p.add != nullptr ? load_code(p.add, n * p.san + (c0 + c) * p.sac, p.add_dtype) : 0.f;

  int64_t rows = channels_inner ? p.l : cpg, cols = channels_inner ? cpg : p.l;
  const int64_t xr = channels_inner ? p.sxl : p.sxc, xc = channels_inner ? p.sxc : p.sxl;
  const int64_t yr = channels_inner ? p.syl : p.syc, yc = channels_inner ? p.syc : p.syl;
  // A dense NCHW group is one run of cpg * L elements: walked as a single row, so small L (8x8 maps) does not pay
  // the per-row tile overhead (1.2x faster at 8x8, no change from 16x16 up). Column k then is channel k / L.
  if (!channels_inner && xc == 1 && yc == 1 && xr == p.l && yr == p.l) {
    rows = 1;
    cols = cpg * p.l;
  }
  // Calls f(j0, j1, channel) for the runs of one channel within the tile of row r at column k (rows other than
  // the channels-inner walk: each row is one channel, or one run of whole channels).
  auto by_channel = [&](int64_t r, int64_t k, int m, auto&& f) {
    for (int j = 0; j < m;) {
      const int64_t ch = r + (k + j) / p.l;
      const int end = int(std::min<int64_t>(m, (ch - r + 1) * p.l - k));
      f(j, end, ch);
      j = end;
    }
  };
  const bool has_add = p.add != nullptr;
  alignas(64) float t[kTile], e[kTile];
  // The tile of z = x + add of row r from column k: x itself when it already is fp32, contiguous and there is no
  // add (no copy: a copy into scratch cost 40% of the kernel), else converted into t.
  auto load_z = [&](int64_t r, int64_t k, int m) -> const float* {
    const Raw* src = x + r * xr + k * xc;
    if constexpr (std::is_same_v<Raw, float>) {
      if (xc == 1 && !has_add) return src;
    }
    load_run<S>(src, xc, t, m);
    if (has_add && channels_inner) {
      for (int j = 0; j < m; ++j) t[j] += add[k + j];
    } else if (has_add) {
      by_channel(r, k, m, [&](int j0, int j1, int64_t ch) {
        const float a = add[ch];
        for (int j = j0; j < j1; ++j) t[j] += a;
      });
    }
    return t;
  };

  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; k += kTile) {
      const int m = int(std::min<int64_t>(kTile, cols - k));
      sum += tile_sum(load_z(r, k, m), m);
    }
  const double count = double(cpg) * double(p.l);
  const float mean = float(sum / count);
  double m2 = 0.0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; k += kTile) {
      const int m = int(std::min<int64_t>(kTile, cols - k));
      m2 += tile_sq_dev(load_z(r, k, m), m, mean);
    }
  const float rstd = float(1.0 / std::sqrt(m2 / count + double(p.eps)));
  for (int64_t c = 0; c < cpg; ++c) {
    scale[c] = p.weight != nullptr ? rstd * load_code(p.weight, c0 + c, p.weight_dtype) : rstd;
    shift[c] = p.bias != nullptr ? load_code(p.bias, c0 + c, p.weight_dtype) : 0.f;
  }

  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; k += kTile) {
      const int m = int(std::min<int64_t>(kTile, cols - k));
      const float* z = load_z(r, k, m);  // may be t itself: each element is read before it is written
      if (channels_inner) {
        for (int j = 0; j < m; ++j) t[j] = (z[j] - mean) * scale[k + j] + shift[k + j];
      } else {
        by_channel(r, k, m, [&](int j0, int j1, int64_t ch) {
          const float sc = scale[ch], sh = shift[ch];
          for (int j = j0; j < j1; ++j) t[j] = (z[j] - mean) * sc + sh;
        });
      }
      if (p.silu) {
        // y * sigmoid(y) in two loops: fused into one, GCC computes the division twice and blends (2.2x slower)
        for (int j = 0; j < m; ++j) e[j] = 1.f + fast_exp(-t[j]);
        for (int j = 0; j < m; ++j) t[j] = t[j] / e[j];
      }
      store_run<S>(y + r * yr + k * yc, yc, t, m);
    }
}

// One sample of a dense channels-last tensor (each position a contiguous row of all C channels): every pass walks the
// rows in memory order and keeps one accumulator per channel, so the inner loops run over C contiguous channels
// instead of a group's 8-40 (the per-group walk took 11x longer than PyTorch at 2x320x64x64). Per-channel sums go
// from fp32 (a block of kRowBlock rows) into double, then per group. scratch: 7 x C floats, acc: C doubles.
constexpr int kRowBlock = 64;

template <class S>
FD_INLINE void run_sample_channels_last(const GroupNormParams& p, int64_t n, float* scratch, double* acc) {
  using Raw = typename S::Raw;
  const int64_t C = p.c, cpg = C / p.groups;
  const Raw* x = static_cast<const Raw*>(p.x) + n * p.sxn;
  Raw* y = static_cast<Raw*>(p.y) + n * p.syn;
  float *add = scratch, *mean = scratch + C, *scale = scratch + 2 * C, *shift = scratch + 3 * C;
  float *row = scratch + 4 * C, *e = scratch + 5 * C, *part = scratch + 6 * C;
  for (int64_t c = 0; c < C; ++c)
    add[c] = p.add != nullptr ? load_code(p.add, n * p.san + c * p.sac, p.add_dtype) : 0.f;
  const double count = double(cpg) * double(p.l);

  // Per channel: sum over positions of f(z) for z = x + add, then summed over each group's channels.
  auto group_sums = [&](auto&& f) {
    std::fill(acc, acc + C, 0.0);
    for (int64_t l0 = 0; l0 < p.l; l0 += kRowBlock) {
      std::fill(part, part + C, 0.f);
      for (int64_t l = l0; l < std::min<int64_t>(p.l, l0 + kRowBlock); ++l) {
        load_run<S>(x + l * p.sxl, 1, row, int(C));
        for (int64_t c = 0; c < C; ++c) part[c] += f(row[c] + add[c], c);
      }
      for (int64_t c = 0; c < C; ++c) acc[c] += part[c];
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      double s = 0.0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += acc[c];
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) acc[c] = s;  // the group's total, per channel
    }
  };
  group_sums([](float z, int64_t) { return z; });
  for (int64_t c = 0; c < C; ++c) mean[c] = float(acc[c] / count);
  group_sums([&](float z, int64_t c) { return (z - mean[c]) * (z - mean[c]); });
  for (int64_t c = 0; c < C; ++c) {
    const float rstd = float(1.0 / std::sqrt(acc[c] / count + double(p.eps)));
    scale[c] = p.weight != nullptr ? rstd * load_code(p.weight, c, p.weight_dtype) : rstd;
    shift[c] = p.bias != nullptr ? load_code(p.bias, c, p.weight_dtype) : 0.f;
  }
  for (int64_t l = 0; l < p.l; ++l) {
    load_run<S>(x + l * p.sxl, 1, row, int(C));
    for (int64_t c = 0; c < C; ++c) row[c] = (row[c] + add[c] - mean[c]) * scale[c] + shift[c];
    if (p.silu) {
      for (int64_t c = 0; c < C; ++c) e[c] = 1.f + fast_exp(-row[c]);
      for (int64_t c = 0; c < C; ++c) row[c] = row[c] / e[c];
    }
    store_run<S>(y + l * p.syl, 1, row, int(C));
  }
}

// Non-template entry points so target_clones applies (one clone set per storage dtype).
FD_CLONES void group_f32(const GroupNormParams& p, int64_t n, int64_t g, bool ci, float* chan) {
  run_group<F32>(p, n, g, ci, chan);
}
FD_CLONES void group_f16(const GroupNormParams& p, int64_t n, int64_t g, bool ci, float* chan) {
  run_group<F16>(p, n, g, ci, chan);
}
FD_CLONES void group_bf16(const GroupNormParams& p, int64_t n, int64_t g, bool ci, float* chan) {
  run_group<BF16>(p, n, g, ci, chan);
}
FD_CLONES void sample_cl_f32(const GroupNormParams& p, int64_t n, float* scratch, double* acc) {
  run_sample_channels_last<F32>(p, n, scratch, acc);
}
FD_CLONES void sample_cl_f16(const GroupNormParams& p, int64_t n, float* scratch, double* acc) {
  run_sample_channels_last<F16>(p, n, scratch, acc);
}
FD_CLONES void sample_cl_bf16(const GroupNormParams& p, int64_t n, float* scratch, double* acc) {
  run_sample_channels_last<BF16>(p, n, scratch, acc);
}

void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("fastdiff._C_cpu.group_norm: " + msg);
}

bool known_dtype(int code) { return code == kF32 || code == kF16 || code == kBF16; }

}  // namespace

void group_norm_cpu(const GroupNormParams& p, int num_threads) {
  check(p.x != nullptr && p.y != nullptr, "x and y are required");
  check(p.n > 0 && p.c > 0 && p.l > 0, "N, C and L must be positive");
  check(p.groups > 0 && p.c % p.groups == 0, "groups must be a positive divisor of C");
  check(known_dtype(p.dtype) && known_dtype(p.weight_dtype) && known_dtype(p.add_dtype), "unknown dtype code");
  check(std::isfinite(p.eps) && p.eps >= 0.f, "eps must be finite and >= 0");
  const int64_t total = p.n * p.c * p.l;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
  // Dense channels-last samples: one work item per sample, rows of all C channels.
  if (p.l > 1 && p.sxc == 1 && p.syc == 1 && p.sxl == p.c && p.syl == p.c) {
    void (*sample)(const GroupNormParams&, int64_t, float*, double*) =
        p.dtype == kF16 ? sample_cl_f16 : p.dtype == kBF16 ? sample_cl_bf16 : sample_cl_f32;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && total >= kMinParallel && p.n > 1)
#endif
    {
      std::vector<float> scratch(size_t(7 * p.c));
      std::vector<double> acc(size_t(p.c));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t n = 0; n < p.n; ++n) sample(p, n, scratch.data(), acc.data());
    }
    return;
  }
  void (*group)(const GroupNormParams&, int64_t, int64_t, bool, float*) =
      p.dtype == kF16 ? group_f16 : p.dtype == kBF16 ? group_bf16 : group_f32;
  // Walk along the unit (or smaller) stride: positions when they are contiguous, else channels (other strides).
  const bool channels_inner = p.sxl != 1 && std::abs(p.sxc) < std::abs(p.sxl);
  const int64_t cpg = p.c / p.groups, items = p.n * p.groups;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && total >= kMinParallel && items > 1)
#endif
  {
    std::vector<float> chan(size_t(3 * cpg));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < items; ++i) group(p, i / p.groups, i % p.groups, channels_inner, chan.data());
  }
  (void)num_threads;
  (void)total;
}

}  // namespace fastdiff
