// AVX-512 block kernel of the nearest-code search: 16 codes per zmm, 8 rows x 3 zmm micro-tile
// (24 accumulators, broadcasts folded into the FMAs).
#include <immintrin.h>

#include "nearest_tile.h"

namespace vqtok::nearest_detail {
namespace {

struct Ops512 {
  using V = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static I set1i(int32_t x) { return _mm512_set1_epi32(x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  // lanes where s < b take `yes`, the others keep `no`
  static I select_lt(V s, V b, I yes, I no) {
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(s, b, _CMP_LT_OQ), no, yes);
  }
};

constexpr int kMr = 8, kNrv = 3;

}  // namespace

const BlockKernel& avx512_kernel() {
  static const BlockKernel k{Ops512::W, kMr, kNrv, true, "avx512", &run_block<Ops512, kMr, kNrv>};
  return k;
}

}  // namespace vqtok::nearest_detail
