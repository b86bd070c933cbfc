// Exact-path nearest-code search on CUDA cores: fp32 FMA, tiled through shared memory.
//
// A block of 16x16 threads owns 64 rows of x and streams the codebook in 64-code tiles, the
// feature dim in 16-wide chunks. Thread (tx, ty) accumulates rows ty*4+i against codes
// tile + tx + 16*j (i, j < 4) and keeps, per row, the best score, its index and the second-best
// score over the codes it saw, in ascending index order with strict '<' (ties: lowest index).
// The 16 lanes sharing a row merge by warp shuffles. Scores are s = |c|^2 - 2 x.c, never clamped;
// the caller (vqtok/ops/_native.py) certifies the gap and re-decides close rows exactly.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "vqtok/cuda_kernels.h"

namespace vqtok {
namespace cuda {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileCodes = 64;
constexpr int kChunkD = 16;
constexpr int kThreads = 256;

struct Top2 {
  float best;
  int32_t index;
  float second;
};

__device__ __forceinline__ void push(Top2& t, float s, int32_t k) {
  if (s < t.best) {
    t.second = t.best;
    t.best = s;
    t.index = k;
  } else if (s < t.second) {
    t.second = s;
  }
}

// Merge two partial results; on equal best scores the lower index wins.
__device__ __forceinline__ Top2 merge(const Top2& a, const Top2& b) {
  const bool b_wins = b.best < a.best || (b.best == a.best && b.index < a.index);
  Top2 r;
  if (b_wins) {
    r.best = b.best;
    r.index = b.index;
    r.second = fminf(b.second, a.best);
  } else {
    r.best = a.best;
    r.index = a.index;
    r.second = fminf(a.second, b.best);
  }
  return r;
}

__global__ void __launch_bounds__(kThreads) top2_kernel(const float* __restrict__ x, const float* __restrict__ c,
                                                        const float* __restrict__ cn, int64_t n, int64_t k,
                                                        int64_t d, int64_t k_per_split, float* __restrict__ out_best,
                                                        int32_t* __restrict__ out_index,
                                                        float* __restrict__ out_second) {
  __shared__ float xs[kChunkD][kTileRows + 1];
  __shared__ float cs[kChunkD][kTileCodes + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t k_lo = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_hi = min(k, k_lo + k_per_split);

  Top2 top[4];
  for (int i = 0; i < 4; ++i) top[i] = {FLT_MAX, INT32_MAX, FLT_MAX};
  bool seen_inf = false;  // scores of +inf (overflow) never enter; the certificate rejects such rows

  for (int64_t k0 = k_lo; k0 < k_hi; k0 += kTileCodes) {
    float acc[4][4] = {};
    for (int64_t d0 = 0; d0 < d; d0 += kChunkD) {
      for (int e = threadIdx.x; e < kTileRows * kChunkD; e += kThreads) {
        const int r = e / kChunkD, dd = e % kChunkD;
        const int64_t gr = row0 + r, gd = d0 + dd;
        xs[dd][r] = (gr < n && gd < d) ? x[gr * d + gd] : 0.f;
        const int64_t gk = k0 + r;
        cs[dd][r] = (gk < k_hi && gd < d) ? c[gk * d + gd] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < kChunkD; ++dd) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[dd][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = cs[dd][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t kk = k0 + tx + 16 * j;
      if (kk >= k_hi) break;
      const float norm = cn[kk];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float s = norm - 2.f * acc[i][j];
        seen_inf |= !(s < FLT_MAX);
        push(top[i], s, static_cast<int32_t>(kk));
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    for (int off = 8; off > 0; off >>= 1) {
      Top2 o;
      o.best = __shfl_xor_sync(0xffffffffu, top[i].best, off);
      o.index = __shfl_xor_sync(0xffffffffu, top[i].index, off);
      o.second = __shfl_xor_sync(0xffffffffu, top[i].second, off);
      top[i] = merge(top[i], o);
    }
  }
  const bool any_inf = __any_sync(0xffffffffu, seen_inf);
  if (tx == 0) {
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row0 + ty * 4 + i;
      if (r >= n) continue;
      const int64_t o = static_cast<int64_t>(blockIdx.y) * n + r;
      out_best[o] = top[i].best;
      out_index[o] = top[i].index;
      // FLT_MAX stands for "no other code"; an overflowed score makes the row uncertifiable
      out_second[o] = any_inf ? -INFINITY : (top[i].second == FLT_MAX ? INFINITY : top[i].second);
    }
  }
}

// Second (value, index) reduction of split-K: merge the splits of each row in ascending order.
__global__ void merge_splits_kernel(const float* best, const int32_t* index, const float* second, int64_t n,
                                    int splits, float* out_best, int32_t* out_index, float* out_second) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  Top2 t = {best[r], index[r], second[r]};
  for (int s = 1; s < splits; ++s) {
    const int64_t o = static_cast<int64_t>(s) * n + r;
    t = merge(t, Top2{best[o], index[o], second[o]});
  }
  out_best[r] = t.best;
  out_index[r] = t.index;
  out_second[r] = t.second;
}

// One warp per row: float64 direct-form distance, |c|^2 and x.c of the chosen code.
__global__ void rescore_kernel(const float* __restrict__ x, const float* __restrict__ c,
                               const int32_t* __restrict__ index, int64_t n, int64_t k, int64_t d,
                               int64_t* out_index64, float* out_dist, double* out_score) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= n) return;
  const int64_t kk = index[r];
  if (kk < 0 || kk >= k) {  // no finite score was seen: leave the row to the exact fallback
    if (lane == 0) {
      out_index64[r] = 0;
      out_dist[r] = INFINITY;
      out_score[r] = NAN;
    }
    return;
  }
  double dist = 0, norm = 0, dot = 0;
  for (int64_t i = lane; i < d; i += 32) {
    const double xv = x[r * d + i], cv = c[kk * d + i];
    const double diff = xv - cv;
    dist += diff * diff;
    norm += cv * cv;
    dot += xv * cv;
  }
  for (int off = 16; off > 0; off >>= 1) {
    dist += __shfl_xor_sync(0xffffffffu, dist, off);
    norm += __shfl_xor_sync(0xffffffffu, norm, off);
    dot += __shfl_xor_sync(0xffffffffu, dot, off);
  }
  if (lane == 0) {
    out_index64[r] = kk;
    out_dist[r] = static_cast<float>(dist);
    out_score[r] = norm - 2.0 * dot;
  }
}

}  // namespace

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

int nearest_l2_top2(const float* x, const float* codebook, const float* code_norms, int64_t n, int64_t k,
                    int64_t d, int splits, void* scratch, float* out_best, int32_t* out_index,
                    float* out_second, void* stream) {
  if (n == 0) return cudaSuccess;
  if (splits < 1 || (splits > 1 && scratch == nullptr)) return cudaErrorInvalidValue;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t per = ((k + splits - 1) / splits + kTileCodes - 1) / kTileCodes * kTileCodes;
  const int used = static_cast<int>((k + per - 1) / per);
  const dim3 grid(static_cast<unsigned>((n + kTileRows - 1) / kTileRows), static_cast<unsigned>(used));
  if (used == 1) {
    top2_kernel<<<grid, kThreads, 0, st>>>(x, codebook, code_norms, n, k, d, per, out_best, out_index, out_second);
    return static_cast<int>(cudaGetLastError());
  }
  float* pb = static_cast<float*>(scratch);
  int32_t* pi = reinterpret_cast<int32_t*>(pb + static_cast<int64_t>(used) * n);
  float* ps = reinterpret_cast<float*>(pi + static_cast<int64_t>(used) * n);
  top2_kernel<<<grid, kThreads, 0, st>>>(x, codebook, code_norms, n, k, d, per, pb, pi, ps);
  merge_splits_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, st>>>(pb, pi, ps, n, used, out_best,
                                                                             out_index, out_second);
  return static_cast<int>(cudaGetLastError());
}

int rescore_f64(const float* x, const float* codebook, const int32_t* index, int64_t n, int64_t k, int64_t d,
                int64_t* out_index64, float* out_dist, double* out_score, void* stream) {
  if (n == 0) return cudaSuccess;
  const int rows_per_block = 8;
  rescore_kernel<<<static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block), 32 * rows_per_block, 0,
                   static_cast<cudaStream_t>(stream)>>>(x, codebook, index, n, k, d, out_index64, out_dist, out_score);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace vqtok
