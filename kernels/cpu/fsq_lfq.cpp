// FSQ/LFQ entry points: split rows across OpenMP threads, run the widest active SIMD level.
// The scalar instantiation lives here (compiled without ISA flags, so it runs on any x86-64).
#pragma GCC optimize("fp-contract=off")
#include <algorithm>
#include <type_traits>

#include <omp.h>

#include "fsq_lfq_simd.h"
#include "vqtok/cpu_features.h"

namespace vqtok {
namespace fsq_lfq_detail {

int64_t fsq_forward_rows_scalar(const FsqArgs& a, int64_t r0, int64_t r1) { return fsq_forward_rows<ScalarOps>(a, r0, r1); }
void fsq_backward_rows_scalar(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_backward_rows<ScalarOps>(a, r0, r1); }
int64_t lfq_forward_rows_scalar(const LfqArgs& a, int64_t r0, int64_t r1) { return lfq_forward_rows<ScalarOps>(a, r0, r1); }
void tanh_range_scalar(const float* x, int64_t i0, int64_t i1, float* out) { tanh_range<ScalarOps>(x, i0, i1, out); }

namespace {

// Runs fn(r0, r1) over [0, m) in chunks of whole 64-row groups (so SIMD blocks never straddle
// chunks): serial below ~32k values, else a few chunks per OpenMP thread (static schedule).
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
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(by_size, int64_t(omp_get_max_threads()) * 4));
  const int64_t chunk = ((m + nchunks - 1) / nchunks + 63) / 64 * 64;
  const int64_t n = (m + chunk - 1) / chunk;
  int64_t sum = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += call(c * chunk, std::min(m, (c + 1) * chunk));
  return sum;
}

}  // namespace
}  // namespace fsq_lfq_detail

using namespace fsq_lfq_detail;

int64_t fsq_forward(const FsqArgs& a) {
  const Isa isa = active_isa();
  return parallel_rows(a.m, a.d, [&](int64_t r0, int64_t r1) {
    if (isa == Isa::Avx512) return fsq_forward_rows_avx512(a, r0, r1);
    if (isa == Isa::Avx2) return fsq_forward_rows_avx2(a, r0, r1);
    return fsq_forward_rows_scalar(a, r0, r1);
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

void tanh_f32(const float* x, int64_t n, float* out) {
  const Isa isa = active_isa();
  parallel_rows(n, 1, [&](int64_t i0, int64_t i1) {
    if (isa == Isa::Avx512) tanh_range_avx512(x, i0, i1, out);
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

}  // namespace vqtok
