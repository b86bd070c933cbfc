// CUDA kernels of vqtok on raw device pointers: torch-free, launched on a caller-given stream.
//
// Every function returns a cudaError_t value as int (0 = success); error_string() turns it into
// text. `stream` is a cudaStream_t passed as void* (torch.cuda.current_stream().cuda_stream), so
// this header needs no CUDA include. All arrays are contiguous, row-major, on the device.
#pragma once

#include <cstdint>

namespace vqtok {
namespace cuda {

const char* error_string(int err);

// Nearest-code candidates by the fp32 score s_k = |c_k|^2 - 2 x.c_k (fp32 FMA, no clamp).
//   x: n*d floats, codebook: k*d floats, code_norms: k floats (|c_k|^2 in fp32).
//   out_best: n floats (smallest score), out_index: n int32 (its lowest index),
//   out_second: n floats (smallest score of every other code: the certificate's "evicted").
//   splits >= 1 partitions the codes (split-K for small n); work: splits*n*3 scratch values in
//   `scratch` (splits*n*(4+4+4) bytes, may be null when splits == 1).
int nearest_l2_top2(const float* x, const float* codebook, const float* code_norms, int64_t n, int64_t k,
                    int64_t d, int splits, void* scratch, float* out_best, int32_t* out_index,
                    float* out_second, void* stream);

// float64 re-scoring of one candidate per row: out_dist = sum((x - c)^2) rounded to fp32,
// out_score = |c|^2 - 2 x.c in float64, out_index64 = index widened to int64.
//   x: n*d floats, codebook: k*d floats, index: n int32 (out of [0, k): dist inf, score NaN).
int rescore_f64(const float* x, const float* codebook, const int32_t* index, int64_t n, int64_t k, int64_t d,
                int64_t* out_index64, float* out_dist, double* out_score, void* stream);

// FSQ forward: z m*d floats; per-column constants half_l, offset, shift, half_width (d floats)
// and basis (d int64); writes codes (m*d floats) and indices (m int32, or int64 if idx_int64).
int fsq_forward(const float* z, int64_t m, int64_t d, const float* half_l, const float* offset,
                const float* shift, const float* half_width, const int64_t* basis, float* codes,
                void* indices, bool idx_int64, void* stream);

// FSQ straight-through backward: grad_z = grad * (1 - tanh^2(z + shift)) * (half_l / half_width).
int fsq_backward(const float* grad, const float* z, int64_t m, int64_t d, const float* half_l,
                 const float* shift, const float* half_width, float* grad_z, void* stream);

// FSQ decode: indices (m int32, or int64 if idx_int64), levels/basis (d int64) -> codes m*d floats.
int fsq_indices_to_codes(const void* indices, bool idx_int64, int64_t m, int64_t d, const int64_t* levels,
                         const int64_t* basis, float* codes, void* stream);

// LFQ forward: z m*bits floats -> codes m*bits floats (+-1), indices (bit b = z_b > 0, LSB first).
int lfq_forward(const float* z, int64_t m, int64_t bits, float* codes, void* indices, bool idx_int64,
                void* stream);

}  // namespace cuda
}  // namespace vqtok
