// FSQ and LFQ kernels on raw pointers (torch-free). Semantics: tokenizers/vqtok/ops/reference.py
// in the same fp32 operation order, for float32, float16 and bfloat16 inputs, with tanh evaluated
// in double and rounded once to fp32 (torch's fp32 CPU tanh, MKL, is within one ulp of it; see
// cpu/fsq_lfq_simd.h for what that means for codes at very large L).
//
// FSQ (Mentzer et al. 2023), per column j with L_j levels and host-side constants computed in
// double and rounded to float exactly as reference.fsq_constants does:
//   t = tanh(z + shift_j); bound = t * half_l_j - offset_j; q = rint(bound)  (half to even)
//   code = q / half_width_j; digit = (int64)(q + half_width_j); index = sum_j digit_j * basis_j
//   grad_z = grad_code * (1 - t * t) * grad_scale_j, grad_scale_j = half_l_j / half_width_j (float)
// The forward decides q by per-column thresholds on z when every column has at most 31 code steps
// (q is non-decreasing in z; the thresholds are found with the formula above, so the bits are the
// same), and evaluates the formula directly otherwise.
// LFQ (Yu et al. 2023): code_b = z_b > 0 ? +1 : -1; bit b of the index is z_b > 0 (LSB first).
//
// All kernels run on OpenMP threads with the SIMD level of vqtok::active_isa() (VQTOK_ISA may
// lower it); every level gives the same bits.
#pragma once

#include <cstdint>

namespace vqtok {

// Element type of z (codes 0, 1, 2 match vqtok::DType of nearest.h).
enum class InputType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct FsqArgs {
  const void* z = nullptr;          // m * d values of dtype `dtype`, row-major
  InputType dtype = InputType::F32;
  int64_t m = 0;                    // rows
  int d = 0;                        // columns (number of levels)
  const float* half_l = nullptr;    // d floats each: per-column constants (see above)
  const float* offset = nullptr;
  const float* shift = nullptr;
  const float* half_width = nullptr;
  const float* grad_scale = nullptr;
  const int64_t* basis = nullptr;   // d int64: [1, L0, L0*L1, ...]
  // forward outputs
  float* codes = nullptr;           // m * d floats
  void* indices = nullptr;          // m int32 (indices_int64 false) or int64
  bool indices_int64 = false;
  // backward
  const float* grad_codes = nullptr;  // m * d floats
  float* grad_z = nullptr;            // m * d floats
};

struct LfqArgs {
  const void* z = nullptr;  // m * bits values of dtype `dtype`
  InputType dtype = InputType::F32;
  int64_t m = 0;
  int bits = 0;             // 1..62
  float* codes = nullptr;   // m * bits floats, +-1
  void* indices = nullptr;  // m int32 (bits <= 30) or int64
  bool indices_int64 = false;
};

// The forward kernels return how many values of z are NaN or +-Inf (0 for valid input; the
// outputs of such rows are meaningless), so callers need no separate pass over z to check it.
int64_t fsq_forward(const FsqArgs& a);
void fsq_backward(const FsqArgs& a);
// indices: m values, int32 (indices_int64 false) or int64; levels, half_width, basis: d each.
// codes: m * d floats, codes = (floor_mod(floor_div(idx, basis_j), L_j) - hw_j) / hw_j.
void fsq_indices_to_codes(const void* indices, bool indices_int64, int64_t m, int d, const int64_t* levels,
                          const int64_t* basis, float* codes);
int64_t lfq_forward(const LfqArgs& a);

// fp32 tanh of n values as the FSQ kernels compute it (exposed for tests): tanh evaluated in
// double and rounded once (fsq_lfq_simd.h). exact = false: the fast path of the active SIMD level
// with its rounding test; exact = true: the plain double evaluation, value by value (same bits).
void tanh_f32(const float* x, int64_t n, float* out, bool exact = false);

// Measured peak fp32 FMA throughput of this machine in GFLOP/s: independent FMA chains of the
// widest active SIMD level on every OpenMP thread for about `seconds`.
double fma_peak_gflops(double seconds);

// The chains of that loop after `iters` rounds (one timed round, as fma_peak_gflops times them),
// summed over chains, averaged over lanes: each chain c starts at 1 + 0.01 c and steps
// x <- fma(x, 0.999999, 1e-6), so a check that every chain the peak counts is computed.
// 0 where the active level has no FMA loop (scalar).
float fma_peak_chain_sum(int64_t iters);

}  // namespace vqtok
