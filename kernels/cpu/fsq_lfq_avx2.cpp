// FSQ/LFQ row kernels and the FMA peak loop compiled for AVX2 (see fsq_lfq_simd.h).
#pragma GCC optimize("fp-contract=off")
#include <chrono>

#include <omp.h>

#include "fsq_lfq_simd.h"

namespace vqtok {
namespace fsq_lfq_detail {

void fsq_forward_rows_avx2(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_forward_rows<Avx2Ops>(a, r0, r1); }
void fsq_backward_rows_avx2(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_backward_rows<Avx2Ops>(a, r0, r1); }
void lfq_forward_rows_avx2(const LfqArgs& a, int64_t r0, int64_t r1) { lfq_forward_rows<Avx2Ops>(a, r0, r1); }
void tanh_range_avx2(const float* x, int64_t i0, int64_t i1, float* out) { tanh_range<Avx2Ops>(x, i0, i1, out); }

// Seconds for `iters` rounds of kChains independent FMA chains on every thread; returns the
// number of threads through *threads.
static double fma_loop(int64_t iters, int* threads) {
  constexpr int kChains = 12;  // > latency (4) x ports (2): keeps both FMA units busy
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0.0f;
#pragma omp parallel reduction(+ : sink)
  {
    using O = Avx2Ops;
    O::F acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = O::set1(1.0f + 0.01f * c);
    const O::F mul = O::set1(0.999999f), add = O::set1(1e-6f);
    for (int64_t it = 0; it < iters; ++it)
      for (int c = 0; c < kChains; ++c) acc[c] = O::fmadd(acc[c], mul, add);
    float lanes[O::W];
    for (int c = 1; c < kChains; ++c) acc[0] = O::add(acc[0], acc[c]);
    O::store(lanes, acc[0]);
    sink += lanes[0];
#pragma omp single
    *threads = omp_get_num_threads();
  }
  volatile float keep = sink;
  (void)keep;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double fma_peak_avx2(double seconds) {
  int threads = 1;
  int64_t iters = 1 << 12;
  double t = fma_loop(iters, &threads);
  while (t < 0.02) t = fma_loop(iters *= 4, &threads);
  iters = int64_t(double(iters) * seconds / t) + 1;
  t = fma_loop(iters, &threads);
  return 2.0 * Avx2Ops::W * 12 * double(iters) * threads / t * 1e-9;
}

}  // namespace fsq_lfq_detail
}  // namespace vqtok
