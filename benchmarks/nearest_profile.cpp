// A plain C++ driver of the exact (or fast) nearest-code search, linked against the kernels'
// sources with symbols, so that `perf record` names the kernel's functions (the Python extension
// is stripped and hides them). Built and run by benchmarks/nearest_profile.sh.
//
//   nearest_profile N K D REPS [fast]
// prints the SIMD level that ran, rows re-decided, the median call time and GFLOP/s, and a
// checksum of the indices (the same at every VQTOK_ISA level: the search is exact).
//
//   nearest_profile ceiling D REPS
// the ceiling of the AVX-512 large-d micro-tile's instruction mix: its loop alone (12 rows x 2
// zmm, 24 accumulators, 12 broadcasts and 2 code loads per feature) over one tile's rows and
// codes of D features again and again, no epilogue, on every OpenMP thread, timed as the search
// is (wall clock, median of REPS); then a loop of nothing but register FMAs (as many independent
// chains as the micro-tile has accumulators, no loads) timed the same way; and the FMA peak as
// `vqtok bench` measures it (independent FMA chains, each thread's best rate on its own CPU clock).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#include "vqtok/fsq_lfq.h"
#include "vqtok/nearest.h"

namespace {

// The large-d micro-tile's shape: MR rows x NRV vectors of W codes.
constexpr int MR = 12, NRV = 2, W = 16;

// `passes` runs of the micro-tile's feature loop over d features: xp holds the rows
// feature-major (xp[j * MR + r]), cp the codes ([d][NRV * W]). Returns a sum of the
// accumulators so that nothing is optimised away.
__attribute__((target("avx512f"), noinline)) float mix_avx512(const float* xp, const float* cp, int64_t d,
                                                               int64_t passes) {
  __m512 acc[MR][NRV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < passes; ++p)
#pragma GCC unroll 4
    for (int64_t j = 0; j < d; ++j) {
      __m512 cv[NRV];
#pragma GCC unroll 2
      for (int v = 0; v < NRV; ++v) cv[v] = _mm512_loadu_ps(cp + j * NRV * W + v * W);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 xb = _mm512_set1_ps(xp[j * MR + r]);
#pragma GCC unroll 2
        for (int v = 0; v < NRV; ++v) acc[r][v] = _mm512_fmadd_ps(xb, cv[v], acc[r][v]);
      }
    }
  __m512 t = _mm512_setzero_ps();
  for (auto& row : acc)
    for (auto& a : row) t = _mm512_add_ps(t, a);
  return _mm512_reduce_add_ps(t);
}

// `iters` rounds of MR * NRV independent FMA chains held in registers: the wall-clock rate of the
// FMA units alone, with the micro-tile's accumulator count and none of its loads.
__attribute__((target("avx512f"), noinline)) float fma_only_avx512(float seed, int64_t iters) {
  __m512 acc[MR * NRV];
  for (int i = 0; i < MR * NRV; ++i) acc[i] = _mm512_set1_ps(seed + 0.001f * i);
  const __m512 mul = _mm512_set1_ps(0.999999f), add = _mm512_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 24
    for (auto& a : acc) a = _mm512_fmadd_ps(a, mul, add);
  __m512 t = _mm512_setzero_ps();
  for (auto& a : acc) t = _mm512_add_ps(t, a);
  return _mm512_reduce_add_ps(t);
}

// GFLOP/s of `flops` per thread in one parallel region running `body(thread)`: wall clock,
// median of `reps` rounds after one warm-up round (as the search is timed).
template <class Body>
double wall_gflops(double flops_per_thread, int reps, Body body) {
  std::vector<double> times;
  volatile float sink = 0.0f;
  for (int r = 0; r < reps + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel
    {
      const float s = body(omp_get_thread_num());
#pragma omp atomic
      sink += s;
    }
    if (r > 0) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return flops_per_thread * omp_get_max_threads() / times[times.size() / 2] * 1e-9;
}

int ceiling(int64_t d, int reps) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::fprintf(stderr, "ceiling needs AVX-512 (the 12 x 2 zmm micro-tile)\n");
    return 2;
  }
  const int64_t fma_per_feature = int64_t{MR} * NRV * W;  // one FMA per row and code lane
  // 2^29 flops a round per thread
  const int64_t passes = std::max<int64_t>(1, (int64_t{1} << 28) / (fma_per_feature * d));
  const int threads = omp_get_max_threads();
  const int64_t per_thread = d * (MR + NRV * W);  // one tile's rows, then its codes
  std::vector<float> buf(static_cast<size_t>(threads * per_thread), 0.5f);
  const double flops = 2.0 * fma_per_feature * d * passes;  // per thread and round
  const double mix = wall_gflops(flops, reps, [&](int t) {
    const float* xp = buf.data() + t * per_thread;
    return mix_avx512(xp, xp + d * MR, d, passes);
  });
  const int64_t iters = d * passes;  // the same FMAs per thread, from registers only
  const double fma_only = wall_gflops(flops, reps, [&](int t) { return fma_only_avx512(1.0f + t, iters); });
  const double peak = vqtok::fma_peak_gflops(0.3);
  std::printf(
      "isa avx512 threads %d d %lld mix_gflops %.1f fma_only_gflops %.1f fma_peak_gflops %.1f mix_of_fma_only %.3f "
      "mix_of_peak %.3f fma_only_of_peak %.3f\n",
      threads, static_cast<long long>(d), mix, fma_only, peak, mix / fma_only, mix / peak, fma_only / peak);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "ceiling") {
    const int64_t d = std::atol(argv[2]);
    const int reps = std::atoi(argv[3]);
    if (d < 1 || reps < 1) {
      std::fprintf(stderr, "D and REPS must be positive\n");
      return 2;
    }
    return ceiling(d, reps);
  }
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N K D REPS [fast] | %s ceiling D REPS\n", argv[0], argv[0]);
    return 2;
  }
  const int64_t n = std::atol(argv[1]), k = std::atol(argv[2]), d = std::atol(argv[3]);
  const int reps = std::atoi(argv[4]);
  const bool fast = argc > 5;
  if (n < 1 || k < 1 || d < 1 || reps < 1) {
    std::fprintf(stderr, "N, K, D and REPS must be positive\n");
    return 2;
  }
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(n * d), c(k * d);
  for (auto& v : x) v = normal(gen);
  for (auto& v : c) v = normal(gen);
  std::vector<int64_t> idx(n);
  std::vector<float> dist(n);
  std::vector<double> times;
  vqtok::NearestStats st;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    st = vqtok::nearest_code_l2(x.data(), c.data(), n, k, d, vqtok::DType::F32, fast, idx.data(), dist.data());
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  long long sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += idx[i] * (i % 7 + 1);
  std::printf("isa %s redecided %lld median_ms %.3f gflops %.1f checksum %lld\n", st.isa,
              static_cast<long long>(st.exact_rows), med * 1e3, 2.0 * n * k * d / med * 1e-9, sum);
  return 0;
}
