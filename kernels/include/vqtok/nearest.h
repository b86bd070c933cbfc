// Exact nearest-code search (squared L2) on the CPU: torch-free, raw pointers.
//
// Ranks codes by |c|^2 - 2 x.c in fp32 (no clamp) with a register-blocked SIMD kernel, keeps the
// best and second-best score per row, and re-decides in the direct form sum((x - c)^2) in double
// every row whose gap is inside the fp32 rounding-error bound. The answer is therefore the lowest
// index minimising the float64 direct-form distance, exactly like ops/reference.py.
#pragma once

#include <cstdint>

namespace vqtok {

// Element type of x and the codebook (both the same).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct NearestStats {
  int64_t exact_rows = 0;  // rows re-decided in the direct form (near ties, huge values)
  const char* isa = "";    // SIMD level that ran (avx512 | avx2 | scalar)
};

// x:        n*d elements of `dtype`, row-major, contiguous.
// codebook: k*d elements of `dtype`, row-major, contiguous.
// out_idx:  n int64, the chosen code per row (lowest index on exact ties).
// out_dist: n float32, direct-form squared distance to the chosen code (double, rounded).
// Sizes: n >= 0, 1 <= k < 2^31, d >= 1. `fast` asks for the certified low-precision path where
// one exists (the answer is identical; today both modes run the fp32 path).
// Extra memory: one packed codebook panel (~1 MiB), per-thread row buffers (~64 KiB), 4 bytes
// per code (norms) and 20 bytes per row. Runs on all OpenMP threads (one thread below ~1 ms of
// work); the SIMD level is chosen per call by active_isa() (env VQTOK_ISA may lower it).
NearestStats nearest_code_l2(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                             DType dtype, bool fast, int64_t* out_idx, float* out_dist);

}  // namespace vqtok
