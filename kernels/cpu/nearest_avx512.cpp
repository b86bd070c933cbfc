// AVX-512 block kernels of the nearest-code search: 16 codes per zmm, 24 accumulators per
// micro-tile (6 x 4 or 12 x 2 zmm by d), broadcasts folded into the FMAs.
#include <immintrin.h>

#include "nearest_tile.h"

namespace vqtok::nearest_detail {
namespace {

struct Ops512 {
  using V = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static constexpr int kRegs = 32;  // vector registers
  static constexpr int64_t kSweepBytes = 0;  // small d: row tiles sweep the whole panel
  static constexpr int64_t kSweepMaxD = 16;  // row tiles sweep the panel up to this d
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static I set1i(int32_t x) { return _mm512_set1_epi32(x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // Lane update with score s of the code group starting at vbase: 4 ops. nl = lanes where s is
  // not below the best: they keep their index and fold s into the second best; the others move
  // the old best into the second best.
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static void update(V& b, V& s2, I& id, V s, I vbase) {
    const __mmask16 nl = _mm512_cmp_ps_mask(s, b, _CMP_NLT_UQ);
    id = _mm512_mask_blend_epi32(nl, vbase, id);
    s2 = _mm512_mask_min_ps(b, nl, s2, s);
    b = _mm512_min_ps(b, s);
  }
  static void reduce_row(const float* pb, const float* ps, const int32_t* pi, float& best,
                         float& sec, int32_t& code) {
    const V b = _mm512_load_ps(pb), s = _mm512_load_ps(ps);
    const I codes = _mm512_add_epi32(_mm512_load_si512(pi),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    best = _mm512_reduce_min_ps(b);
    const __mmask16 eq = _mm512_cmp_ps_mask(b, _mm512_set1_ps(best), _CMP_EQ_OQ);
    code = _mm512_mask_reduce_min_epi32(eq, codes);
    const __mmask16 win = _mm512_cmpeq_epi32_mask(codes, _mm512_set1_epi32(code));
    const V others = _mm512_mask_mov_ps(b, win, _mm512_set1_ps(__builtin_inff()));
    sec = _mm512_reduce_min_ps(_mm512_min_ps(s, others));
  }
};

// BlockKernel::pack_rows with 16x16 transposes: 16 features of the tile's MR rows (the rest zero)
// become 16 feature vectors, each stored as its MR floats; the features past the last multiple
// of 16 are copied one by one. The same floats as pack_rows<MR>, a fraction of its loads and stores.
template <int MR>
void pack_rows_t16(const float* xq, int64_t rows, int64_t d, float* xp) {
  static_assert(MR <= 16, "one 16x16 transpose per 16 features");
  const __mmask16 keep = static_cast<__mmask16>((1u << MR) - 1);
  for (int64_t t = 0; t < rows; t += MR) {
    float* dst = xp + t * d;
    const float* src = xq + t * d;
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
      __m512 v[16], u[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) v[r] = r < MR ? _mm512_loadu_ps(src + r * d + j) : _mm512_setzero_ps();
      // Within each 128-bit block k, rows 4g..4g+3 of features 4k..4k+3: u[4g + f] holds feature
      // 4k + f of those rows in block k.
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m512 lo01 = _mm512_unpacklo_ps(v[4 * g], v[4 * g + 1]), hi01 = _mm512_unpackhi_ps(v[4 * g], v[4 * g + 1]);
        const __m512 lo23 = _mm512_unpacklo_ps(v[4 * g + 2], v[4 * g + 3]), hi23 = _mm512_unpackhi_ps(v[4 * g + 2], v[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(lo01), _mm512_castps_pd(lo23)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(lo01), _mm512_castps_pd(lo23)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(hi01), _mm512_castps_pd(hi23)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(hi01), _mm512_castps_pd(hi23)));
      }
      // Feature 4k + f gathers block k of u[f], u[4 + f], u[8 + f], u[12 + f] (rows 0..15).
#pragma GCC unroll 4
      for (int f = 0; f < 4; ++f) {
        const __m512 p0 = _mm512_shuffle_f32x4(u[f], u[4 + f], 0x44), p1 = _mm512_shuffle_f32x4(u[f], u[4 + f], 0xEE);
        const __m512 p2 = _mm512_shuffle_f32x4(u[8 + f], u[12 + f], 0x44), p3 = _mm512_shuffle_f32x4(u[8 + f], u[12 + f], 0xEE);
        _mm512_mask_storeu_ps(dst + (j + f) * MR, keep, _mm512_shuffle_f32x4(p0, p2, 0x88));
        _mm512_mask_storeu_ps(dst + (j + 4 + f) * MR, keep, _mm512_shuffle_f32x4(p0, p2, 0xDD));
        _mm512_mask_storeu_ps(dst + (j + 8 + f) * MR, keep, _mm512_shuffle_f32x4(p1, p3, 0x88));
        _mm512_mask_storeu_ps(dst + (j + 12 + f) * MR, keep, _mm512_shuffle_f32x4(p1, p3, 0xDD));
      }
    }
    for (; j < d; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) dst[j * MR + r] = src[r * d + j];
  }
}

}  // namespace

// d <= 128: 6 rows x 4 zmm (one lane update per 4 score vectors; a 64-code chunk of d floats
// stays within 32 KiB of L1). Larger d: 12 rows x 2 zmm, whose 32-code chunks still fit L1, with
// a lane update per score vector (2 x 12 updates against 24 d FMAs).
const BlockKernel& avx512_kernel(int64_t d) {
  static const BlockKernel small{Ops512::W, 6, 4, true, "avx512", &run_block<Ops512, 6, 4>,
                                 &run_block<Ops512, 6, 4, true>, &pack_rows_t16<6>,
                                 Ops512::kSweepMaxD};
  static const BlockKernel large{Ops512::W, 12, 2, true, "avx512", &run_block<Ops512, 12, 2, true>,
                                 &run_block<Ops512, 12, 2, true>, &pack_rows_t16<12>,
                                 Ops512::kSweepMaxD};
  return d <= 128 ? small : large;
}

}  // namespace vqtok::nearest_detail
