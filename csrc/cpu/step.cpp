// The fused sampler step on CPU: CFG + x0 prediction + clamp + linear update + hist / saved / next_in writes +
// non-finite flag, in one pass over memory. The math is fastdiff/schedulers/plan.py; the oracle is
// step_reference in fastdiff/ops/step.py: same operation order and, built with -ffp-contract=off (setup.py), the same
// roundings, so results match the reference bit for bit.
//
// Layout of the work: the flat (B * N) range is cut into chunks shared out by OpenMP; a chunk is cut at sample
// boundaries only when a per-sample factor (m_scale / x0_limit) is present, and then into tiles of kTile
// elements. A tile is converted to fp32 scratch arrays and each term is one simple loop over the tile, so the
// compiler vectorizes every loop and the "is this term present" branches run once per tile, not per element.
#include "step.h"

#include "convert.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastdiff {
namespace {

constexpr int kTile = 512;          // 6 fp32 scratch tiles = 12 KiB: stays in L1
constexpr int64_t kChunk = 1 << 15;  // elements per OpenMP work item
constexpr int64_t kMinParallel = 1 << 16;  // below this, thread start-up costs more than it saves

using namespace cpu;  // NOLINT: the conversions of convert.h

// The coefficient row, read once on the host.
struct Row {
  float px, pm, ox, om, o0, os, on, oh[kHistSlots], sx, sm, s0, ss, sh[kHistSlots], in_next;
  int wslot;     // -1: no history write
  int64_t step;  // flag index
};

struct Ctx {
  StepParams p;
  Row k;
  int64_t bn;  // B * N: offset between CFG halves, hist slots and next_in halves
};

template <class S>
FD_INLINE void load_tile(const typename S::Raw* __restrict src, float* __restrict dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = S::load(src[i]);
}

template <class S>
FD_INLINE void store_tile(typename S::Raw* __restrict dst, const float* __restrict src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = S::store(src[i]);
}

FD_INLINE void axpy(float* __restrict acc, float a, const float* __restrict v, int n) {
  for (int i = 0; i < n; ++i) acc[i] += a * v[i];
}

// One tile [i, i + n) of a single sample (ms / lim are that sample's factors when present). Returns whether a
// non-finite value was produced. Every read of the tile happens before its first write, so out may alias x and
// saved is updated in place.
template <class S>
FD_INLINE bool run_tile(const Ctx& c, int64_t i, int n, float ms, float lim) {
  using Raw = typename S::Raw;
  const StepParams& p = c.p;
  const Row& k = c.k;
  const Raw* mo = static_cast<const Raw*>(p.model_out);
  alignas(64) float xf[kTile], m[kTile], x0[kTile], prev[kTile], ns[kTile], t[kTile];

  load_tile<S>(static_cast<const Raw*>(p.x) + i, xf, n);
  load_tile<S>(mo + i, m, n);
  if (p.cfg) {
    load_tile<S>(mo + c.bn + i, t, n);
    const float g = p.guidance_scale;
    for (int j = 0; j < n; ++j) m[j] = m[j] + g * (t[j] - m[j]);
  }
  if (p.m_scale != nullptr) {
    for (int j = 0; j < n; ++j) m[j] *= ms;
  }

  for (int j = 0; j < n; ++j) x0[j] = k.px * xf[j] + k.pm * m[j];
  if (p.has_clip) {
    // clamp(x0, -r, r) as torch does it: max then min, NaN passes through
    const float lo = -p.clip_range, hi = p.clip_range;
    for (int j = 0; j < n; ++j) {
      float v = x0[j] < lo ? lo : x0[j];
      x0[j] = v > hi ? hi : v;
    }
  } else if (p.x0_limit != nullptr) {
    // maximum(minimum(x0, s), -s) / s (dynamic thresholding), NaN passes through
    for (int j = 0; j < n; ++j) {
      float v = x0[j] > lim ? lim : x0[j];
      v = v < -lim ? -lim : v;
      x0[j] = v / lim;
    }
  }

  for (int j = 0; j < n; ++j) prev[j] = k.ox * xf[j] + k.om * m[j] + k.o0 * x0[j];
  if (p.noise != nullptr && k.on != 0.f) {
    load_tile<S>(static_cast<const Raw*>(p.noise) + i, t, n);
    axpy(prev, k.on, t, n);
  }
  const bool has_saved = p.saved != nullptr;
  // saved is read only when one of its coefficients is nonzero; sv keeps the old value until after the hist terms
  // so the summation order matches the reference (prev: ..., hist, saved; saved': ..., saved, hist).
  alignas(64) float sv[kTile];
  const bool read_saved = has_saved && (k.os != 0.f || k.ss != 0.f);
  if (has_saved) {
    for (int j = 0; j < n; ++j) ns[j] = k.sx * xf[j] + k.sm * m[j] + k.s0 * x0[j];
    if (read_saved) load_tile<S>(static_cast<const Raw*>(p.saved) + i, sv, n);
    if (k.ss != 0.f) axpy(ns, k.ss, sv, n);
  }
  if (p.hist != nullptr) {
    for (int h = 0; h < kHistSlots; ++h) {
      const float oh = k.oh[h], sh = has_saved ? k.sh[h] : 0.f;
      if (oh == 0.f && sh == 0.f) continue;
      load_tile<S>(static_cast<const Raw*>(p.hist) + h * c.bn + i, t, n);
      if (oh != 0.f) axpy(prev, oh, t, n);
      if (sh != 0.f) axpy(ns, sh, t, n);
    }
  }
  if (has_saved && k.os != 0.f) axpy(prev, k.os, sv, n);

  // All reads of this tile are done: the writes, in the reference's order.
  if (p.hist != nullptr && k.wslot >= 0) store_tile<S>(static_cast<Raw*>(p.hist) + k.wslot * c.bn + i, x0, n);
  if (has_saved) store_tile<S>(static_cast<Raw*>(p.saved) + i, ns, n);
  Raw* out = static_cast<Raw*>(p.out) + i;
  store_tile<S>(out, prev, n);
  if (p.next_in != nullptr) {
    // next_in = out (as stored, i.e. rounded to the storage dtype) * IN_NEXT, into every CFG half
    for (int j = 0; j < n; ++j) t[j] = S::load(out[j]) * k.in_next;
    for (int h = 0; h < p.next_halves; ++h) store_tile<S>(static_cast<Raw*>(p.next_in) + h * c.bn + i, t, n);
  }
  // Non-finite test on the fp32 result (as the reference does): exponent bits all ones.
  uint32_t bad = 0;
  for (int j = 0; j < n; ++j) bad |= uint32_t((f2u(prev[j]) & 0x7f800000u) == 0x7f800000u);
  return bad != 0;
}

// Elements [lo, hi) of the flat array, split at sample boundaries when a per-sample factor is present.
template <class S>
FD_INLINE bool run_chunk(const Ctx& c, int64_t lo, int64_t hi) {
  const StepParams& p = c.p;
  const bool per_sample = p.m_scale != nullptr || p.x0_limit != nullptr;
  bool bad = false;
  while (lo < hi) {
    int64_t end = hi;
    float ms = 1.f, lim = 1.f;
    if (per_sample) {
      const int64_t b = lo / p.per_sample;
      end = std::min(hi, (b + 1) * p.per_sample);
      if (p.m_scale != nullptr) ms = p.m_scale[b];
      if (p.x0_limit != nullptr) lim = p.x0_limit[b];
    }
    for (int64_t i = lo; i < end; i += kTile) bad |= run_tile<S>(c, i, int(std::min<int64_t>(kTile, end - i)), ms, lim);
    lo = end;
  }
  return bad;
}

// Non-template entry points so target_clones applies (one clone set per storage dtype).
FD_CLONES bool chunk_f32(const Ctx& c, int64_t lo, int64_t hi) { return run_chunk<F32>(c, lo, hi); }
FD_CLONES bool chunk_f16(const Ctx& c, int64_t lo, int64_t hi) { return run_chunk<F16>(c, lo, hi); }
FD_CLONES bool chunk_bf16(const Ctx& c, int64_t lo, int64_t hi) { return run_chunk<BF16>(c, lo, hi); }

void check(bool cond, const std::string& msg) {
  if (!cond) throw std::invalid_argument("fastdiff._C_cpu.step: " + msg);
}

Row read_row(const StepParams& p) {
  const float* c = p.coef;
  Row k;
  k.px = c[col::PX];
  k.pm = c[col::PM];
  k.ox = c[col::OX];
  k.om = c[col::OM];
  k.o0 = c[col::O0];
  k.os = c[col::OS];
  k.on = c[col::ON];
  k.sx = c[col::SX];
  k.sm = c[col::SM];
  k.s0 = c[col::S0];
  k.ss = c[col::SS];
  for (int h = 0; h < kHistSlots; ++h) {
    k.oh[h] = c[col::OH0 + h];
    k.sh[h] = c[col::SH0 + h];
  }
  k.in_next = c[col::IN_NEXT];
  // The reference writes hist[int(w)] when w >= 0 (truncation toward zero, like tensor.long()).
  const float w = c[col::WSLOT];
  k.wslot = -1;
  if (p.hist != nullptr && w >= 0.f) {
    if (!(w < float(kHistSlots)))
      throw std::out_of_range("fastdiff._C_cpu.step: coefficient WSLOT=" + std::to_string(w) +
                              " does not index the " + std::to_string(kHistSlots) + " hist slots");
    k.wslot = int(w);
  }
  const float s = c[col::STEP];
  k.step = -1;
  if (p.flag != nullptr) {
    if (!(s > -1.f && s < float(p.flag_len)))
      throw std::out_of_range("fastdiff._C_cpu.step: coefficient STEP=" + std::to_string(s) +
                              " does not index flag of length " + std::to_string(p.flag_len));
    k.step = int64_t(s);
  }
  return k;
}

}  // namespace

bool cpu_has_isa_clones() { return FD_HAS_CLONES != 0; }

void step_cpu(const StepParams& p, int num_threads) {
  check(p.model_out && p.x && p.coef && p.out, "model_out, x, coef and out are required");
  check(p.batch > 0 && p.per_sample > 0, "batch and per-sample size must be positive");
  check(p.next_in == nullptr || p.next_halves == 1 || p.next_halves == 2, "next_in must have 1 or 2 halves");
  check(p.flag == nullptr || p.flag_len > 0, "flag must not be empty");

  Ctx c{p, read_row(p), p.batch * p.per_sample};
  bool (*chunk)(const Ctx&, int64_t, int64_t) = nullptr;
  switch (p.dtype) {
    case kF32: chunk = chunk_f32; break;
    case kF16: chunk = chunk_f16; break;
    case kBF16: chunk = chunk_bf16; break;
    default: check(false, "unknown dtype code " + std::to_string(p.dtype));
  }

  const int64_t total = c.bn;
  const int64_t nchunks = (total + kChunk - 1) / kChunk;
  int bad = 0;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad) \
    if (threads > 1 && total >= kMinParallel)
#endif
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t lo = ci * kChunk;
    bad |= int(chunk(c, lo, std::min(total, lo + kChunk)));
  }
  (void)num_threads;
  if (bad && p.flag != nullptr) p.flag[c.k.step] = 1;
}

}  // namespace fastdiff
