// Driver of the exact nearest-code search: codebook norms, panel packing, OpenMP over query
// blocks, lane-state reduction, the fp32 error-bound certificate and the direct-form re-decision.
//
// Certificate. The kernels compute s_k = fl(|c_k|^2 + sum_j (-2 x_j) c_kj) in fp32 (any order,
// FMA or not). With u = 2^-24 and g = (2d+2)u / (1 - (2d+2)u),
//   |s_k - t_k| <= E = g * (max_k |c_k|^2 + 2 * min(|x|_1 max_kj |c_kj|, |x|_2 max_k |c_k|_2))
// (plus a few subnormal quanta), where t_k is the exact |c_k|^2 - 2 x.c_k. If the best and
// second-best computed scores differ by more than 2E the best is the unique exact winner; other
// rows are re-decided by a direct-form scan sum((x - c)^2) in double (ties -> lowest index).
//
// Sharper per-row test (refined_certificate), for rows the 2E test leaves. A code's own error is
// E_k <= g (|c_k|^2 + 2 |x| |c_k|), and |c_k| <= |x| + |x - c_k| = |x| + sqrt(t_k + |x|^2) with
// t_k <= s_k + E: so E_k <= F(s_k), a bound that grows with the computed score alone. Where
// s - F(s) does not decrease past the second-best score s2 (checked per row), every rival k
// has t_k >= s_k - F(s_k) >= s2 - F(s2), and s2 - F(s2) > s1 + F(s1) proves the winner. On
// trained codebooks (codes dense around the latents, a few far codes setting max |c_k|) this
// leaves a small fraction of the rows the 2E test sends to re-decision.
// Multiply-adds are never fused implicitly here (the direct-form sums must round the same way in
// the baseline and the AVX-512 functions); explicit fma intrinsics are unaffected.
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "nearest_fast.h"
#include "nearest_kernels.h"
#include "vqtok/cpu_features.h"
#include "vqtok/host_buffer.h"
#include "vqtok/nearest.h"

namespace vqtok {
namespace nearest_detail {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -f : f;
  }
  if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts n consecutive elements starting at element `off` of a dtype array to float.
void to_float(const void* p, DType t, int64_t off, int64_t n, float* out) {
  if (t == DType::F32) {
    std::memcpy(out, static_cast<const float*>(p) + off, static_cast<size_t>(n) * 4);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p) + off;
    if (t == DType::F16)
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
    else
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(h[i]);
  }
}

const BlockKernel& pick_kernel(int64_t d) {
  switch (active_isa()) {
    case Isa::Avx512: return avx512_kernel(d);
    case Isa::Avx2: return avx2_kernel(d);
    default: return scalar_kernel(d);
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Grows v to hold `count` elements from a 64-byte boundary and returns that boundary: a zmm load
// (or an AMX tile row) that straddles two cache lines costs two L1 accesses, and malloc's blocks
// start 16 bytes past a line.
template <class T>
T* grow_aligned64(std::vector<T>& v, int64_t count) {
  const size_t need = static_cast<size_t>(count) + 64 / sizeof(T);
  if (v.size() < need) v.resize(need);
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t{63});
}

// Rows [first, first + count) of a dtype array as fp32: a pointer into the array itself for
// float32, else converted into tmp (count * d floats). No rows: tmp, never a pointer past the array.
inline const float* rows_f32(const void* p, DType t, int64_t first, int64_t count, int64_t d, float* tmp) {
  if (count <= 0) return tmp;
  if (t == DType::F32) return static_cast<const float*>(p) + first * d;
  to_float(p, t, first * d, count * d, tmp);
  return tmp;
}

// Row i of a dtype array as fp32 (rows_f32 of one row).
inline const float* row_f32(const void* p, DType t, int64_t i, int64_t d, float* tmp) {
  return rows_f32(p, t, i, 1, d, tmp);
}

struct CodebookStats {
  double norm2_max = 0, abs_max = 0, norm_max = 0;
};

// |c_k|^2 (double, rounded to fp32) and the maxima the certificate needs. The sum runs in four
// independent chains (j mod 4), so a code costs the adds' throughput rather than d times their
// latency; any order of a d-term double sum rounds to the same fp32 norm but in rare near-halfway
// cases, and the certificate bounds the scores' rounding whatever the norm's last bit.
// hashes (optional, k entries): a 64-bit hash of each code's fp32 bits, in the same pass (four
// multiply-xor chains like the sums), for mark_duplicate_codes.
template <bool kHash>
CodebookStats codebook_norms_impl(const void* cb, DType t, int64_t k, int64_t d, float* norms, uint64_t* hashes) {
  double n2max = 0, amax = 0;
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
#pragma omp parallel if (k * d > (int64_t{1} << 16)) reduction(max : n2max, amax)
  {
    std::vector<float> tmp(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < k; ++i) {
      const float* row = row_f32(cb, t, i, d, tmp.data());
      double s[4] = {0, 0, 0, 0};
      float mq[4] = {0, 0, 0, 0};
      uint64_t h[4] = {1, 2, 3, 4};
      int64_t j = 0;
      for (; j + 4 <= d; j += 4)
        for (int q = 0; q < 4; ++q) {
          s[q] += static_cast<double>(row[j + q]) * row[j + q];
          mq[q] = std::max(mq[q], std::fabs(row[j + q]));
          if constexpr (kHash) {
            uint32_t bits;
            std::memcpy(&bits, row + j + q, 4);
            h[q] = (h[q] ^ bits) * kMul;
          }
        }
      double tail = 0;
      float m = std::max(std::max(mq[0], mq[1]), std::max(mq[2], mq[3]));
      for (; j < d; ++j) {
        tail += static_cast<double>(row[j]) * row[j];
        m = std::max(m, std::fabs(row[j]));
        if constexpr (kHash) {
          uint32_t bits;
          std::memcpy(&bits, row + j, 4);
          h[0] = (h[0] ^ bits) * kMul;
        }
      }
      const double n2 = ((s[0] + s[1]) + (s[2] + s[3])) + tail;
      norms[i] = static_cast<float>(n2);
      n2max = std::max(n2max, n2);
      amax = std::max(amax, static_cast<double>(m));
      if constexpr (kHash) {
        const uint64_t x = h[0] ^ (h[1] * 0xC2B2AE3D27D4EB4Full) ^ (h[2] >> 29) ^ ((h[3] << 31) | (h[3] >> 33));
        hashes[i] = (x ^ (x >> 32)) * kMul;
      }
    }
  }
  return {n2max, amax, std::sqrt(n2max)};
}

CodebookStats codebook_norms(const void* cb, DType t, int64_t k, int64_t d, float* norms, uint64_t* hashes = nullptr) {
  return hashes != nullptr ? codebook_norms_impl<true>(cb, t, k, d, norms, hashes)
                           : codebook_norms_impl<false>(cb, t, k, d, norms, nullptr);
}

// A search that must re-decide at least this many rows first checks the codebook for exact
// duplicate codes: a near-tie test cannot tell a copy from a rival, so every row won by a
// duplicated code is re-decided, a pass over all codes each (a codebook with every code twice took
// 6x as long; 1% zero codes at d = 256, the nearest code of every row there, 2.5x). With
// duplicates, those rows are searched again with the copies set aside (mark_duplicate_codes).
constexpr int64_t kDedupMinRows = 64;

// Codes whose bytes equal a lower-indexed code's get norm +inf: their scores are +inf, so they
// never win or shadow their representative, the lowest index of the group, which is the exact
// answer for any row the group wins (equal codes, equal distances, ties to the lowest index).
// hashes: codebook_norms' per-code hashes. Returns the number of codes marked.
int64_t mark_duplicate_codes(const void* cb, DType t, int64_t k, int64_t d, const uint64_t* hashes, float* norms) {
  if (k < 2) return 0;
  const int64_t es = t == DType::F32 ? 4 : 2;
  const auto* bytes = static_cast<const uint8_t*>(cb);
  int64_t cap = 1;
  while (cap < 2 * k) cap <<= 1;
  std::vector<int32_t> table(static_cast<size_t>(cap), -1);  // open addressing, linear probing
  int64_t marked = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t p = static_cast<int64_t>(hashes[i] & static_cast<uint64_t>(cap - 1));; p = (p + 1) & (cap - 1)) {
      const int32_t e = table[p];
      if (e < 0) {
        table[p] = static_cast<int32_t>(i);
        break;
      }
      if (hashes[e] == hashes[i] && std::memcmp(bytes + e * d * es, bytes + i * d * es, d * es) == 0) {
        norms[i] = kInf;
        ++marked;
        break;
      }
    }
  }
  return marked;
}

// Every code's norm, with the copies of lower-indexed codes at +inf (mark_duplicate_codes), and
// the codebook's statistics (the copies count in them as the codes they equal).
struct CodeNorms {
  CodebookStats cs;
  std::vector<float> norms;
  int64_t copies = 0;
};

CodeNorms deduped_norms(const void* cb, DType t, int64_t k, int64_t d) {
  CodeNorms r;
  r.norms.resize(static_cast<size_t>(k));
  std::vector<uint64_t> hashes(static_cast<size_t>(k));
  r.cs = codebook_norms(cb, t, k, d, r.norms.data(), hashes.data());
  r.copies = mark_duplicate_codes(cb, t, k, d, hashes.data(), r.norms.data());
  return r;
}

// sum_j (x_j - c_j)^2 in double: sixteen partial sums s_i over j = i mod 16 (independent chains,
// so the loop runs at the adds' throughput, not their latency; a last half step of 8 goes into
// s_0 .. s_7), combined as a fixed tree:
// t_i = s_i + s_{i+8}, u_i = t_i + t_{i+4}, v_i = u_i + u_{i+2}, v_0 + v_1, then the d mod 16 tail
// in order. Differences and squares of fp32 values in double, each rounded once (no FMA). The SSE2,
// AVX2 and AVX-512 versions run exactly these operations, so every CPU gives the same bits.
inline __m128d cvt_lo(__m128 v) { return _mm_cvtps_pd(v); }
inline __m128d cvt_hi(__m128 v) { return _mm_cvtps_pd(_mm_movehl_ps(v, v)); }

inline double tail_sq(const float* x, const float* c, int64_t j, int64_t d, double s) {
  for (; j < d; ++j) {
    const double e = static_cast<double>(x[j]) - static_cast<double>(c[j]);
    s += e * e;
  }
  return s;
}

double sq_dist_sse2(const float* __restrict x, const float* __restrict c, int64_t d) {
  __m128d a[8];
  for (auto& v : a) v = _mm_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16)
    for (int q = 0; q < 4; ++q) {  // a[2q], a[2q+1]: lanes 4q .. 4q+3
      const __m128 xv = _mm_loadu_ps(x + j + 4 * q), cv = _mm_loadu_ps(c + j + 4 * q);
      const __m128d e0 = _mm_sub_pd(cvt_lo(xv), cvt_lo(cv)), e1 = _mm_sub_pd(cvt_hi(xv), cvt_hi(cv));
      a[2 * q] = _mm_add_pd(a[2 * q], _mm_mul_pd(e0, e0));
      a[2 * q + 1] = _mm_add_pd(a[2 * q + 1], _mm_mul_pd(e1, e1));
    }
  if (j + 8 <= d) {  // one half step into s_0 .. s_7
    for (int q = 0; q < 2; ++q) {
      const __m128 xv = _mm_loadu_ps(x + j + 4 * q), cv = _mm_loadu_ps(c + j + 4 * q);
      const __m128d e0 = _mm_sub_pd(cvt_lo(xv), cvt_lo(cv)), e1 = _mm_sub_pd(cvt_hi(xv), cvt_hi(cv));
      a[2 * q] = _mm_add_pd(a[2 * q], _mm_mul_pd(e0, e0));
      a[2 * q + 1] = _mm_add_pd(a[2 * q + 1], _mm_mul_pd(e1, e1));
    }
    j += 8;
  }
  for (int q = 0; q < 4; ++q) a[q] = _mm_add_pd(a[q], a[q + 4]);  // t
  for (int q = 0; q < 2; ++q) a[q] = _mm_add_pd(a[q], a[q + 2]);  // u
  const __m128d v = _mm_add_pd(a[0], a[1]);
  return tail_sq(x, c, j, d, _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))));
}

__attribute__((target("avx512f"))) double sq_dist_avx512(const float* __restrict x, const float* __restrict c,
                                                          int64_t d) {
  __m512d a0 = _mm512_setzero_pd(), a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512d e0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), _mm512_cvtps_pd(_mm256_loadu_ps(c + j)));
    const __m512d e1 =
        _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8)), _mm512_cvtps_pd(_mm256_loadu_ps(c + j + 8)));
    a0 = _mm512_add_pd(a0, _mm512_mul_pd(e0, e0)), a1 = _mm512_add_pd(a1, _mm512_mul_pd(e1, e1));
  }
  if (j + 8 <= d) {  // one half step into s_0 .. s_7
    const __m512d e0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), _mm512_cvtps_pd(_mm256_loadu_ps(c + j)));
    a0 = _mm512_add_pd(a0, _mm512_mul_pd(e0, e0));
    j += 8;
  }
  const __m512d t = _mm512_add_pd(a0, a1);
  const __m256d u = _mm256_add_pd(_mm512_castpd512_pd256(t), _mm512_extractf64x4_pd(t, 1));
  const __m128d v = _mm_add_pd(_mm256_castpd256_pd128(u), _mm256_extractf128_pd(u, 1));
  return tail_sq(x, c, j, d, _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))));
}

// The same operations on 4-double vectors: a[q] holds s_4q .. s_4q+3, and the tree's first two
// levels add whole vectors (t = a0 + a2, a1 + a3; u = t0 + t1), so the bits are the SSE2 version's.
__attribute__((target("avx2"))) double sq_dist_avx2(const float* __restrict x, const float* __restrict c, int64_t d) {
  __m256d a[4];
  for (auto& v : a) v = _mm256_setzero_pd();
  auto step = [&](int64_t j, int q) {
    const __m256d e = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 4 * q)), _mm256_cvtps_pd(_mm_loadu_ps(c + j + 4 * q)));
    a[q] = _mm256_add_pd(a[q], _mm256_mul_pd(e, e));
  };
  int64_t j = 0;
  for (; j + 16 <= d; j += 16)
    for (int q = 0; q < 4; ++q) step(j, q);
  if (j + 8 <= d) {  // one half step into s_0 .. s_7
    step(j, 0), step(j, 1);
    j += 8;
  }
  const __m256d u = _mm256_add_pd(_mm256_add_pd(a[0], a[2]), _mm256_add_pd(a[1], a[3]));
  const __m128d v = _mm_add_pd(_mm256_castpd256_pd128(u), _mm256_extractf128_pd(u, 1));
  return tail_sq(x, c, j, d, _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))));
}

// |x|_1 and |x|_2^2 in double, for the certificate (any summation order will do: the bound carries
// a relative margin far above the rounding of a d-term sum).
void l1_l2_sse2(const float* __restrict x, int64_t d, double* l1, double* l2) {
  const __m128d sign = _mm_set1_pd(-0.0);
  __m128d p0 = _mm_setzero_pd(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m128 x0 = _mm_loadu_ps(x + j), x1 = _mm_loadu_ps(x + j + 4);
    const __m128d v0 = cvt_lo(x0), v1 = cvt_hi(x0), v2 = cvt_lo(x1), v3 = cvt_hi(x1);
    p0 = _mm_add_pd(p0, _mm_andnot_pd(sign, v0)), p1 = _mm_add_pd(p1, _mm_andnot_pd(sign, v1));
    p2 = _mm_add_pd(p2, _mm_andnot_pd(sign, v2)), p3 = _mm_add_pd(p3, _mm_andnot_pd(sign, v3));
    q0 = _mm_add_pd(q0, _mm_mul_pd(v0, v0)), q1 = _mm_add_pd(q1, _mm_mul_pd(v1, v1));
    q2 = _mm_add_pd(q2, _mm_mul_pd(v2, v2)), q3 = _mm_add_pd(q3, _mm_mul_pd(v3, v3));
  }
  const __m128d p = _mm_add_pd(_mm_add_pd(p0, p2), _mm_add_pd(p1, p3));
  const __m128d q = _mm_add_pd(_mm_add_pd(q0, q2), _mm_add_pd(q1, q3));
  double s1 = _mm_cvtsd_f64(_mm_add_sd(p, _mm_unpackhi_pd(p, p)));
  double s2 = _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  for (; j < d; ++j) {
    const double v = static_cast<double>(x[j]);
    s1 += std::fabs(v), s2 += v * v;
  }
  *l1 = s1, *l2 = s2;
}

__attribute__((target("avx512f"))) void l1_l2_avx512(const float* __restrict x, int64_t d, double* l1, double* l2) {
  __m512d p0 = _mm512_setzero_pd(), p1 = p0, q0 = p0, q1 = p0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m512d v0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j)), v1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8));
    p0 = _mm512_add_pd(p0, _mm512_abs_pd(v0)), p1 = _mm512_add_pd(p1, _mm512_abs_pd(v1));
    q0 = _mm512_fmadd_pd(v0, v0, q0), q1 = _mm512_fmadd_pd(v1, v1, q1);
  }
  if (j + 8 <= d) {
    const __m512d v0 = _mm512_cvtps_pd(_mm256_loadu_ps(x + j));
    p0 = _mm512_add_pd(p0, _mm512_abs_pd(v0)), q0 = _mm512_fmadd_pd(v0, v0, q0);
    j += 8;
  }
  double s1 = _mm512_reduce_add_pd(_mm512_add_pd(p0, p1)), s2 = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
  for (; j < d; ++j) {
    const double v = static_cast<double>(x[j]);
    s1 += std::fabs(v), s2 += v * v;
  }
  *l1 = s1, *l2 = s2;
}

__attribute__((target("avx2"))) void l1_l2_avx2(const float* __restrict x, int64_t d, double* l1, double* l2) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  __m256d p0 = _mm256_setzero_pd(), p1 = p0, q0 = p0, q1 = p0;
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(x + j)), v1 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4));
    p0 = _mm256_add_pd(p0, _mm256_andnot_pd(sign, v0)), p1 = _mm256_add_pd(p1, _mm256_andnot_pd(sign, v1));
    q0 = _mm256_add_pd(q0, _mm256_mul_pd(v0, v0)), q1 = _mm256_add_pd(q1, _mm256_mul_pd(v1, v1));
  }
  const __m256d p = _mm256_add_pd(p0, p1), q = _mm256_add_pd(q0, q1);
  const __m128d p2 = _mm_add_pd(_mm256_castpd256_pd128(p), _mm256_extractf128_pd(p, 1));
  const __m128d q2 = _mm_add_pd(_mm256_castpd256_pd128(q), _mm256_extractf128_pd(q, 1));
  double s1 = _mm_cvtsd_f64(_mm_add_sd(p2, _mm_unpackhi_pd(p2, p2)));
  double s2 = _mm_cvtsd_f64(_mm_add_sd(q2, _mm_unpackhi_pd(q2, q2)));
  for (; j < d; ++j) {
    const double v = static_cast<double>(x[j]);
    s1 += std::fabs(v), s2 += v * v;
  }
  *l1 = s1, *l2 = s2;
}

// The direct-form helpers of one search, at the widest level VQTOK_ISA allows (chosen once).
struct DirectForm {
  double (*dist)(const float*, const float*, int64_t);
  void (*norms)(const float*, int64_t, double*, double*);
  DirectForm() {
    const Isa isa = active_isa();
    dist = isa == Isa::Avx512 ? &sq_dist_avx512 : isa == Isa::Avx2 ? &sq_dist_avx2 : &sq_dist_sse2;
    norms = isa == Isa::Avx512 ? &l1_l2_avx512 : isa == Isa::Avx2 ? &l1_l2_avx2 : &l1_l2_sse2;
  }
};

// Lowest index minimising sum((x - c)^2) in double. xr: d floats; tmp: d floats of scratch.
int64_t scan_direct(const DirectForm& df, const float* xr, const void* cb, DType t, int64_t k, int64_t d, float* tmp,
                    double* dist) {
  int64_t best = 0;
  double bd = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    const double s = df.dist(xr, row_f32(cb, t, i, d, tmp), d);
    if (s < bd) bd = s, best = i;
  }
  *dist = bd;
  return best;
}

double direct_dist(const DirectForm& df, const float* xr, const void* cb, DType t, int64_t i, int64_t d, float* tmp) {
  return df.dist(xr, row_f32(cb, t, i, d, tmp), d);
}

// Where the exact search cuts its work for n rows, k codes and d features with kernel kern (the
// tiles, panels and row blocks that near-tie tests place duplicates across).
NearestLayout layout_of(const BlockKernel& kern, int64_t n, int64_t k, int64_t d) {
  NearestLayout L;
  L.rows_per_tile = kern.mr;
  L.codes_per_chunk = int64_t{kern.width} * kern.nrv;
  // ~1 MiB of packed codes per panel: fits each core's L2 next to the streaming rows.
  L.codes_per_panel = std::max<int64_t>(L.codes_per_chunk, (int64_t{1} << 20) / (4 * d) / L.codes_per_chunk * L.codes_per_chunk);
  L.codes_per_panel = std::min(L.codes_per_panel, round_up(k, L.codes_per_chunk));
  // Row blocks of the main pass: ~64 KiB of rows (at least 16 micro-tiles for small d); past
  // d = 128 ~192 KiB, so that each chunk fetched into L1 meets up to 16 tiles (5 at d = 256
  // with 64 KiB).
  const int64_t block_floats = d > 128 ? 49152 : 16384;
  L.rows_per_block = std::clamp<int64_t>(block_floats / d / kern.mr * kern.mr, int64_t{kern.mr} * 2,
                                         int64_t{kern.mr} * kMaxBlockTiles);
  L.rows_per_block = std::min(L.rows_per_block, round_up(std::max<int64_t>(n, 1), kern.mr));
  // Past d = 128 with more than one panel, rows are packed once per super-block (~8 MiB).
  if (d > 128 && k > L.codes_per_panel)
    L.rows_per_super_block = std::max<int64_t>(1, (int64_t{2} << 20) / (L.rows_per_block * d)) * L.rows_per_block;
  return L;
}

// Everything one search needs; the panel buffers are shared by the threads.
struct Search {
  const BlockKernel& kern;
  const void* x;
  const void* cb;
  DType dtype;
  int64_t n, k, d;
  int64_t cw;  // codes per chunk (width * nrv)
  int64_t kp;  // codes per panel (a multiple of cw)
  std::vector<float> cnorm, panel_v, pnorm_v;
  float* panel = nullptr;  // 64-byte aligned views of panel_v / pnorm_v
  float* pnorm = nullptr;

  Search(const BlockKernel& kr, const void* x_, const void* cb_, DType t, int64_t n_, int64_t k_,
         int64_t d_)
      : kern(kr), x(x_), cb(cb_), dtype(t), n(n_), k(k_), d(d_), cw(int64_t{kr.width} * kr.nrv) {
    kp = layout_of(kr, n, k, d).codes_per_panel;
    cnorm.resize(static_cast<size_t>(k));
    panel = grow_aligned64(panel_v, kp * d);
    pnorm = grow_aligned64(pnorm_v, kp);
  }

  int64_t chunks_in(int64_t c0) const { return (std::min(kp, k - c0) + cw - 1) / cw; }

  // Packs codes [c0, c0 + chunks*cw) as -2*c in [chunk][d][cw] order. Call inside a parallel
  // region (work-shared loop, implicit barrier at the end). crow: width * d floats of scratch.
  // Each group of `width` codes is written one feature at a time, a contiguous run of `width`
  // floats, from its rows (read in place for float32): writing one code at a time instead strides
  // every store across the chunk's d lines.
  void pack(int64_t c0, float* crow) {
    const int64_t nch = chunks_in(c0), w = kern.width, groups = nch * kern.nrv;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t q = g / kern.nrv, lane0 = (g % kern.nrv) * w;
      float* dst = panel + q * d * cw + lane0;
      const int64_t first = c0 + g * w, valid = std::max<int64_t>(0, std::min(w, k - first));
      const float* rows = rows_f32(cb, dtype, first, valid, d, crow);
      for (int64_t j = 0; j < d; ++j) {
        float* out = dst + j * cw;
        for (int64_t l = 0; l < valid; ++l) out[l] = -2.0f * rows[l * d + j];
        for (int64_t l = valid; l < w; ++l) out[l] = 0.0f;
      }
      for (int64_t l = 0; l < w; ++l) pnorm[g * w + l] = l < valid ? cnorm[first + l] : kInf;
    }
  }

  // Converts rows `ids[0..rows)` (or rows r0.. when ids is null) into xbuf, zero-padded to rpad.
  const float* load_rows(int64_t r0, const int64_t* ids, int64_t rows, int64_t rpad, float* xbuf) const {
    if (ids == nullptr && dtype == DType::F32 && rows == rpad)
      return static_cast<const float*>(x) + r0 * d;
    for (int64_t r = 0; r < rows; ++r)
      to_float(x, dtype, (ids ? ids[r] : r0 + r) * d, d, xbuf + r * d);
    std::fill(xbuf + rows * d, xbuf + rpad * d, 0.0f);
    return xbuf;
  }
};

}  // namespace
}  // namespace nearest_detail

namespace nearest_detail {
namespace {

NearestStats nearest_exact(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d, DType dtype,
                           int64_t* out_idx, float* out_dist, const CodeNorms* dedup = nullptr);

// The exact search on the rows `rows` of x (gathered), its answers written back to their rows;
// returns its count of re-decided rows. dedup: as for nearest_exact.
int64_t exact_on_rows(const void* x, const void* codebook, const std::vector<int64_t>& rows, int64_t k, int64_t d,
                      DType dtype, int64_t* out_idx, float* out_dist, const CodeNorms* dedup) {
  const int64_t nr = static_cast<int64_t>(rows.size()), es = dtype == DType::F32 ? 4 : 2;
  std::vector<uint8_t> xs(rows.size() * static_cast<size_t>(d * es));
  for (int64_t i = 0; i < nr; ++i)
    std::memcpy(xs.data() + i * d * es, static_cast<const uint8_t*>(x) + rows[i] * d * es, static_cast<size_t>(d * es));
  std::vector<int64_t> ri(rows.size());
  std::vector<float> rd(rows.size());
  const int64_t redecided = nearest_exact(xs.data(), codebook, nr, k, d, dtype, ri.data(), rd.data(), dedup).exact_rows;
  for (int64_t i = 0; i < nr; ++i) out_idx[rows[i]] = ri[i], out_dist[rows[i]] = rd[i];
  return redecided;
}

// dedup: the codebook's norms with its duplicate codes set aside (deduped_norms), used instead of
// computing them; without it, that happens only when the first pass leaves kDedupMinRows rows or
// more to re-decide and the codebook has copies (those rows are then searched again with it).
NearestStats nearest_exact(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d, DType dtype,
                           int64_t* out_idx, float* out_dist, const CodeNorms* dedup) {
  Search S(pick_kernel(d), x, codebook, dtype, n, k, d);
  const DirectForm df;
  NearestStats stats;
  stats.isa = S.kern.name;
  if (n <= 0) return stats;
  const int mr = S.kern.mr;
  if (dedup != nullptr) S.cnorm = dedup->norms;
  const CodebookStats cs = dedup != nullptr ? dedup->cs : codebook_norms(codebook, dtype, k, d, S.cnorm.data());

  // Error bound of a score: gamma_m with m = d + 2 roundings for FMA chains (2d + 2 otherwise).
  const double u = std::ldexp(1.0, -24), m = (S.kern.fma ? 1.0 : 2.0) * d + 2.0;
  const double gamma = m * u < 0.5 ? m * u / (1 - m * u) : std::numeric_limits<double>::infinity();
  // Scores stay far from fp32 overflow when |c|^2 and |x|^2 are below 1e36 (|s| < 3e36);
  // other inputs take the plain direct-form scan.
  const bool huge = cs.norm2_max > 1e36;

  const NearestLayout geo = layout_of(S.kern, n, k, d);
  const int64_t mb = geo.rows_per_block;
  const int64_t nblocks = (n + mb - 1) / mb;
  // Rows re-decided by scores are processed fb at a time (scores buffer fb x kp floats).
  const int64_t fb = int64_t{mr} * 2;

  // Per-row state (20 bytes a row) in a recycled HostBuffer, each block's rows initialised by
  // the thread that searches them: a fresh vector of this size is a fresh mapping, whose page
  // faults and serial fill cost as much as a small search.
  HostBuffer row_state(static_cast<size_t>(n) * (sizeof(double) + 2 * sizeof(float) + sizeof(int32_t)));
  double* const bound = static_cast<double*>(row_state.data());
  float* const gbest = reinterpret_cast<float*>(bound + n);
  float* const gsec = gbest + n;
  int32_t* const gidx = reinterpret_cast<int32_t*>(gsec + n);
  std::vector<int64_t> redo;        // rows whose gap is inside the bound
  std::vector<double> redo_dist;    // their best direct-form distance so far
  int64_t exact_rows = 0;
  CodeNorms found;  // the copies found after the first pass: the rows to re-decide are searched again without them
  bool again = false;

  // Half the largest gap a row's computed scores can show without proving its winner (see the
  // file comment); infinite past the bound's range.
  const double subnormal = m * std::ldexp(1.0, -147);
  auto row_bound = [&](const float* xr) {
    double l1, l2;
    df.norms(xr, d, &l1, &l2);
    if (huge || l2 >= 1e36) return std::numeric_limits<double>::infinity();
    const double dots = std::min(l1 * cs.abs_max, std::sqrt(l2) * cs.norm_max);
    return gamma * (cs.norm2_max + 2.0 * dots) * (1 + 1e-6) + subnormal;
  };

  // The file comment's sharper test for a row xr with bound e (row_bound) and best / second-best
  // scores s1 <= s2: true when it proves the winner. F(s) = min(e, g' (N^2 + 2aN) + subnormal),
  // N = min(max |c_k|, a + sqrt(max(0, s + e + a^2))), a = |x|, g' = g (1 + 1e-6); the
  // inflations cover the double roundings of a^2 and max |c_k|^2 (d-term sums: (d + 64) 2^-52,
  // also ample for their square roots) and of a. s - F(s) is non-decreasing
  // for s >= s2 when r2 = sqrt(s2 + e + a^2) satisfies r2 (1 - g') >= 2 a g' (dF/ds <= g' (1 +
  // 2a/r) where N is not clamped, 0 where it is; taking the min with e keeps it so).
  // VQTOK_NEAREST_REFINE=0 turns the sharper test off (the 2E test alone: the same answers, more
  // rows re-decided), read once per search.
  const char* refine_env = std::getenv("VQTOK_NEAREST_REFINE");
  const bool refine = refine_env == nullptr || std::strcmp(refine_env, "0") != 0;
  const double l2_inflation = 1 + static_cast<double>(d + 64) * std::ldexp(1.0, -52);
  const double gamma_r = gamma * (1 + 1e-6), cnorm_max = cs.norm_max * l2_inflation;
  auto refined_certificate = [&](const float* xr, double e, double s1, double s2) {
    if (!(e < std::numeric_limits<double>::infinity())) return false;
    double l1, l2;
    df.norms(xr, d, &l1, &l2);
    l2 *= l2_inflation;
    const double a = std::sqrt(l2) * (1 + 1e-12);
    auto radius = [&](double s) { return std::sqrt(std::max(0.0, s + e + l2)); };
    auto F = [&](double s) {
      const double nk = std::min(cnorm_max, a + radius(s));
      return std::min(e, gamma_r * (nk * nk + 2.0 * a * nk) + subnormal);
    };
    if (!(radius(s2) * (1 - gamma_r) >= 2.0 * a * gamma_r)) return false;
    return s2 - F(s2) > s1 + F(s1);
  };

  // Past the kernel's sweep_max_d (16, or 32 for AVX2) the tiles read rows packed feature-major
  // (pack_rows). Past d = 128 (where the packing is a larger share of a panel's work), with more
  // than one panel, they are packed once into xpk, a super-block of sb rows (whole blocks, ~8 MiB)
  // that then meets every panel; the panels are packed again per super-block. Otherwise each block
  // is packed per panel into its thread's own buffer, which stays in L1 (measured faster there than
  // reading a super-block back).
  const bool packed_rows = d > S.kern.sweep_max_d, reuse_rows = geo.rows_per_super_block > 0;
  const int64_t sb = reuse_rows ? geo.rows_per_super_block : round_up(n, mb);
  // A recycled HostBuffer: a fresh 8 MiB vector would cost a zero fill and ~2k page faults per call.
  std::unique_ptr<HostBuffer> xpk_buf;
  if (reuse_rows)
    xpk_buf = std::make_unique<HostBuffer>(static_cast<size_t>(std::min(sb, round_up(n, mb)) * d) * sizeof(float));
  float* const xpk_data = reuse_rows ? static_cast<float*>(xpk_buf->data()) : nullptr;

  // With few codes (k <= 64 d) a lane index per code group costs less than recomputing, after
  // each panel, the winning group of every row it improves (NRV chains of d dependent FMAs per
  // row): one run_block variant or the other (the same answer).
  const auto run_kernel = k <= 64 * d ? S.kern.run_ids : S.kern.run;

  // Small searches (< ~1 ms of FMA work) run on one thread: the region's barriers would cost
  // more than they save, especially when another process holds one of the cores.
  const bool parallel = 2.0 * static_cast<double>(n) * k * d > 2e8 && nblocks > 1;

#pragma omp parallel if (parallel) reduction(+ : exact_rows)
  {
    std::vector<float> xbuf(static_cast<size_t>(std::max(mb, fb) * d));
    // crow: a group's codes for pack, or one code for the direct-form helpers
    std::vector<float> crow(static_cast<size_t>(S.kern.width * d)), xrow(static_cast<size_t>(d));
    std::vector<float> xloc(packed_rows && !reuse_rows ? static_cast<size_t>(mb * d) : 0);
    std::vector<int64_t> local_redo;  // this thread's rows whose gap is inside the bound

    // 1. fp32 scores, best / second per row; packed rows as described above, each block's
    // certificate bound taken while its rows are in cache.
    for (int64_t s0 = 0; s0 < n; s0 += sb) {
      const int64_t b0 = s0 / mb, b1 = std::min(nblocks, (s0 + sb) / mb);
      for (int64_t c0 = 0; c0 < k; c0 += S.kp) {
        S.pack(c0, crow.data());
        const int64_t nch = S.chunks_in(c0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * mb, rows = std::min(mb, n - r0), rpad = round_up(rows, mr);
          const float* xq = S.load_rows(r0, nullptr, rows, rpad, xbuf.data());
          float* xp = !packed_rows ? nullptr : reuse_rows ? xpk_data + (r0 - s0) * d : xloc.data();
          if (packed_rows && (c0 == 0 || !reuse_rows)) S.kern.pack_rows(xq, rpad, d, xp);
          if (c0 == 0) {
            std::fill(gbest + r0, gbest + r0 + rows, kInf);
            std::fill(gsec + r0, gsec + r0 + rows, kInf);
            std::fill(gidx + r0, gidx + r0 + rows, 0);
            if (packed_rows)
              for (int64_t r = 0; r < rows; ++r) bound[r0 + r] = row_bound(xq + r * d);
          }
          BlockArgs a{xq, rpad, rows, d, S.panel, S.pnorm, nch, static_cast<int32_t>(c0),
                      gbest + r0, gsec + r0, gidx + r0, nullptr, 0, xp};
          run_kernel(a);
          if (c0 + S.kp < k) continue;
          // 2. The block's last panel, its rows still in cache: the certificate (a gap above 2E
          // proves the winner) and, for proven rows, the outputs; the others are re-decided.
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t g = r0 + r;
            if (!packed_rows) bound[g] = row_bound(xq + r * d);
            const double gap = static_cast<double>(gsec[g]) - static_cast<double>(gbest[g]);
            if (!(gap > 2.0 * bound[g]) && !(refine && refined_certificate(xq + r * d, bound[g], gbest[g], gsec[g]))) {
              local_redo.push_back(g);
              continue;
            }
            out_idx[g] = gidx[g];
            out_dist[g] = static_cast<float>(direct_dist(df, xq + r * d, codebook, dtype, gidx[g], d, crow.data()));
          }
        }
      }
    }
#pragma omp critical
    redo.insert(redo.end(), local_redo.begin(), local_redo.end());
#pragma omp barrier
#pragma omp single
    {
      std::sort(redo.begin(), redo.end());
      redo_dist.assign(redo.size(), std::numeric_limits<double>::infinity());
      if (dedup == nullptr && static_cast<int64_t>(redo.size()) >= kDedupMinRows) {
        found = deduped_norms(codebook, dtype, k, d);
        again = found.copies > 0;
      }
    }  // implicit barrier
    if (!again) {

    // 3a. Inputs beyond the bound's range: a plain direct-form scan.
    const int64_t nredo = static_cast<int64_t>(redo.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nredo; ++i) {
      const int64_t r = redo[i];
      if (!std::isinf(bound[r])) continue;
      double dist;
      gidx[r] = static_cast<int32_t>(
          scan_direct(df, row_f32(x, dtype, r, d, xrow.data()), codebook, dtype, k, d, crow.data(), &dist));
      redo_dist[i] = dist;
    }

    // 3b. Near ties: scores again (same kernel, same bound); every code with s <= best + 2E may
    // be the exact winner and is decided in the direct form (ascending codes, strict <).
    const int64_t nfb = (nredo + fb - 1) / fb;
    if (nfb > 0) {
      std::vector<float> scores(static_cast<size_t>(fb * S.kp));
      for (int64_t c0 = 0; c0 < k; c0 += S.kp) {
        S.pack(c0, crow.data());
        const int64_t nch = S.chunks_in(c0), ncodes = std::min(S.kp, k - c0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nfb; ++b) {
          const int64_t i0 = b * fb, rows = std::min(fb, nredo - i0), rpad = round_up(rows, mr);
          BlockArgs a{S.load_rows(0, redo.data() + i0, rows, rpad, xbuf.data()), rpad, rows, d,
                      S.panel, S.pnorm, nch, static_cast<int32_t>(c0), nullptr,
                      nullptr, nullptr, scores.data(), S.kp};
          S.kern.run(a);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = redo[i0 + i];
            if (std::isinf(bound[r])) continue;
            const double thr = static_cast<double>(gbest[r]) + 2.0 * bound[r];
            const float* xr = xbuf.data() + i * d;
            const float* sr = scores.data() + i * S.kp;
            for (int64_t c = 0; c < ncodes; ++c) {
              if (static_cast<double>(sr[c]) > thr) continue;
              const double dd = direct_dist(df, xr, codebook, dtype, c0 + c, d, crow.data());
              if (dd < redo_dist[i0 + i]) redo_dist[i0 + i] = dd, gidx[r] = static_cast<int32_t>(c0 + c);
            }
          }
        }
      }
    }

    // 4. Outputs of the re-decided rows: the winner's direct-form distance.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < nredo; ++i) {
      const int64_t r = redo[i];
      out_idx[r] = gidx[r];
      out_dist[r] = static_cast<float>(
          direct_dist(df, row_f32(x, dtype, r, d, xrow.data()), codebook, dtype, gidx[r], d, crow.data()));
    }
#pragma omp single
    exact_rows = nredo;
    }  // !again
  }
  if (again)  // the rows to re-decide, searched again with the duplicate codes set aside
    exact_rows = exact_on_rows(x, codebook, redo, k, d, dtype, out_idx, out_dist, &found);
  stats.exact_rows = exact_rows;
  return stats;
}

// fp32 -> bf16 bits, round to nearest even (finite inputs).
inline uint32_t bf16_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

inline float round_up_f(double v) {
  const float f = static_cast<float>(v);
  return static_cast<double>(f) >= v ? f : std::nextafter(f, std::numeric_limits<float>::max());
}

}  // namespace

// Certified fast mode. Scores come from bf16-rounded x and codes (AMX TDPBF16PS or AVX512-BF16
// VDPBF16PS: exact bf16 products, fp32 accumulation). Bound of one approximate score s~ against the exact
// t = |c|^2 - 2 x.c, with u = 2^-8 (bf16 round to nearest), m = 2*d2 + 2 fp32 roundings (one per
// product added, in any order, the norm's and the final norm + dot) counted at 2^-23 each (so a
// truncating accumulator is covered too), g = m 2^-23 / (1 - m 2^-23), S >= sum_i |x_i c_i|:
//   products:     |x^c^ - xc| <= (2u + u^2)|xc|          -> 2 (2u + u^2) S
//   accumulation: g (|c|^2 + 2 (1 + u)^2 S)               -> g (max |c|^2 + 2 (1 + u)^2 S)
//   flushing (both instructions have DAZ/FTZ): subnormal operands and results, a few 2^-126 quanta.
// Every code whose s~ is within band = 2E + 2 delta of the lowest s~ is a candidate (delta bounds
// the float64 direct-form error, so a code outside the band is strictly farther in that form
// too); the candidates are decided in the float64 direct form (lowest index on ties). Rows with
// more than kFastCap candidates, or values past the bound's range, run the exact search.
NearestStats nearest_code_l2_fast(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                                  DType dtype, FastKernel kern, int64_t* out_idx, float* out_dist) {
  constexpr int64_t CW = int64_t{kFastNRV} * kFastWidth, MR = kFastMR, CAP = kFastCap;
  const DirectForm df;
  std::vector<float> cnorm(static_cast<size_t>(k));
  const CodebookStats cs = codebook_norms(codebook, dtype, k, d, cnorm.data());
  if (cs.norm2_max > 1e36) return nearest_exact(x, codebook, n, k, d, dtype, out_idx, out_dist);
  // per-feature max |c_kj|: S = sum_j |x_j| cmax_j bounds every code's sum |x_j c_kj|
  std::vector<double> cmax(static_cast<size_t>(d), 0.0);
#pragma omp parallel if (k * d > (int64_t{1} << 18))
  {
    std::vector<double> mine(static_cast<size_t>(d), 0.0);
    std::vector<float> tmp(static_cast<size_t>(d));
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < k; ++i) {
      const float* row = row_f32(codebook, dtype, i, d, tmp.data());
      for (int64_t j = 0; j < d; ++j) mine[j] = std::max(mine[j], static_cast<double>(std::fabs(row[j])));
    }
#pragma omp critical
    for (int64_t j = 0; j < d; ++j) cmax[j] = std::max(cmax[j], mine[j]);
  }

  // feature pairs; AMX tiles take up to 16 pairs a step, so past 16 they fill whole steps
  const int64_t d2 = (d + 1) / 2 <= 16 || kern != FastKernel::Amx ? (d + 1) / 2 : round_up((d + 1) / 2, 16);
  int64_t kp = std::max<int64_t>(CW, (int64_t{1} << 20) / (4 * d2) / CW * CW);
  kp = std::min(kp, round_up(k, CW));
  const int64_t mb = kFastBlockRows;  // rows per block
  // Rows per super-block: their bf16 rows and candidate lists take ~8 MiB at most.
  const int64_t sb = std::max(mb, std::min<int64_t>(32768, (int64_t{8} << 20) / (8 * d2 + 8 * CAP + 16)) / mb * mb);
  // Buffers reused across calls from the same thread (first-touch page faults of a fresh ~8 MiB
  // would cost as much as a small search); every element is written before it is read.
  const int64_t sbr = std::min(sb, round_up(n, mb));
  static thread_local std::vector<uint32_t> panel_v, xq_v;
  static thread_local std::vector<float> pnorm_v, best_v, thr_v, band_v, scores_v;
  static thread_local std::vector<int32_t> count_v, codes_v;
  auto grow = [](auto& v, int64_t count) { return grow_aligned64(v, count); };
  uint32_t* panel = grow(panel_v, kp * d2);
  uint32_t* xq = grow(xq_v, sbr * d2);
  float* pnorm = grow(pnorm_v, kp);
  float* best = grow(best_v, sbr);
  float* thr = grow(thr_v, sbr);
  float* band = grow(band_v, sbr);
  float* scores = grow(scores_v, sbr * CAP);
  int32_t* count = grow(count_v, sbr);
  int32_t* codes = grow(codes_v, sbr * CAP);
  std::vector<int64_t> fallback;

  const double u = std::ldexp(1.0, -8), m = 2.0 * d2 + 2.0, ua = std::ldexp(1.0, -23);
  const double g = m * ua / (1 - m * ua);
  const double cmax_all = cs.abs_max, tiny = std::ldexp(1.0, -126);
  const bool parallel = 2.0 * static_cast<double>(n) * k * d > 2e8 && n > mb;
  constexpr float kBig = std::numeric_limits<float>::max();
  // Seed pass over the first panel's first codes (~32k multiply-adds per row at any d): the
  // rows' scans then start from a good best score, so candidate captures stay rare.
  const int64_t seed_steps = std::max<int64_t>(4, (int64_t{1} << 15) / (2 * d2) / 16);  // 16-code steps

  for (int64_t s0 = 0; s0 < n; s0 += sb) {
    const int64_t rows = std::min(sb, n - s0), rpad = round_up(rows, MR), nblocks = (rpad + mb - 1) / mb;
#pragma omp parallel if (parallel)
    {
      // crow: a group's codes for the panel packing, or one code for the direct form
      std::vector<float> xr(static_cast<size_t>(d)), crow(static_cast<size_t>(kFastWidth * d));
      // 1. bf16 rows, per-row bands, empty candidate lists.
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rpad; ++r) {
        uint32_t* q = xq + r * d2;
        best[r] = kBig, count[r] = 0;
        if (r >= rows) {  // padding row: zero features, never captures
          std::fill(q, q + d2, 0u);
          thr[r] = -kBig, band[r] = 0.0f;
          continue;
        }
        to_float(x, dtype, (s0 + r) * d, d, xr.data());
        double l1w = 0, l2 = 0, xmax = 0;
        for (int64_t j = 0; j < d; ++j) {
          const double a = std::fabs(static_cast<double>(xr[j]));
          l1w += a * cmax[j], l2 += a * a, xmax = std::max(xmax, a);
        }
        for (int64_t p = 0; p < d2; ++p) {
          const uint32_t lo = 2 * p < d ? bf16_bits(xr[2 * p]) : 0u, hi = 2 * p + 1 < d ? bf16_bits(xr[2 * p + 1]) : 0u;
          q[p] = lo | (hi << 16);
        }
        const double S = std::min(l1w, std::sqrt(l2) * cs.norm_max);
        const double E = (2 * (2 * u + u * u) + 2 * g * (1 + u) * (1 + u)) * S + g * cs.norm2_max +
                         2.02 * d * tiny * (cmax_all + xmax) + m * 2 * tiny;
        const double delta = (d + 2) * std::ldexp(1.0, -50) * (l2 + cs.norm2_max + 2 * S);
        const double bd = (2 * E + 2 * delta) * (1 + 1e-6);
        if (!(l2 < 1e36) || !(bd < 1e37)) {  // past the bound's range: the exact search decides
          thr[r] = -kBig, band[r] = 0.0f, count[r] = CAP + 1;
          continue;
        }
        thr[r] = kBig, band[r] = round_up_f(bd);
      }
      // 2. bf16 scores, panel by panel; candidates captured in the kernel's epilogue.
      for (int64_t c0 = 0; c0 < k; c0 += kp) {
        const int64_t nch = (std::min(kp, k - c0) + CW - 1) / CW;
#pragma omp for schedule(static)
        for (int64_t grp = 0; grp < nch * kFastNRV; ++grp) {
          const int64_t qc = grp / kFastNRV, lane0 = (grp % kFastNRV) * kFastWidth;
          uint32_t* dst = panel + qc * d2 * CW + lane0;
          // one feature pair at a time, a contiguous run of the group's codes (as Search::pack)
          const int64_t first = c0 + grp * kFastWidth;
          const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kFastWidth, k - first));
          const float* rows = rows_f32(codebook, dtype, first, valid, d, crow.data());
          for (int64_t p = 0; p < d2; ++p) {
            uint32_t* out = dst + p * CW;
            for (int64_t l = 0; l < valid; ++l) {
              const float* c = rows + l * d;
              const uint32_t lo = 2 * p < d ? bf16_bits(-2.0f * c[2 * p]) : 0u;
              const uint32_t hi = 2 * p + 1 < d ? bf16_bits(-2.0f * c[2 * p + 1]) : 0u;
              out[l] = lo | (hi << 16);
            }
            for (int64_t l = valid; l < kFastWidth; ++l) out[l] = 0u;
          }
          for (int64_t l = 0; l < kFastWidth; ++l)
            pnorm[grp * kFastWidth + l] = l < valid ? cnorm[first + l] : std::numeric_limits<float>::infinity();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nblocks; ++b) {
          const int64_t r0 = b * mb;
          FastBlockArgs a{xq + r0 * d2, std::min(mb, rpad - r0), d2, panel, pnorm, nch,
                          static_cast<int32_t>(c0), best + r0, thr + r0, band + r0,
                          count + r0, codes + r0 * CAP, scores + r0 * CAP};
          if (kern == FastKernel::Amx)
            fast_block_amx(a, c0 == 0 ? seed_steps : 0);
          else
            fast_block_avx512bf16(a, c0 == 0 ? seed_steps : 0);
        }
      }
      // 3. Candidates within the final band, decided in the float64 direct form (rows take
      // one to 64 direct-form distances: dynamic chunks).
#pragma omp for schedule(dynamic, 64)
      for (int64_t r = 0; r < rows; ++r) {
        if (count[r] > CAP) continue;
        const float* xrow = row_f32(x, dtype, s0 + r, d, xr.data());
        int64_t bi = -1;
        double bdist = std::numeric_limits<double>::infinity();
        const int32_t* cr = codes + r * CAP;
        const float* sr = scores + r * CAP;
        for (int32_t i = 0; i < count[r]; ++i) {
          if (!(sr[i] <= thr[r])) continue;
          const double dd = direct_dist(df, xrow, codebook, dtype, cr[i], d, crow.data());
          if (dd < bdist || (dd == bdist && cr[i] < bi)) bdist = dd, bi = cr[i];
        }
        out_idx[s0 + r] = bi;
        out_dist[s0 + r] = static_cast<float>(bdist);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      if (count[r] > CAP) fallback.push_back(s0 + r);
  }

  NearestStats stats;
  stats.isa = fast_kernel_name(kern);
  stats.exact_rows = static_cast<int64_t>(fallback.size());
  if (!fallback.empty()) {  // the exact search on the gathered rows
    // (more than kFastCap candidates: on duplicated codes, most likely; set them aside at once)
    const CodeNorms dd = stats.exact_rows >= kDedupMinRows ? deduped_norms(codebook, dtype, k, d) : CodeNorms{};
    exact_on_rows(x, codebook, fallback, k, d, dtype, out_idx, out_dist, dd.norms.empty() ? nullptr : &dd);
  }
  return stats;
}

}  // namespace nearest_detail

#ifdef VQTOK_NO_AMX  // built without the AMX kernel (compiler too old): fast runs the exact path
namespace nearest_detail {
bool amx_bf16_usable() { return false; }
void fast_block_amx(const FastBlockArgs&, int64_t) {}
}  // namespace nearest_detail
#endif

namespace nearest_detail {
FastKernel fast_kernel() {
  if (active_isa() != Isa::Avx512) return FastKernel::None;
  const char* env = std::getenv("VQTOK_NEAREST_FAST_KERNEL");
  const bool any = env == nullptr || *env == '\0';
  if ((any || std::strcmp(env, "amx-bf16") == 0) && amx_bf16_usable()) return FastKernel::Amx;
  if ((any || std::strcmp(env, "avx512-bf16") == 0) && has_avx512_bf16()) return FastKernel::Avx512Bf16;
  return FastKernel::None;
}

const char* fast_kernel_name(FastKernel kern) {
  switch (kern) {
    case FastKernel::Amx: return "amx-bf16";
    case FastKernel::Avx512Bf16: return "avx512-bf16";
    default: return "";
  }
}

// nearest_fast_runs for the kernel `kern` (the environment read once per search).
bool fast_runs(FastKernel kern, int64_t k, int64_t d) {
  if (kern == FastKernel::None) return false;
  const char* env = std::getenv("VQTOK_NEAREST_FAST");
  if (env != nullptr && std::strcmp(env, "always") == 0) return true;
  // Below ~k d^2 = 2^19 (d = 8: 8192 codes; d = 16: 2048; d = 32: 512) the fp32 register kernel
  // is as fast or faster: the bands, the packing and the candidates' direct-form distances cost
  // per row, and a TDPBF16PS costs the same for 1..32 features (measured on a 2-core Sapphire
  // Rapids for AMX and a 2-core Zen 4 for AVX512-BF16, where the crossover fell between 2^18 and
  // 2^20 at d = 8 and 16).
  return k * d * d >= (int64_t{1} << 19);
}
}  // namespace nearest_detail

const char* nearest_fast_kernel() { return nearest_detail::fast_kernel_name(nearest_detail::fast_kernel()); }

bool nearest_fast_available() { return nearest_detail::fast_kernel() != nearest_detail::FastKernel::None; }

bool nearest_fast_kernel_usable(const char* name) {
  if (detected_isa() != Isa::Avx512) return false;
  if (std::strcmp(name, "amx-bf16") == 0) return nearest_detail::amx_bf16_usable();
  return std::strcmp(name, "avx512-bf16") == 0 && has_avx512_bf16();
}

bool nearest_fast_runs(int64_t k, int64_t d) {
  return nearest_detail::fast_runs(nearest_detail::fast_kernel(), k, d);
}

NearestLayout nearest_layout(int64_t n, int64_t k, int64_t d) {
  return nearest_detail::layout_of(nearest_detail::pick_kernel(d), n, k, d);
}

NearestStats nearest_code_l2(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                             DType dtype, bool fast, int64_t* out_idx, float* out_dist) {
  const nearest_detail::FastKernel kern = fast && n > 0 ? nearest_detail::fast_kernel() : nearest_detail::FastKernel::None;
  if (nearest_detail::fast_runs(kern, k, d))
    return nearest_detail::nearest_code_l2_fast(x, codebook, n, k, d, dtype, kern, out_idx, out_dist);
  return nearest_detail::nearest_exact(x, codebook, n, k, d, dtype, out_idx, out_dist);
}

}  // namespace vqtok
