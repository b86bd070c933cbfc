// Private to kernels/cpu/fsq_lfq*.cpp: the FSQ/LFQ kernels written once over a small set of
// vector operations, instantiated for scalar, AVX2 and AVX-512 code in separate translation units.
//
// tanh. The reference runs torch.tanh on fp32, which on CPU is MKL's vsTanh: within an ulp, but
// not correctly rounded (about 0.8% of fp32 inputs differ by one ulp from tanh evaluated in double
// and rounded) and closed-source, so its exact bits cannot be reproduced portably. The kernels use
// the one definition every backend can share: tanh evaluated in double (error a few 2^-53) and
// rounded once to fp32, i.e. torch.tanh(x.double()).float() up to events of probability ~2^-28
// per value. FSQ codes and indices therefore equal the reference's for ordinary levels (a one-ulp
// tanh difference moves a code only when half_l * ulp(t) reaches a rounding boundary: ~1e-9 per
// value at L = 8, ~1e-5 at L = 2^16, routinely for L ~ 2^30); gradients equal the reference
// formula with the correctly rounded tanh, within one tanh ulp of torch's fp32 one.
// All other arithmetic repeats the reference's fp32 operations in the same order. Multiply-adds
// that must be fused are explicit fma calls, and nothing else may be fused: each including file
// starts with `#pragma GCC optimize("fp-contract=off")`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "vqtok/fsq_lfq.h"

namespace vqtok {
namespace fsq_lfq_detail {

// FSQ forward by thresholds. Per column the code q(z) = rint(tanh(z + shift) * half_l - offset)
// is a non-decreasing function of the fp32 input z (each step, fp32 rounding included, is
// monotone), so q(z) = q_min + #{v : z >= thr_v}, thr_v the smallest float with q >= v. The
// thresholds are found once per call by searching the float line with this file's own scalar q
// (fsq_thresholds, fsq_lfq.cpp), so the vector forward needs n compares per value instead of a
// double-precision tanh and gives the same bits. n = 0 (more than kFsqMaxThresholds code steps in
// some column): the forward evaluates tanh directly.
constexpr int kFsqMaxThresholds = 31;
struct FsqThresholds {
  int n = 0;                // thresholds per column; columns with fewer are NaN-padded (z >= NaN is false)
  std::vector<float> qmin;  // [d] q(-FLT_MAX): the lowest code step
  std::vector<float> thr;   // [d][n]
};
FsqThresholds fsq_thresholds(const FsqArgs& a);

// Per-ISA entry points (defined in fsq_lfq_avx2.cpp / fsq_lfq_avx512.cpp); same contract as the
// public functions in vqtok/fsq_lfq.h, rows [r0, r1) only, single-threaded.
int64_t fsq_forward_rows_avx512(const FsqArgs& a, const FsqThresholds& th, int64_t r0, int64_t r1);
void fsq_backward_rows_avx512(const FsqArgs& a, int64_t r0, int64_t r1);
int64_t lfq_forward_rows_avx512(const LfqArgs& a, int64_t r0, int64_t r1);
double fma_peak_avx512(double seconds);
float fma_peak_chain_sum_avx512(int64_t iters);
int64_t fsq_forward_rows_avx2(const FsqArgs& a, const FsqThresholds& th, int64_t r0, int64_t r1);
void fsq_backward_rows_avx2(const FsqArgs& a, int64_t r0, int64_t r1);
int64_t lfq_forward_rows_avx2(const LfqArgs& a, int64_t r0, int64_t r1);
double fma_peak_avx2(double seconds);
float fma_peak_chain_sum_avx2(int64_t iters);
int64_t fsq_forward_rows_scalar(const FsqArgs& a, const FsqThresholds& th, int64_t r0, int64_t r1);
void fsq_backward_rows_scalar(const FsqArgs& a, int64_t r0, int64_t r1);
int64_t lfq_forward_rows_scalar(const LfqArgs& a, int64_t r0, int64_t r1);
void tanh_range_avx512(const float* x, int64_t i0, int64_t i1, float* out);
void tanh_range_avx2(const float* x, int64_t i0, int64_t i1, float* out);
void tanh_range_scalar(const float* x, int64_t i0, int64_t i1, float* out);

// tanh_f's grid (below): tanh(i / kTanhGridPerUnit) for i < kTanhGridSize, in double (fsq_lfq.cpp).
constexpr int kTanhGridPerUnit = 64;
constexpr int kTanhGridSize = 10 * kTanhGridPerUnit + 1;  // a = 0, 1/64, ..., 10
const double* tanh_grid();

namespace {  // internal linkage: every TU gets its own copy compiled with its own ISA flags

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    int e = -1;
    do {  // normalise the subnormal
      man <<= 1;
      ++e;
    } while ((man & 0x400u) == 0);
    return bits_to_float(sign | uint32_t(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13));
  }
  return bits_to_float(sign | (exp + 127 - 15) << 23 | (man << 13));
}

inline float load_scalar(const void* p, int64_t i, InputType dt) {
  switch (dt) {
    case InputType::F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case InputType::BF16: return bits_to_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
    default: return static_cast<const float*>(p)[i];
  }
}

// near_midpoint's band: (bits + kMidpointOffset) mod 2^29 < kMidpointBand  <=>  |low 29 bits - 2^28| < 2^13
constexpr int64_t kLow29 = (int64_t(1) << 29) - 1;
constexpr int64_t kMidpointOffset = (int64_t(1) << 13) - (int64_t(1) << 28);
constexpr int64_t kMidpointBand = int64_t(1) << 14;

// ---------------------------------------------------------------------------------------------
// Vector operations: W fp32 lanes (F) and the same lanes as two halves of doubles (D).
// fmadd(a,b,c) = a*b+c and dfnmadd(a,b,c) = c-a*b are fused; everything else rounds once.
// ---------------------------------------------------------------------------------------------
struct ScalarOps {
  using F = float;
  using D = double;
  static constexpr int W = 1;
  static F set1(float v) { return v; }
  static F load(const void* p, int64_t i, InputType dt) { return load_scalar(p, i, dt); }
  static F loadf(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F fmadd(F a, F b, F c) { return std::fma(a, b, c); }
  static F abs(F a) { return std::fabs(a); }
  static F rint(F a) { return std::nearbyint(a); }  // half to even in the default rounding mode
  // q + #{v < n : z >= thr[v * stride]} (false for NaN), the count added once as an exact integer
  static F add_count_ge(F q, F z, const float* thr, int n, int64_t stride) {
    int c = 0;
    for (int v = 0; v < n; ++v) c += z >= thr[v * stride];
    return q + float(c);
  }
  static F min(F a, F b) { return a < b ? a : b; }  // b when either is NaN (as minps)
  static uint32_t neq_mask(F a, F b) { return !(a == b); }  // bit i: a_i != b_i or either is NaN
  static F mulsign(F x, F y) { return bits_to_float(float_to_bits(x) ^ (float_to_bits(y) & 0x80000000u)); }
  // number of lanes holding NaN or +-Inf (exponent bits all ones)
  static int nonfinite(F x) { return (float_to_bits(x) & 0x7f800000u) == 0x7f800000u; }
  static D dset1(double v) { return v; }
  static D dadd(D a, D b) { return a + b; }
  static D dsub(D a, D b) { return a - b; }
  static D dmul(D a, D b) { return a * b; }
  static D ddiv(D a, D b) { return a / b; }
  static D dmin(D a, D b) { return a < b ? a : b; }
  static D drint(D a) { return std::nearbyint(a); }
  static D dfmadd(D a, D b, D c) { return std::fma(a, b, c); }
  static D dfnmadd(D a, D b, D c) { return std::fma(-a, b, c); }
  static D dpow2(D k) { return std::ldexp(1.0, int(k)); }  // k integer-valued, |k| < 1023
  static void split(F x, D& lo, D& hi) { lo = x, hi = 0.0; }
  static F join(D lo, D) { return static_cast<float>(lo); }
  // t[i] for the integer-valued lanes i of x (in [0, 2^31)), as the two halves of split
  static void dgather(const double* t, F x, D& lo, D& hi) { lo = t[int(x)], hi = t[0]; }
  // bit i: the low 29 bits of lane i's double (the part fp32 rounding drops) lie within 2^13 of
  // the halfway point 2^28, i.e. the lane is within 2^-39 (relative) of an fp32 rounding midpoint
  static uint32_t near_midpoint(D lo, D) {
    uint64_t b;
    std::memcpy(&b, &lo, 8);
    return ((b + kMidpointOffset) & kLow29) < kMidpointBand;
  }
  // bit i = (x_i > 0); stores the +-1 codes
  static uint32_t sign_codes(F x, float* out) {
    *out = x > 0.0f ? 1.0f : -1.0f;
    return x > 0.0f;
  }
  // index of each of W rows from a W x d block of float digits (int32 wrap-around arithmetic);
  // lanes: basis[i % d] for lane i of a vector (W entries, precomputed once per call)
  static void index_block_i32(const float* dig, int d, const int32_t* basis, const int32_t*, int32_t* out) {
    uint32_t acc = 0;
    for (int j = 0; j < d; ++j) acc += uint32_t(int32_t(dig[j])) * uint32_t(basis[j]);
    *out = int32_t(acc);
  }
};

#ifdef __AVX2__
// Indices of 8 rows whose d (2, 4 or 8) digits lie in d consecutive vectors of dig: digit * basis
// per lane (int32 wrap-around, like the scalar loop), then in-lane horizontal adds
// (_mm256_hadd_epi32 works within each 128-bit half) and one permutation into row order.
// lanes: basis[i % d] for lane i (precomputed: building it here cost 8 integer divisions a block).
inline void index_block_i32_pow2_avx2(const float* dig, int d, const int32_t* lanes, int32_t* out) {
  const __m256i bp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes));
  __m256i p[8];
  for (int k = 0; k < d; ++k) p[k] = _mm256_mullo_epi32(_mm256_cvttps_epi32(_mm256_loadu_ps(dig + k * 8)), bp);
  __m256i r;
  if (d == 2) {  // p0 = rows 0-3, p1 = rows 4-7 (two lanes a row): [r0 r1 r4 r5 | r2 r3 r6 r7]
    r = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
  } else if (d == 4) {  // p_k = rows 2k (low half), 2k+1 (high half): [r0 r2 r4 r6 | r1 r3 r5 r7]
    const __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    r = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  } else {  // p_k = row k: [r0..r3 first half sums | r0..r3 second half sums], then rows 4-7 alike
    const __m256i b0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    r = _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), r);
}

struct Avx2Ops {
  using F = __m256;
  using D = __m256d;
  static constexpr int W = 8;
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const void* p, int64_t i, InputType dt) {
    const auto* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i);
    switch (dt) {
      case InputType::F16: return _mm256_cvtph_ps(_mm_loadu_si128(h));
      case InputType::BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
      default: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    }
  }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static F rint(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F add_count_ge(F q, F z, const float* thr, int n, int64_t stride) {  // two chains of -1 masks
    __m256i c0 = _mm256_setzero_si256(), c1 = _mm256_setzero_si256();
    int v = 0;
    for (; v + 2 <= n; v += 2) {
      c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(z, _mm256_loadu_ps(thr + v * stride), _CMP_GE_OQ)));
      c1 = _mm256_sub_epi32(c1, _mm256_castps_si256(_mm256_cmp_ps(z, _mm256_loadu_ps(thr + (v + 1) * stride), _CMP_GE_OQ)));
    }
    if (v < n) c0 = _mm256_sub_epi32(c0, _mm256_castps_si256(_mm256_cmp_ps(z, _mm256_loadu_ps(thr + v * stride), _CMP_GE_OQ)));
    return _mm256_add_ps(q, _mm256_cvtepi32_ps(_mm256_add_epi32(c0, c1)));
  }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static uint32_t neq_mask(F a, F b) { return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ))); }
  static F mulsign(F x, F y) { return _mm256_xor_ps(x, _mm256_and_ps(y, _mm256_set1_ps(-0.0f))); }
  static int nonfinite(F x) {
    const __m256i e = _mm256_set1_epi32(0x7f800000);
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), e), e);
    return __builtin_popcount(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(m))));
  }
  static D dset1(double v) { return _mm256_set1_pd(v); }
  static D dadd(D a, D b) { return _mm256_add_pd(a, b); }
  static D dsub(D a, D b) { return _mm256_sub_pd(a, b); }
  static D dmul(D a, D b) { return _mm256_mul_pd(a, b); }
  static D ddiv(D a, D b) { return _mm256_div_pd(a, b); }
  static D dmin(D a, D b) { return _mm256_min_pd(a, b); }
  static D drint(D a) { return _mm256_round_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static D dfmadd(D a, D b, D c) { return _mm256_fmadd_pd(a, b, c); }
  static D dfnmadd(D a, D b, D c) { return _mm256_fnmadd_pd(a, b, c); }
  static D dpow2(D k) {  // 1.5 * 2^52 + k holds k in its low bits; (k + 1023) << 52 is 2^k
    const __m256i b = _mm256_castpd_si256(_mm256_add_pd(k, _mm256_set1_pd(6755399441055744.0)));
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(b, _mm256_set1_epi64x(1023)), 52));
  }
  static void split(F x, D& lo, D& hi) {
    lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
  }
  static F join(D lo, D hi) { return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo)); }
  static uint32_t near_midpoint(D lo, D hi) {
    const __m256i off = _mm256_set1_epi64x(kMidpointOffset), low = _mm256_set1_epi64x(kLow29);
    const __m256i band = _mm256_set1_epi64x(kMidpointBand);
    const __m256i a = _mm256_and_si256(_mm256_add_epi64(_mm256_castpd_si256(lo), off), low);
    const __m256i b = _mm256_and_si256(_mm256_add_epi64(_mm256_castpd_si256(hi), off), low);
    return uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(band, a)))) |
           uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(band, b)))) << 4;
  }
  static void dgather(const double* t, F x, D& lo, D& hi) {
    const __m256i i = _mm256_cvtps_epi32(x);
    lo = _mm256_i32gather_pd(t, _mm256_castsi256_si128(i), 8);
    hi = _mm256_i32gather_pd(t, _mm256_extracti128_si256(i, 1), 8);
  }
  static uint32_t sign_codes(F x, float* out) {
    const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
    _mm256_storeu_ps(out, _mm256_blendv_ps(_mm256_set1_ps(-1.0f), _mm256_set1_ps(1.0f), pos));
    return uint32_t(_mm256_movemask_ps(pos));
  }
  static void index_block_i32(const float* dig, int d, const int32_t* basis, const int32_t* lanes, int32_t* out) {
    if (d == 2 || d == 4 || d == 8) {  // rows never straddle a vector: no gathers
      index_block_i32_pow2_avx2(dig, d, lanes, out);
      return;
    }
    const __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(d));
    __m256i acc = _mm256_setzero_si256();
    for (int j = 0; j < d; ++j) {
      const __m256i v = _mm256_cvttps_epi32(_mm256_i32gather_ps(dig + j, rows, 4));
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(v, _mm256_set1_epi32(basis[j])));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), acc);
  }
};
#endif

#ifdef __AVX512F__
// Indices of 16 rows whose d (a power of two up to 16) digits lie in d consecutive vectors of
// dig: each vector holds 16/d whole rows. digit * basis per lane, then log2(d) shuffle-adds leave
// each row's sum in its first lane (int32 wrap-around, like the scalar loop), compressed out.
// lanes: basis[i % d] for lane i (precomputed once per call: building it here cost 16 integer
// divisions a block; without them the forward took 1.39 ms instead of 1.93 at N = 2^20 on Zen 4,
// medians of five `vqtok bench --suite elementwise` runs each).
inline void index_block_i32_pow2(const float* dig, int d, const int32_t* lanes, int32_t* out) {
  const __m512i bp = _mm512_loadu_si512(lanes);
  const __mmask16 first = d == 2 ? 0x5555 : d == 4 ? 0x1111 : d == 8 ? 0x0101 : 0x0001;
  for (int k = 0; k < d; ++k) {
    __m512i v = _mm512_mullo_epi32(_mm512_cvttps_epi32(_mm512_loadu_ps(dig + k * 16)), bp);
    v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_CDAB));  // + neighbour
    if (d >= 4) v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));  // + other pair
    if (d >= 8) v = _mm512_add_epi32(v, _mm512_shuffle_i32x4(v, v, 0xB1));  // + other 128-bit lane
    if (d >= 16) v = _mm512_add_epi32(v, _mm512_shuffle_i32x4(v, v, 0x4E));  // + other 256-bit half
    // compress in a register, then a masked store: the memory form of vpcompressd is a long
    // microcoded sequence on AMD Zen 4, where it was most of the FSQ forward's time
    const __m512i packed = _mm512_maskz_compress_epi32(first, v);
    _mm512_mask_storeu_epi32(out + k * (16 / d), __mmask16((1u << (16 / d)) - 1u), packed);
  }
}

struct Avx512Ops {
  using F = __m512;
  using D = __m512d;
  static constexpr int W = 16;
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const void* p, int64_t i, InputType dt) {
    const auto* h = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i);
    switch (dt) {
      case InputType::F16: return _mm512_cvtph_ps(_mm256_loadu_si256(h));
      case InputType::BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(h)), 16));
      default: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    }
  }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static F rint(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F add_count_ge(F q, F z, const float* thr, int n, int64_t stride) {  // two chains of masked +1
    const __m512i one = _mm512_set1_epi32(1);
    __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
    int v = 0;
    for (; v + 2 <= n; v += 2) {
      c0 = _mm512_mask_add_epi32(c0, _mm512_cmp_ps_mask(z, _mm512_loadu_ps(thr + v * stride), _CMP_GE_OQ), c0, one);
      c1 = _mm512_mask_add_epi32(c1, _mm512_cmp_ps_mask(z, _mm512_loadu_ps(thr + (v + 1) * stride), _CMP_GE_OQ), c1, one);
    }
    if (v < n) c0 = _mm512_mask_add_epi32(c0, _mm512_cmp_ps_mask(z, _mm512_loadu_ps(thr + v * stride), _CMP_GE_OQ), c0, one);
    return _mm512_add_ps(q, _mm512_cvtepi32_ps(_mm512_add_epi32(c0, c1)));
  }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static uint32_t neq_mask(F a, F b) { return uint32_t(_mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ)); }
  static F mulsign(F x, F y) {
    return _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(x), _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(int(0x80000000u)))));
  }
  static int nonfinite(F x) {
    const __m512i e = _mm512_set1_epi32(0x7f800000);
    return __builtin_popcount(uint32_t(_mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), e), e)));
  }
  static D dset1(double v) { return _mm512_set1_pd(v); }
  static D dadd(D a, D b) { return _mm512_add_pd(a, b); }
  static D dsub(D a, D b) { return _mm512_sub_pd(a, b); }
  static D dmul(D a, D b) { return _mm512_mul_pd(a, b); }
  static D ddiv(D a, D b) { return _mm512_div_pd(a, b); }
  static D dmin(D a, D b) { return _mm512_min_pd(a, b); }
  static D drint(D a) { return _mm512_roundscale_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static D dfmadd(D a, D b, D c) { return _mm512_fmadd_pd(a, b, c); }
  static D dfnmadd(D a, D b, D c) { return _mm512_fnmadd_pd(a, b, c); }
  static D dpow2(D k) {
    const __m512i b = _mm512_castpd_si512(_mm512_add_pd(k, _mm512_set1_pd(6755399441055744.0)));
    return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(b, _mm512_set1_epi64(1023)), 52));
  }
  static void split(F x, D& lo, D& hi) {
    lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  }
  static F join(D lo, D hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(lo))),
                                               _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
  }
  static uint32_t near_midpoint(D lo, D hi) {
    const __m512i off = _mm512_set1_epi64(kMidpointOffset), low = _mm512_set1_epi64(kLow29);
    const __m512i band = _mm512_set1_epi64(kMidpointBand);
    const __m512i a = _mm512_and_si512(_mm512_add_epi64(_mm512_castpd_si512(lo), off), low);
    const __m512i b = _mm512_and_si512(_mm512_add_epi64(_mm512_castpd_si512(hi), off), low);
    return uint32_t(_mm512_cmplt_epi64_mask(a, band)) | uint32_t(_mm512_cmplt_epi64_mask(b, band)) << 8;
  }
  static void dgather(const double* t, F x, D& lo, D& hi) {
    const __m512i i = _mm512_cvtps_epi32(x);
    lo = _mm512_i32gather_pd(_mm512_castsi512_si256(i), t, 8);
    hi = _mm512_i32gather_pd(_mm512_extracti64x4_epi64(i, 1), t, 8);
  }
  static uint32_t sign_codes(F x, float* out) {
    const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_storeu_ps(out, _mm512_mask_blend_ps(pos, _mm512_set1_ps(-1.0f), _mm512_set1_ps(1.0f)));
    return pos;
  }
  static void index_block_i32(const float* dig, int d, const int32_t* basis, const int32_t* lanes, int32_t* out) {
    if (d == 2 || d == 4 || d == 8 || d == 16) {  // rows never straddle a vector: no gathers
      index_block_i32_pow2(dig, d, lanes, out);
      return;
    }
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(d));
    __m512i acc = _mm512_setzero_si512();
    for (int j = 0; j < d; ++j) {
      const __m512i v = _mm512_cvttps_epi32(_mm512_i32gather_ps(rows, dig + j, 4));
      acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(v, _mm512_set1_epi32(basis[j])));
    }
    _mm512_storeu_si512(out, acc);
  }
};
#endif
// ---------------------------------------------------------------------------------------------
// tanh_f_exact: double evaluation, one rounding to fp32 (see the file comment). For finite x only.
//   tanh|x| = m / (m + 2) with m = expm1(2|x|); 2|x| = k ln2 + r, |r| <= ln2/2, and
//   expm1(2|x|) = 2^k expm1(r) + (2^k - 1), expm1(r) = r + r^2 (1/2! + r/3! + ... + r^11/13!)
//   (truncation error < 2^-56). Past |x| = 10 the result rounds to 1 in fp32; clamping 2|x| at
//   20 keeps 2^k in range.
//   The quotient without a double division (whose throughput bounds the whole kernel): y0 =
//   1/(m + 2) in fp32 (one division for all W lanes, relative error < 2^-23), one Newton step
//   y1 = y0 + y0 (1 - (m + 2) y0) (error ~2^-46), then q0 = m y1 and the residual correction
//   q = q0 + y1 (m - (m + 2) q0), accurate to about an ulp of double like the division it replaces.
//   Every ISA runs the same operations (an fp32 division is correctly rounded everywhere), so
//   all levels give the same bits.
// ---------------------------------------------------------------------------------------------
template <class O>
inline typename O::D expm1_2abs_d(typename O::D ax) {  // expm1(2|x|), 2|x| clamped at 20
  using D = typename O::D;
  const D t2 = O::dmin(O::dadd(ax, ax), O::dset1(20.0));
  const D k = O::drint(O::dmul(t2, O::dset1(1.44269504088896338700e+00)));
  D r = O::dfnmadd(k, O::dset1(6.93147180369123816490e-01), t2);  // ln2 hi: k * hi is exact
  r = O::dfnmadd(k, O::dset1(1.90821492927058770002e-10), r);      // ln2 lo
  static constexpr double kInvFact[12] = {
      1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
      1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,      1.0 / 6.0,      1.0 / 2.0};
  D p = O::dset1(kInvFact[0]);
  for (int i = 1; i < 12; ++i) p = O::dfmadd(p, r, O::dset1(kInvFact[i]));
  const D em = O::dfmadd(O::dmul(r, r), p, r);  // expm1(r)
  const D s = O::dpow2(k);
  return O::dfmadd(s, em, O::dsub(s, O::dset1(1.0)));
}

template <class O>
inline typename O::D quotient_d(typename O::D m, typename O::D den, typename O::D y0) {  // m / den
  using D = typename O::D;
  const D y1 = O::dfmadd(y0, O::dfnmadd(den, y0, O::dset1(1.0)), y0);
  const D q0 = O::dmul(m, y1);
  return O::dfmadd(O::dfnmadd(den, q0, m), y1, q0);
}

template <class O>
inline typename O::F tanh_f_exact(typename O::F x) {
  using D = typename O::D;
  D lo, hi;
  O::split(O::abs(x), lo, hi);
  const D mlo = expm1_2abs_d<O>(lo), mhi = expm1_2abs_d<O>(hi);
  const D dlo = O::dadd(mlo, O::dset1(2.0)), dhi = O::dadd(mhi, O::dset1(2.0));
  D ylo, yhi;
  O::split(O::div(O::set1(1.0f), O::join(dlo, dhi)), ylo, yhi);
  return O::mulsign(O::join(quotient_d<O>(mlo, dlo, ylo), quotient_d<O>(mhi, dhi, yhi)), x);
}

// ---------------------------------------------------------------------------------------------
// tanh: the same bits as tanh_f_exact, faster. With a = i/64 the grid point nearest |x| (|x|
// clamped at 10, where both round to 1) and h = |x| - a (exact in double, |h| <= 2^-7):
//   tanh|x| = (tanh a + tanh h) / (1 + u),  u = tanh a * tanh h,  |u| <= 2^-7,
//   tanh h = h + h^3 (-1/3 + 2/15 h^2)  (relative truncation error 17/315 h^6 < 2^-46),
//   1 / (1 + u) = (1 - u)(1 + u^2)(1 + u^4) / (1 - u^8)  (dropping 1 - u^8: error < 2^-56),
// and tanh a from tanh_grid() (tanh_f_exact's expm1 and a double division: a few 2^-53). The double
// q so computed is within 2^-45 of tanh|x| (relative), and so is tanh_f_exact's double value.
// fp32 rounding keeps the top 24 of the 53 significant bits; when the 29 bits it drops lie more
// than 2^13 double ulps (2^-40 relative, or more) from the halfway point, every value within
// 2^-45 of q rounds as q does, so q rounded is tanh_f_exact's result. Otherwise (~2^-15 of
// inputs; and NaN) the lane is recomputed by tanh_f_exact. fp32-subnormal results occur only for
// |x| < 2^-126, where q = |x| exactly (its dropped bits are zero). Every ISA therefore gives
// tanh_f_exact's bits, whatever its gathers and conversions.
// ---------------------------------------------------------------------------------------------
template <class O>
inline typename O::D tanh_near_grid_d(typename O::D ax, typename O::D i, typename O::D ta) {
  using D = typename O::D;
  const D h = O::dfnmadd(i, O::dset1(1.0 / kTanhGridPerUnit), ax);  // exact
  const D h2 = O::dmul(h, h);
  const D th = O::dfmadd(O::dmul(h, h2), O::dfmadd(O::dset1(2.0 / 15.0), h2, O::dset1(-1.0 / 3.0)), h);
  const D u = O::dmul(ta, th);
  const D u2 = O::dmul(u, u), u4 = O::dmul(u2, u2);
  const D q1 = O::dmul(O::dadd(ta, th), O::dsub(O::dset1(1.0), u));
  const D q2 = O::dfmadd(q1, u2, q1);
  return O::dfmadd(q2, u4, q2);
}

// Lanes of t in `lanes` recomputed by tanh_f_exact (kept out of line: rarely taken).
template <class O>
__attribute__((noinline)) typename O::F tanh_patch_lanes(typename O::F x, typename O::F t, uint32_t lanes) {
  float xs[O::W], ts[O::W];
  O::store(xs, x);
  O::store(ts, t);
  for (int i = 0; i < O::W; ++i)
    if ((lanes >> i) & 1u) ts[i] = tanh_f_exact<ScalarOps>(xs[i]);
  return O::loadf(ts);
}

template <class O>
inline typename O::F tanh_f(typename O::F x, const double* grid) {
  using F = typename O::F;
  using D = typename O::D;
  const F ax = O::min(O::set1(10.0f), O::abs(x));  // NaN stays NaN
  const F i = O::rint(O::min(O::mul(ax, O::set1(float(kTanhGridPerUnit))), O::set1(float(kTanhGridSize - 1))));  // NaN -> last
  D axlo, axhi, ilo, ihi, tlo, thi;
  O::split(ax, axlo, axhi);
  O::split(i, ilo, ihi);
  O::dgather(grid, i, tlo, thi);
  const D qlo = tanh_near_grid_d<O>(axlo, ilo, tlo), qhi = tanh_near_grid_d<O>(axhi, ihi, thi);
  const F t = O::mulsign(O::join(qlo, qhi), x);
  const uint32_t unsure = O::near_midpoint(qlo, qhi) | O::neq_mask(ax, ax);
  if (__builtin_expect(unsure != 0, 0)) return tanh_patch_lanes<O>(x, t, unsure);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Row kernels. A block is W rows = W*d contiguous values = d vectors; lane i of vector k holds
// column (k*W + i) % d, so every constant becomes d precomputed lane patterns. Rows past the
// last full block run the same code on ScalarOps.
// ---------------------------------------------------------------------------------------------
struct FsqPatterns {
  // [5][d][W]: half_l, offset, shift, half_width, grad_scale; plus int32 basis [d]
  std::vector<float> p;
  // threshold forward: [d][W] q_min and [n][d][W] thresholds (empty when th.n == 0)
  std::vector<float> qmin, thr;
  std::vector<int32_t> basis32, basis_lanes;  // basis [d]; basis_lanes [w]: basis[i % d] for lane i
  const double* grid = tanh_grid();
  int d = 0, w = 0, n = 0;
  FsqPatterns(const FsqArgs& a, int w_, const FsqThresholds* th = nullptr) : d(a.d), w(w_) {
    p.resize(size_t(5) * d * w);
    const float* src[5] = {a.half_l, a.offset, a.shift, a.half_width, a.grad_scale};
    for (int c = 0; c < 5; ++c)
      for (int k = 0; k < d; ++k)
        for (int i = 0; i < w; ++i) p[(size_t(c) * d + k) * w + i] = src[c] ? src[c][(k * w + i) % d] : 0.0f;
    if (th != nullptr && th->n > 0) {
      n = th->n;
      qmin.resize(size_t(d) * w);
      thr.resize(size_t(n) * d * w);
      for (int k = 0; k < d; ++k)
        for (int i = 0; i < w; ++i) {
          const int col = (k * w + i) % d;
          qmin[size_t(k) * w + i] = th->qmin[col];
          for (int v = 0; v < n; ++v) thr[(size_t(v) * d + k) * w + i] = th->thr[size_t(col) * n + v];
        }
    }
    basis32.resize(d);
    for (int j = 0; j < d; ++j) basis32[j] = int32_t(uint32_t(uint64_t(a.basis[j])));
    basis_lanes.resize(w);
    for (int i = 0; i < w; ++i) basis_lanes[i] = basis32[i % d];
  }
  const float* at(int c, int k) const { return p.data() + (size_t(c) * d + k) * w; }
  const float* qmin_at(int k) const { return qmin.data() + size_t(k) * w; }
  const float* thr_at(int v, int k) const { return thr.data() + (size_t(v) * d + k) * w; }
};

// Returns the number of non-finite values of z in the block (their codes are meaningless).
template <class O>
inline int fsq_forward_block(const FsqArgs& a, const FsqPatterns& pt, int64_t row, float* dig) {
  using F = typename O::F;
  constexpr int W = O::W;
  const int d = a.d;
  const int64_t base = row * d;
  int bad = 0;
  for (int k = 0; k < d; ++k) {
    const F z = O::load(a.z, base + int64_t(k) * W, a.dtype);
    bad += O::nonfinite(z);
    F q;
    if (pt.n > 0) {
      q = O::add_count_ge(O::loadf(pt.qmin_at(k)), z, pt.thr_at(0, k), pt.n, int64_t(d) * W);
    } else {
      const F t = tanh_f<O>(O::add(z, O::loadf(pt.at(2, k))), pt.grid);
      q = O::rint(O::sub(O::mul(t, O::loadf(pt.at(0, k))), O::loadf(pt.at(1, k))));
    }
    const F hw = O::loadf(pt.at(3, k));
    O::store(a.codes + base + int64_t(k) * W, O::div(q, hw));
    O::store(dig + k * W, O::add(q, hw));
  }
  if (a.indices_int64) {
    int64_t* out = static_cast<int64_t*>(a.indices) + row;
    for (int r = 0; r < W; ++r) {
      uint64_t acc = 0;
      for (int j = 0; j < d; ++j) acc += uint64_t(int64_t(dig[r * d + j])) * uint64_t(a.basis[j]);
      out[r] = int64_t(acc);
    }
  } else {
    O::index_block_i32(dig, d, pt.basis32.data(), pt.basis_lanes.data(), static_cast<int32_t*>(a.indices) + row);
  }
  return bad;
}

// Rows [r0, r1); returns how many values of z there are NaN or +-Inf.
template <class O>
int64_t fsq_forward_rows(const FsqArgs& a, const FsqThresholds& th, int64_t r0, int64_t r1) {
  constexpr int W = O::W;
  const FsqPatterns pv(a, W, &th), ps(a, 1, &th);
  std::vector<float> dig(size_t(W) * a.d);
  int64_t r = r0, bad = 0;
  for (; r + W <= r1; r += W) bad += fsq_forward_block<O>(a, pv, r, dig.data());
  for (; r < r1; ++r) bad += fsq_forward_block<ScalarOps>(a, ps, r, dig.data());
  return bad;
}

template <class O>
inline void fsq_backward_block(const FsqArgs& a, const FsqPatterns& pt, int64_t row) {
  using F = typename O::F;
  constexpr int W = O::W;
  const int64_t base = row * a.d;
  for (int k = 0; k < a.d; ++k) {
    const int64_t i = base + int64_t(k) * W;
    const F t = tanh_f<O>(O::add(O::load(a.z, i, a.dtype), O::loadf(pt.at(2, k))), pt.grid);
    const F g = O::mul(O::loadf(a.grad_codes + i), O::sub(O::set1(1.0f), O::mul(t, t)));
    O::store(a.grad_z + i, O::mul(g, O::loadf(pt.at(4, k))));
  }
}

template <class O>
void fsq_backward_rows(const FsqArgs& a, int64_t r0, int64_t r1) {
  constexpr int W = O::W;
  const FsqPatterns pv(a, W), ps(a, 1);
  int64_t r = r0;
  for (; r + W <= r1; r += W) fsq_backward_block<O>(a, pv, r);
  for (; r < r1; ++r) fsq_backward_block<ScalarOps>(a, ps, r);
}

inline int lfq_row_scalar(const LfqArgs& a, int64_t r) {
  uint64_t idx = 0;
  int bad = 0;
  const int64_t base = r * a.bits;
  for (int b = 0; b < a.bits; ++b) {
    const float v = load_scalar(a.z, base + b, a.dtype);
    bad += ScalarOps::nonfinite(v);
    idx |= uint64_t(ScalarOps::sign_codes(v, a.codes + base + b)) << b;
  }
  if (a.indices_int64) static_cast<int64_t*>(a.indices)[r] = int64_t(idx);
  else static_cast<int32_t*>(a.indices)[r] = int32_t(idx);
  return bad;
}

// 64 rows at a time: the sign bits of 64*bits values form one little-endian bit string, and row
// r's index is the `bits`-bit field at bit offset r*bits (one unaligned 64-bit load for bits <= 56).
// Returns how many values of z in rows [r0, r1) are NaN or +-Inf.
template <class O>
int64_t lfq_forward_rows(const LfqArgs& a, int64_t r0, int64_t r1) {
  constexpr int W = O::W;
  constexpr int G = 64;
  int64_t r = r0, bad = 0;
  if (W > 1 && a.bits <= 56) {
    const int n = G * a.bits;  // a multiple of W
    std::vector<uint8_t> bitbuf(size_t(n) / 8 + 16, 0);
    const uint64_t field = (uint64_t(1) << a.bits) - 1;
    for (; r + G <= r1; r += G) {
      const int64_t base = r * a.bits;
      for (int v = 0; v < n / W; ++v) {
        const typename O::F z = O::load(a.z, base + int64_t(v) * W, a.dtype);
        bad += O::nonfinite(z);
        const uint32_t m = O::sign_codes(z, a.codes + base + int64_t(v) * W);
        std::memcpy(bitbuf.data() + size_t(v) * W / 8, &m, W / 8);
      }
      for (int i = 0; i < G; ++i) {
        const int64_t off = int64_t(i) * a.bits;
        uint64_t word;
        std::memcpy(&word, bitbuf.data() + off / 8, 8);
        const uint64_t idx = (word >> (off % 8)) & field;
        if (a.indices_int64) static_cast<int64_t*>(a.indices)[r + i] = int64_t(idx);
        else static_cast<int32_t*>(a.indices)[r + i] = int32_t(idx);
      }
    }
  }
  for (; r < r1; ++r) bad += lfq_row_scalar(a, r);
  return bad;
}

template <class O>
void tanh_range(const float* x, int64_t i0, int64_t i1, float* out) {
  const double* grid = tanh_grid();
  int64_t i = i0;
  for (; i + O::W <= i1; i += O::W) O::store(out + i, tanh_f<O>(O::loadf(x + i), grid));
  for (; i < i1; ++i) out[i] = tanh_f<ScalarOps>(x[i], grid);
}

}  // namespace
}  // namespace fsq_lfq_detail
}  // namespace vqtok
