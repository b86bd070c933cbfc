// AVX2 block kernels of the nearest-code search: 8 codes per ymm, 12 accumulators per micro-tile
// (3 x 4 or 4 x 3 ymm by d).
#include <immintrin.h>

#include "nearest_tile.h"

namespace vqtok::nearest_detail {
namespace {

struct Ops256 {
  using V = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static constexpr int kRegs = 16;  // vector registers
  static constexpr int64_t kSweepBytes = 16384;  // small d: row tiles sweep 16 KiB runs of the panel (L1)
  static constexpr int64_t kSweepMaxD = 32;  // row tiles sweep the panel up to this d
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static I set1i(int32_t x) { return _mm256_set1_epi32(x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static void update(V& b, V& s2, I& id, V s, I vbase) {
    const __m256 lt = _mm256_cmp_ps(s, b, _CMP_LT_OQ);
    id = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(id), _mm256_castsi256_ps(vbase), lt));
    s2 = _mm256_min_ps(s2, _mm256_max_ps(b, s));  // the old best or s, whichever is larger
    b = _mm256_min_ps(b, s);
  }
  // Every lane holds the minimum over the 8 lanes afterwards.
  static V hmin(V v) {
    v = _mm256_min_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_min_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  }
  static I hmini(I v) {
    v = _mm256_min_epi32(v, _mm256_permute2x128_si256(v, v, 1));
    v = _mm256_min_epi32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_epi32(v, _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
  }
  // reduce_row_generic's answer without its branches: the best, the lowest code among the lanes
  // equal to it (each lane's code id + lane is distinct) and the minimum of every other value.
  static void reduce_row(const float* pb, const float* ps, const int32_t* pi, float& best,
                         float& sec, int32_t& code) {
    const V b = _mm256_loadu_ps(pb), s = _mm256_loadu_ps(ps);
    const I codes = _mm256_add_epi32(loadi(pi), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const V m = hmin(b);
    const I eq = _mm256_castps_si256(_mm256_cmp_ps(b, m, _CMP_EQ_OQ));
    const I c = hmini(_mm256_blendv_epi8(_mm256_set1_epi32(0x7fffffff), codes, eq));
    const V others = _mm256_blendv_ps(b, _mm256_set1_ps(__builtin_inff()),
                                      _mm256_castsi256_ps(_mm256_cmpeq_epi32(codes, c)));
    best = _mm256_cvtss_f32(m);
    code = _mm256_cvtsi256_si32(c);
    sec = _mm256_cvtss_f32(hmin(_mm256_min_ps(s, others)));
  }
};

}  // namespace

// d <= 16: 3 rows x 4 ymm, each row's 4 score vectors entering the lane state as one minimum.
// Larger d: 4 rows x 3 ymm with a lane update per score vector (the winner's group needs no
// recomputation afterwards). Both hold 12 accumulators of the 16 ymm registers, with the
// broadcasts (3x4) or the code vectors (4x3) beside them. Up to d = 32 the row tiles read their
// rows in place and sweep 16 KiB runs of the panel (L1; this level's L2 may not hold a panel).
const BlockKernel& avx2_kernel(int64_t d) {
  // run_ids is run for the small tile: its per-group variant was no faster with few codes
  // (VQTOK_ISA=avx2, d = 8 and 16; 3-row tiles pay four lane updates per row for one minimum).
  static const BlockKernel small{Ops256::W, 3, 4, true, "avx2", &run_block<Ops256, 3, 4>,
                                 &run_block<Ops256, 3, 4>, &pack_rows<3>,
                                 Ops256::kSweepMaxD};
  static const BlockKernel large{Ops256::W, 4, 3, true, "avx2", &run_block<Ops256, 4, 3, true>,
                                 &run_block<Ops256, 4, 3, true>, &pack_rows<4>,
                                 Ops256::kSweepMaxD};
  return d <= 16 ? small : large;
}

}  // namespace vqtok::nearest_detail
