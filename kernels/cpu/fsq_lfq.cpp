// FSQ/LFQ entry points: split rows across OpenMP threads, run the widest active SIMD level.
// The scalar instantiation lives here (compiled without ISA flags, so it runs on any x86-64).
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <cfloat>
#include <mutex>
#include <type_traits>

#include <omp.h>

#include "fsq_lfq_simd.h"
#include "vqtok/cpu_features.h"

namespace vqtok {
namespace fsq_lfq_detail {

int64_t fsq_forward_rows_scalar(const FsqArgs& a, const FsqThresholds& th, int64_t r0, int64_t r1) {
  return fsq_forward_rows<ScalarOps>(a, th, r0, r1);
}
void fsq_backward_rows_scalar(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_backward_rows<ScalarOps>(a, r0, r1); }
int64_t lfq_forward_rows_scalar(const LfqArgs& a, int64_t r0, int64_t r1) { return lfq_forward_rows<ScalarOps>(a, r0, r1); }
void tanh_range_scalar(const float* x, int64_t i0, int64_t i1, float* out) { tanh_range<ScalarOps>(x, i0, i1, out); }

const double* tanh_grid() {
  static const std::vector<double> grid = [] {
    std::vector<double> t(kTanhGridSize);
    for (int i = 0; i < kTanhGridSize; ++i) {  // tanh(i/64) = m / (m + 2): tanh_f_exact's expm1, a true division
      const double m = expm1_2abs_d<ScalarOps>(double(i) / kTanhGridPerUnit);
      t[i] = m / (m + 2.0);
    }
    return t;
  }();
  return grid.data();
}

namespace {

// fp32 values as ordered integers: a < b  <=>  key(a) < key(b) for non-NaN floats (-0 and +0 share 0).
inline int64_t float_key(float f) {
  const uint32_t b = float_to_bits(f);
  return (b & 0x80000000u) ? -int64_t(b & 0x7fffffffu) : int64_t(b);
}
inline float key_float(int64_t k) { return bits_to_float(k >= 0 ? uint32_t(k) : uint32_t(-k) | 0x80000000u); }

// Column j's code step of the direct forward, q(z) = rint(tanh(z + shift) * half_l - offset),
// with the same fp32 operations (and the same tanh bits) as fsq_forward_block.
inline float fsq_step(const FsqArgs& a, int j, float z) {
  const float t = tanh_f_exact<ScalarOps>(z + a.shift[j]);
  return std::nearbyint(t * a.half_l[j] - a.offset[j]);
}

// Smallest finite float z with q_j(z) >= v, given q_j(-FLT_MAX) < v <= q_j(FLT_MAX): gallop out
// from the double-precision estimate z0 = atanh((v - 1/2 + offset) / half_l) - shift (usually an
// ulp or two off) to a bracket, then bisect on the ordered keys. q_j is non-decreasing, so the
// bisection finds the exact step.
float fsq_threshold(const FsqArgs& a, int j, float v) {
  const int64_t kmin = float_key(-FLT_MAX), kmax = float_key(FLT_MAX);
  auto reaches = [&](int64_t k) { return fsq_step(a, j, key_float(k)) >= v; };
  const double ratio = (double(v) - 0.5 + double(a.offset[j])) / double(a.half_l[j]);
  const double z0 = std::atanh(std::clamp(ratio, -1.0 + 1e-15, 1.0 - 1e-15)) - double(a.shift[j]);
  int64_t lo, hi;  // invariant at the end: !reaches(lo), reaches(hi)
  int64_t g = std::clamp(float_key(float(std::clamp(z0, -double(FLT_MAX), double(FLT_MAX)))), kmin + 1, kmax);
  if (reaches(g)) {
    hi = g;
    for (int64_t step = 1;; step *= 2) {
      lo = std::max(kmin, hi - step);
      if (lo == kmin || !reaches(lo)) break;
      hi = lo;
    }
  } else {
    lo = g;
    for (int64_t step = 1;; step *= 2) {
      hi = std::min(kmax, lo + step);
      if (hi == kmax || reaches(hi)) break;
      lo = hi;
    }
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (reaches(mid) ? hi : lo) = mid;
  }
  return key_float(hi);
}

FsqThresholds compute_thresholds(const FsqArgs& a) {
  FsqThresholds th;
  std::vector<float> qmax(a.d);
  th.qmin.resize(a.d);
  int n = 0;
  for (int j = 0; j < a.d; ++j) {
    th.qmin[j] = fsq_step(a, j, -FLT_MAX);
    qmax[j] = fsq_step(a, j, FLT_MAX);
    n = std::max(n, int(std::min(double(qmax[j] - th.qmin[j]), 1e9)));
  }
  if (n > kFsqMaxThresholds) return FsqThresholds{};
  th.n = n;
  th.thr.assign(size_t(a.d) * n, bits_to_float(0x7fc00000u));  // quiet NaN: never reached
  for (int j = 0; j < a.d; ++j)
    for (int v = 0; v < int(qmax[j] - th.qmin[j]); ++v)
      th.thr[size_t(j) * n + v] = fsq_threshold(a, j, th.qmin[j] + v + 1);
  return th;
}

}  // namespace

// One cached entry (training calls the same levels every step): the thresholds depend only on the
// per-column constants.
FsqThresholds fsq_thresholds(const FsqArgs& a) {
  static std::mutex mu;
  static std::vector<float> key;
  static FsqThresholds cached;
  std::vector<float> k;
  k.reserve(size_t(3) * a.d);
  for (int j = 0; j < a.d; ++j) k.insert(k.end(), {a.half_l[j], a.offset[j], a.shift[j]});
  {
    std::lock_guard<std::mutex> lock(mu);
    if (k.size() == key.size() && std::memcmp(k.data(), key.data(), k.size() * sizeof(float)) == 0) return cached;
  }
  FsqThresholds th = compute_thresholds(a);
  std::lock_guard<std::mutex> lock(mu);
  key = std::move(k);
  cached = th;
  return th;
}

namespace {

// Runs fn(r0, r1) over [0, m) in chunks of whole 64-row groups (so SIMD blocks never straddle
// chunks): serial below ~32k values, else up to 16 chunks per OpenMP thread, handed out
// dynamically, so a thread the OS preempts does not hold the others at the closing barrier.
// Returns the sum of fn's results (fn returning void counts as 0).
template <class Fn>
int64_t parallel_rows(int64_t m, int64_t values_per_row, Fn fn) {
  auto call = [&](int64_t r0, int64_t r1) -> int64_t {
    if constexpr (std::is_void_v<decltype(fn(r0, r1))>) {
      fn(r0, r1);
      return 0;
    } else {
      return fn(r0, r1);
    }
  };
  constexpr int64_t kMinValuesPerChunk = 1 << 14;
  const int64_t vpr = std::max<int64_t>(values_per_row, 1);
  const int64_t total = m * vpr;
  if (total <= 2 * kMinValuesPerChunk) return call(int64_t{0}, m);
  const int64_t by_size = total / kMinValuesPerChunk;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(by_size, int64_t(omp_get_max_threads()) * 16));
  const int64_t chunk = ((m + nchunks - 1) / nchunks + 63) / 64 * 64;
  const int64_t n = (m + chunk - 1) / chunk;
  int64_t sum = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += call(c * chunk, std::min(m, (c + 1) * chunk));
  return sum;
}

}  // namespace
}  // namespace fsq_lfq_detail

using namespace fsq_lfq_detail;

int64_t fsq_forward(const FsqArgs& a) {
  const Isa isa = active_isa();
  const FsqThresholds th = a.m > 0 ? fsq_thresholds(a) : FsqThresholds{};
  return parallel_rows(a.m, a.d, [&](int64_t r0, int64_t r1) {
    if (isa == Isa::Avx512) return fsq_forward_rows_avx512(a, th, r0, r1);
    if (isa == Isa::Avx2) return fsq_forward_rows_avx2(a, th, r0, r1);
    return fsq_forward_rows_scalar(a, th, r0, r1);
  });
}

void fsq_backward(const FsqArgs& a) {
  const Isa isa = active_isa();
  parallel_rows(a.m, a.d, [&](int64_t r0, int64_t r1) {
    if (isa == Isa::Avx512) fsq_backward_rows_avx512(a, r0, r1);
    else if (isa == Isa::Avx2) fsq_backward_rows_avx2(a, r0, r1);
    else fsq_backward_rows_scalar(a, r0, r1);
  });
}

int64_t lfq_forward(const LfqArgs& a) {
  const Isa isa = active_isa();
  return parallel_rows(a.m, a.bits, [&](int64_t r0, int64_t r1) {
    if (isa == Isa::Avx512) return lfq_forward_rows_avx512(a, r0, r1);
    if (isa == Isa::Avx2) return lfq_forward_rows_avx2(a, r0, r1);
    return lfq_forward_rows_scalar(a, r0, r1);
  });
}

void tanh_f32(const float* x, int64_t n, float* out, bool exact) {
  const Isa isa = active_isa();
  parallel_rows(n, 1, [&](int64_t i0, int64_t i1) {
    if (exact) {
      for (int64_t i = i0; i < i1; ++i) out[i] = tanh_f_exact<ScalarOps>(x[i]);
    } else if (isa == Isa::Avx512) tanh_range_avx512(x, i0, i1, out);
    else if (isa == Isa::Avx2) tanh_range_avx2(x, i0, i1, out);
    else tanh_range_scalar(x, i0, i1, out);
  });
}

namespace {
inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
inline int64_t floor_mod(int64_t a, int64_t b) {
  const int64_t r = a % b;
  return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
}  // namespace

void fsq_indices_to_codes(const void* indices, bool indices_int64, int64_t m, int d, const int64_t* levels,
                          const int64_t* basis, float* codes) {
  std::vector<float> hw(d);
  for (int j = 0; j < d; ++j) hw[j] = float(levels[j] / 2);
  parallel_rows(m, d, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t idx =
          indices_int64 ? static_cast<const int64_t*>(indices)[r] : static_cast<const int32_t*>(indices)[r];
      for (int j = 0; j < d; ++j) {
        const int64_t digit = floor_mod(floor_div(idx, basis[j]), levels[j]);
        codes[r * d + j] = float(digit - levels[j] / 2) / hw[j];
      }
    }
  });
}

double fma_peak_gflops(double seconds) {
  switch (active_isa()) {
    case Isa::Avx512: return fma_peak_avx512(seconds);
    case Isa::Avx2: return fma_peak_avx2(seconds);
    default: return 0.0;  // no FMA unit assumed without AVX2
  }
}

float fma_peak_chain_sum(int64_t iters) {
  switch (active_isa()) {
    case Isa::Avx512: return fma_peak_chain_sum_avx512(iters);
    case Isa::Avx2: return fma_peak_chain_sum_avx2(iters);
    default: return 0.0f;
  }
}

}  // namespace vqtok
