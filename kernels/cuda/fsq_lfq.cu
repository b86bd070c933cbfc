// FSQ and LFQ on CUDA, bit-identical to vqtok/ops/reference.py evaluated by torch on the GPU:
// tanh is evaluated in double and rounded once (the spec's correctly rounded fp32 tanh), rintf rounds half to even, and
// the arithmetic follows the reference's fp32 order with one rounding per torch op (the __f*_rn
// intrinsics are never contracted into FMAs). Indices are built from the integer levels.
#include <cuda_runtime.h>

#include <cstdint>

#include "vqtok/cuda_kernels.h"

namespace vqtok {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work) { return static_cast<unsigned>((work + kThreads - 1) / kThreads); }

// One thread per row: d is small (the number of FSQ dimensions).
__global__ void fsq_forward_kernel(const float* __restrict__ z, int64_t m, int64_t d, const float* half_l,
                                   const float* offset, const float* shift, const float* half_width,
                                   const int64_t* basis, float* __restrict__ codes, void* indices, bool idx_int64) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= m) return;
  int64_t idx = 0;
  for (int64_t i = 0; i < d; ++i) {
    const float t = __double2float_rn(tanh(static_cast<double>(__fadd_rn(z[r * d + i], shift[i]))));
    const float q = rintf(__fsub_rn(__fmul_rn(t, half_l[i]), offset[i]));
    codes[r * d + i] = __fdiv_rn(q, half_width[i]);
    idx += static_cast<int64_t>(q + half_width[i]) * basis[i];
  }
  if (idx_int64)
    static_cast<int64_t*>(indices)[r] = idx;
  else
    static_cast<int32_t*>(indices)[r] = static_cast<int32_t>(idx);
}

__global__ void fsq_backward_kernel(const float* __restrict__ grad, const float* __restrict__ z, int64_t m,
                                    int64_t d, const float* half_l, const float* shift, const float* half_width,
                                    float* __restrict__ grad_z) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m * d) return;
  const int64_t i = e % d;
  const float t = __double2float_rn(tanh(static_cast<double>(__fadd_rn(z[e], shift[i]))));
  grad_z[e] = __fmul_rn(__fmul_rn(grad[e], __fsub_rn(1.f, __fmul_rn(t, t))), __fdiv_rn(half_l[i], half_width[i]));
}

__global__ void fsq_decode_kernel(const void* indices, bool idx_int64, int64_t m, int64_t d, const int64_t* levels,
                                  const int64_t* basis, float* __restrict__ codes) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m * d) return;
  const int64_t r = e / d, i = e % d;
  const int64_t idx = idx_int64 ? static_cast<const int64_t*>(indices)[r]
                                 : static_cast<int64_t>(static_cast<const int32_t*>(indices)[r]);
  const int64_t digit = (idx / basis[i]) % levels[i];
  const int64_t hw = levels[i] / 2;
  codes[e] = __fdiv_rn(static_cast<float>(digit - hw), static_cast<float>(hw));
}

__global__ void lfq_forward_kernel(const float* __restrict__ z, int64_t m, int64_t bits, float* __restrict__ codes,
                                   void* indices, bool idx_int64) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= m) return;
  int64_t idx = 0;
  for (int64_t b = 0; b < bits; ++b) {
    const bool pos = z[r * bits + b] > 0.f;
    codes[r * bits + b] = pos ? 1.f : -1.f;
    idx |= static_cast<int64_t>(pos) << b;
  }
  if (idx_int64)
    static_cast<int64_t*>(indices)[r] = idx;
  else
    static_cast<int32_t*>(indices)[r] = static_cast<int32_t>(idx);
}

}  // namespace

int fsq_forward(const float* z, int64_t m, int64_t d, const float* half_l, const float* offset, const float* shift,
                const float* half_width, const int64_t* basis, float* codes, void* indices, bool idx_int64,
                void* stream) {
  if (m == 0) return cudaSuccess;
  fsq_forward_kernel<<<blocks_for(m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      z, m, d, half_l, offset, shift, half_width, basis, codes, indices, idx_int64);
  return static_cast<int>(cudaGetLastError());
}

int fsq_backward(const float* grad, const float* z, int64_t m, int64_t d, const float* half_l, const float* shift,
                 const float* half_width, float* grad_z, void* stream) {
  if (m == 0) return cudaSuccess;
  fsq_backward_kernel<<<blocks_for(m * d), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      grad, z, m, d, half_l, shift, half_width, grad_z);
  return static_cast<int>(cudaGetLastError());
}

int fsq_indices_to_codes(const void* indices, bool idx_int64, int64_t m, int64_t d, const int64_t* levels,
                         const int64_t* basis, float* codes, void* stream) {
  if (m == 0) return cudaSuccess;
  fsq_decode_kernel<<<blocks_for(m * d), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      indices, idx_int64, m, d, levels, basis, codes);
  return static_cast<int>(cudaGetLastError());
}

int lfq_forward(const float* z, int64_t m, int64_t bits, float* codes, void* indices, bool idx_int64, void* stream) {
  if (m == 0) return cudaSuccess;
  lfq_forward_kernel<<<blocks_for(m), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(z, m, bits, codes, indices,
                                                                                     idx_int64);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace vqtok
