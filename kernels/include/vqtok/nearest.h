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
// one runs (nearest_fast_runs()): bf16 scores (AMX tiles or AVX512-BF16), every code inside the bf16
// error bound of the best kept as a candidate and decided in the float64 direct form; rows with
// more than 64 candidates or values past the bound's range run the exact search. The answer is
// identical to the exact mode's. Elsewhere `fast` runs the exact path.
// Extra memory: one packed codebook panel (~1 MiB), per-thread row buffers (~64 KiB), 4 bytes
// per code (norms) and 20 bytes per row; past d = 128 with more than one panel, also the rows
// packed per super-block (~8 MiB, a recycled HostBuffer). The fast mode instead keeps at most
// ~8 MiB of row state (rows are processed in super-blocks) plus 8 bytes per feature. Runs on all
// OpenMP threads (one thread below ~1 ms of work); the SIMD level is chosen per call by
// active_isa() (env VQTOK_ISA may lower it).
// The bf16 scoring kernel `fast` uses here: "amx-bf16" where active_isa() is AVX-512
// (VQTOK_ISA may lower it) and the CPU has AMX-BF16 that the OS lets this process use, else
// "avx512-bf16" where the CPU has AVX512-BF16, else "" (the exact path). The environment variable
// VQTOK_NEAREST_FAST_KERNEL ("amx-bf16" or "avx512-bf16", read at each call) limits the choice to
// that kernel (tests reach the AVX512-BF16 kernel on AMX CPUs with it).
const char* nearest_fast_kernel();
// True when the CPU (and OS) can run the fast mode's kernel `name` ("amx-bf16", "avx512-bf16"),
// whatever VQTOK_ISA and VQTOK_NEAREST_FAST_KERNEL say.
bool nearest_fast_kernel_usable(const char* name);
// True when nearest_fast_kernel() is not empty.
bool nearest_fast_available();
// True when nearest_code_l2(fast = true) takes the bf16 path for k codes of d features: where a
// kernel is available and the search is large enough to gain (smaller searches run the exact
// fp32 kernel, which is as fast there), or always when the environment variable
// VQTOK_NEAREST_FAST is "always" (read at each call; tests use it to reach the bf16 path with
// small shapes).
bool nearest_fast_runs(int64_t k, int64_t d);

NearestStats nearest_code_l2(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                             DType dtype, bool fast, int64_t* out_idx, float* out_dist);

// How the exact search at the active SIMD level splits n rows x k codes of d features: rows per
// micro-tile, codes per packed chunk and per panel (panels are searched in ascending order), rows
// per block (the unit of OpenMP work) and, when rows are packed once per super-block (d > 128
// with several panels), rows per super-block (else 0).
struct NearestLayout {
  int64_t rows_per_tile = 0, codes_per_chunk = 0, codes_per_panel = 0, rows_per_block = 0;
  int64_t rows_per_super_block = 0;
};
NearestLayout nearest_layout(int64_t n, int64_t k, int64_t d);

}  // namespace vqtok
