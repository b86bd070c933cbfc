// A plain C++ driver of the exact (or fast) nearest-code search, linked against the kernels'
// sources with symbols, so that `perf record` names the kernel's functions (the Python extension
// is stripped and hides them). Built and run by benchmarks/nearest_profile.sh.
//
//   nearest_profile N K D REPS [fast]
// prints the SIMD level that ran, rows re-decided, the median call time and GFLOP/s, and a
// checksum of the indices (the same at every VQTOK_ISA level: the search is exact).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "vqtok/nearest.h"

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N K D REPS [fast]\n", argv[0]);
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
