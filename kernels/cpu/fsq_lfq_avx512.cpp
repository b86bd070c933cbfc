// FSQ/LFQ row kernels and the FMA peak loop compiled for AVX512 (see fsq_lfq_simd.h).
#pragma GCC optimize("fp-contract=off")
#include <time.h>

#include <algorithm>

#include <omp.h>

#include "fsq_lfq_simd.h"

namespace vqtok {
namespace fsq_lfq_detail {

void fsq_forward_rows_avx512(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_forward_rows<Avx512Ops>(a, r0, r1); }
void fsq_backward_rows_avx512(const FsqArgs& a, int64_t r0, int64_t r1) { fsq_backward_rows<Avx512Ops>(a, r0, r1); }
void lfq_forward_rows_avx512(const LfqArgs& a, int64_t r0, int64_t r1) { lfq_forward_rows<Avx512Ops>(a, r0, r1); }
void tanh_range_avx512(const float* x, int64_t i0, int64_t i1, float* out) { tanh_range<Avx512Ops>(x, i0, i1, out); }

static double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Sum over the OpenMP threads of each thread's FMA rate, timed on its own CPU clock, so time the
// thread spends preempted by other processes does not count: kChains independent FMA chains
// (more than latency x ports, so both FMA units stay busy) for `iters` rounds per thread.
static double fma_rate(int64_t iters, double* min_cpu_seconds) {
  constexpr int kChains = 12;
  using O = Avx512Ops;
  double rate = 0.0, min_cpu = 1e30;
#pragma omp parallel reduction(+ : rate) reduction(min : min_cpu)
  {
    // volatile reads after t0 and a volatile write before t1 pin the loop between the clock reads
    volatile float seed = 1.0f;
    const double t0 = thread_cpu_seconds();
    const float s0 = seed;
    O::F acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = O::set1(s0 + 0.01f * c);
    const O::F mul = O::set1(0.999999f), add = O::set1(1e-6f);
    for (int64_t it = 0; it < iters; ++it)
      for (int c = 0; c < kChains; ++c) acc[c] = O::fmadd(acc[c], mul, add);
    for (int c = 1; c < kChains; ++c) acc[0] = O::add(acc[0], acc[c]);
    float lanes[O::W];
    O::store(lanes, acc[0]);
    seed = lanes[0];
    const double t = thread_cpu_seconds() - t0;
    rate += 2.0 * O::W * kChains * double(iters) / std::max(t, 1e-9) * 1e-9;
    min_cpu = std::min(min_cpu, t);
  }
  *min_cpu_seconds = min_cpu;
  return rate;
}

double fma_peak_avx512(double seconds) {
  double cpu = 0.0;
  int64_t iters = 1 << 12;
  fma_rate(iters, &cpu);  // start the thread pool
  while (fma_rate(iters, &cpu), cpu < 0.01) iters *= 4;
  iters = int64_t(double(iters) * seconds / 3 / cpu) + 1;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) best = std::max(best, fma_rate(iters, &cpu));  // a peak is a best case
  return best;
}

}  // namespace fsq_lfq_detail
}  // namespace vqtok
