// Register-blocked micro-kernel of the nearest-code search, templated on a SIMD "ops" struct.
// Included by exactly one translation unit per ISA (compiled with that ISA's flags); everything
// lives in an anonymous namespace so the per-ISA copies never clash.
//
// A micro-tile is MR query rows x NRV*W codes: MR*NRV accumulators start at the codes' norms
// and take one FMA per feature (broadcast x times the -2-scaled codes), then an epilogue folds
// the score vectors into the rows' lane state (or stores them, in scores mode).
#pragma once

#include <cstdint>

#include "nearest_kernels.h"

namespace vqtok::nearest_detail {
namespace {

template <class O, int MR, int NRV, bool kScores>
inline void micro_tile(const float* __restrict xq, int64_t d, const float* __restrict cp,
                       const float* __restrict cn, int32_t base, float* __restrict best,
                       float* __restrict second, int32_t* __restrict idx,
                       float* __restrict scores, int64_t ld) {
  using V = typename O::V;
  constexpr int W = O::W, CW = NRV * W;
  V acc[MR][NRV];
  {  // feature 0 peeled: the accumulators start as norm + x0 * c0 (no register copies)
    V cv[NRV];
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) cv[v] = O::load(cp + v * W);
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) {
      const V nv = O::load(cn + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][v] = O::fmadd(O::set1(xq[r * d]), cv[v], nv);
    }
  }
  for (int64_t j = 1; j < d; ++j) {
    V cv[NRV];
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) cv[v] = O::load(cp + j * CW + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V xb = O::set1(xq[r * d + j]);
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) acc[r][v] = O::fmadd(xb, cv[v], acc[r][v]);
    }
  }
  if constexpr (kScores) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) O::store(scores + r * ld + v * W, acc[r][v]);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      V b = O::load(best + r * W);
      V s2 = O::load(second + r * W);
      typename O::I id = O::loadi(idx + r * W);
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) {
        const V s = acc[r][v];
        s2 = O::min(s2, O::max(b, s));  // the old best or the new score, whichever is larger
        id = O::select_lt(s, b, O::set1i(base + v * W), id);
        b = O::min(b, s);
      }
      O::store(best + r * W, b);
      O::store(second + r * W, s2);
      O::storei(idx + r * W, id);
    }
  }
}

// Runs a whole block: each row tile (MR rows, L1-resident) sweeps the panel's chunks, which
// stream from L2 as one sequential stream; the rows' lane state stays in L1.
template <class O, int MR, int NRV>
void run_block(const BlockArgs& a) {
  constexpr int CW = NRV * O::W;
  const int64_t d = a.d;
  for (int64_t r0 = 0; r0 < a.rows; r0 += MR) {
    const float* xq = a.xq + r0 * d;
    for (int64_t q = 0; q < a.nchunks; ++q) {
      const int32_t base = a.code_base + static_cast<int32_t>(q * CW);
      if (a.scores != nullptr) {
        micro_tile<O, MR, NRV, true>(xq, d, a.panel + q * d * CW, a.norms + q * CW, base, nullptr,
                                     nullptr, nullptr, a.scores + r0 * a.ld + q * CW, a.ld);
      } else {
        micro_tile<O, MR, NRV, false>(xq, d, a.panel + q * d * CW, a.norms + q * CW, base,
                                      a.best + r0 * O::W, a.second + r0 * O::W,
                                      a.idx + r0 * O::W, nullptr, 0);
      }
    }
  }
}

}  // namespace
}  // namespace vqtok::nearest_detail
