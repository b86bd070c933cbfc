// AVX512-BF16 scoring kernel of the certified fast nearest-code search (see nearest_fast.h), for
// CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and later; Cooper Lake).
//
// A micro-tile is MR query rows x one 64-code panel chunk in MR x 4 zmm accumulators, started at
// the codes' norms. Per feature pair, four code vectors (16 codes x one bf16 pair each) meet each
// row's pair broadcast in one VDPBF16PS: two multiply-adds per lane, exact bf16 products and fp32
// accumulation, twice the work of an fp32 FMA per instruction. The epilogue takes each row's
// minimum over the 64 scores and one compare against its capture threshold; the rare rows with a
// score under it take capture_lanes. Row tiles sweep L1-sized runs of the panel's chunks.
#include <immintrin.h>

#include <algorithm>
#include <cfloat>

#include "nearest_fast.h"
#include "nearest_fast_capture.h"

namespace vqtok::nearest_detail {
namespace {

constexpr int W = 16, NRV = kFastNRV, CW = NRV * W;
static_assert(NRV == 4, "the epilogue folds four score vectors");

// kSeed: fold the scores into mins[r] (a running minimum per row and lane) instead of capturing.
template <int MR, bool kSeed>
__attribute__((always_inline)) inline void tile(const FastBlockArgs& a, int64_t r0, int64_t q0, int64_t q1,
                                                float* mins) {
  const int64_t d2 = a.d2;
  const uint32_t* __restrict xr = a.xq + r0 * d2;
  for (int64_t q = q0; q < q1; ++q) {
    const uint32_t* __restrict cp = a.panel + q * d2 * CW;
    const float* nrm = a.norms + q * CW;
    __m512 acc[MR][NRV];
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) {
      const __m512 nv = _mm512_loadu_ps(nrm + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][v] = nv;
    }
#pragma GCC unroll 2
    for (int64_t p = 0; p < d2; ++p) {
      __m512bh cv[NRV];
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) cv[v] = (__m512bh)_mm512_loadu_si512(cp + p * CW + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[r * d2 + p]));
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, cv[v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 mn = _mm512_min_ps(_mm512_min_ps(acc[r][0], acc[r][1]), _mm512_min_ps(acc[r][2], acc[r][3]));
      if constexpr (kSeed) {
        _mm512_store_ps(mins + r * W, _mm512_min_ps(_mm512_load_ps(mins + r * W), mn));
      } else if (_mm512_cmp_ps_mask(mn, _mm512_set1_ps(a.thr[r0 + r]), _CMP_LE_OQ)) {
        alignas(64) float s[CW];
        const __m512 t = _mm512_set1_ps(a.thr[r0 + r]);
        uint64_t m = 0;
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) {
          _mm512_store_ps(s + v * W, acc[r][v]);
          m |= uint64_t(_mm512_cmp_ps_mask(acc[r][v], t, _CMP_LE_OQ)) << (v * W);
        }
        capture_lanes(a, r0 + r, s, a.code_base + static_cast<int32_t>(q * CW), m);
      }
    }
  }
}

// Rows [r0, r0 + rows) of the block against chunks [q0, q1), in tiles of 6 rows (24 accumulators,
// 4 code vectors and a broadcast in the 32 zmm) and a last tile of 4 or 2 (rows is even).
template <bool kSeed>
void rows_x_chunks(const FastBlockArgs& a, int64_t q0, int64_t q1, float* mins) {
  int64_t r = 0;
  for (; r + 6 <= a.rows; r += 6) tile<6, kSeed>(a, r, q0, q1, mins + r * W);
  if (a.rows - r == 4) tile<4, kSeed>(a, r, q0, q1, mins + r * W);
  if (a.rows - r == 2) tile<2, kSeed>(a, r, q0, q1, mins + r * W);
}

}  // namespace

// Seed pass as the AMX kernel's (nearest_fast_amx.cpp): the first seed_steps x 16 codes (at most
// an eighth of the panel: they are scanned twice) give every row the minimum of their approximate
// scores first, so the main pass starts from a real best and captures stay rare. The main pass
// then sweeps runs of chunks that fit in ~24 KiB with every row tile of the block (the rows' bf16
// pairs stay in L1/L2 beside them).
void fast_block_avx512bf16(const FastBlockArgs& a, int64_t seed_steps) {
  alignas(64) float mins[kFastBlockRows * W];
  const int64_t seed_chunks =
      seed_steps > 0 ? std::max<int64_t>(1, std::min<int64_t>(a.nchunks / 8, seed_steps * 16 / CW)) : 0;
  if (seed_chunks > 0) {
    for (int64_t i = 0; i < a.rows * W; ++i) mins[i] = FLT_MAX;
    rows_x_chunks<true>(a, 0, seed_chunks, mins);
    for (int64_t r = 0; r < a.rows; ++r) seed_row(a, r, _mm512_reduce_min_ps(_mm512_load_ps(mins + r * W)));
  }
  const int64_t run = std::max<int64_t>(1, (24 << 10) / (a.d2 * CW * 4));  // chunks per L1 run
  for (int64_t q0 = 0; q0 < a.nchunks; q0 += run)
    rows_x_chunks<false>(a, q0, std::min(a.nchunks, q0 + run), mins);  // (mins unused)
}

}  // namespace vqtok::nearest_detail
