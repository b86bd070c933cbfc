// AVX2 block kernel of the nearest-code search: 8 codes per ymm, 6 rows x 2 ymm micro-tile
// (12 accumulators of the 16 ymm registers).
#include <immintrin.h>

#include "nearest_tile.h"

namespace vqtok::nearest_detail {
namespace {

struct Ops256 {
  using V = __m256;
  using I = __m256i;
  static constexpr int W = 8;
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
  static void reduce_row(const float* pb, const float* ps, const int32_t* pi, float& best,
                         float& sec, int32_t& code) {
    reduce_row_generic<W>(pb, ps, pi, best, sec, code);
  }
};

constexpr int kMr = 6, kNrv = 2;

}  // namespace

const BlockKernel& avx2_kernel(int64_t /*d*/) {
  static const BlockKernel k{Ops256::W, kMr, kNrv, true, "avx2", &run_block<Ops256, kMr, kNrv>, &pack_rows<kMr>};
  return k;
}

}  // namespace vqtok::nearest_detail
