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

}  // namespace

// d <= 128: 6 rows x 4 zmm (one lane update per 4 score vectors; a 64-code chunk of d floats
// stays within 32 KiB of L1). Larger d: 12 rows x 2 zmm, whose 32-code chunks still fit L1, with
// a lane update per score vector (2 x 12 updates against 24 d FMAs).
const BlockKernel& avx512_kernel(int64_t d) {
  static const BlockKernel small{Ops512::W, 6, 4, true, "avx512", &run_block<Ops512, 6, 4>,
                                 &run_block<Ops512, 6, 4, true>, &pack_rows<6>,
                                 Ops512::kSweepMaxD};
  static const BlockKernel large{Ops512::W, 12, 2, true, "avx512", &run_block<Ops512, 12, 2, true>,
                                 &run_block<Ops512, 12, 2, true>, &pack_rows<12>,
                                 Ops512::kSweepMaxD};
  return d <= 128 ? small : large;
}

}  // namespace vqtok::nearest_detail
