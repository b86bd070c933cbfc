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
      for (int v = 0; v < NRV; ++v) O::update(b, s2, id, acc[r][v], O::set1i(base + v * W));
      O::store(best + r * W, b);
      O::store(second + r * W, s2);
      O::storei(idx + r * W, id);
    }
  }
}

// Runs a whole block: each row tile (MR rows, L1-resident) sweeps the panel's chunks, which
// stream from L2 as one sequential stream, with its lane state on the stack; then the lanes are
// reduced and merged into the rows' running best / second / index (panels arrive in ascending
// code order, so an equal best keeps the earlier, lower index).
template <class O, int MR, int NRV>
void run_block(const BlockArgs& a) {
  constexpr int W = O::W, CW = NRV * W;
  const int64_t d = a.d;
  alignas(64) float lb[MR * W], ls[MR * W];
  alignas(64) int32_t li[MR * W];
  for (int64_t r0 = 0; r0 < a.rows; r0 += MR) {
    const float* xq = a.xq + r0 * d;
    if (a.scores != nullptr) {
      for (int64_t q = 0; q < a.nchunks; ++q)
        micro_tile<O, MR, NRV, true>(xq, d, a.panel + q * d * CW, a.norms + q * CW, 0, nullptr,
                                     nullptr, nullptr, a.scores + r0 * a.ld + q * CW, a.ld);
      continue;
    }
    for (int i = 0; i < MR * W; ++i) lb[i] = ls[i] = __builtin_inff(), li[i] = 0;
    for (int64_t q = 0; q < a.nchunks; ++q)
      micro_tile<O, MR, NRV, false>(xq, d, a.panel + q * d * CW, a.norms + q * CW,
                                    a.code_base + static_cast<int32_t>(q * CW), lb, ls, li,
                                    nullptr, 0);
    const int64_t valid = a.valid_rows - r0 < MR ? a.valid_rows - r0 : MR;
    for (int64_t r = 0; r < valid; ++r) {
      float best, sec;
      int32_t code;
      O::reduce_row(lb + r * W, ls + r * W, li + r * W, best, sec, code);
      float& gb = a.gbest[r0 + r];
      float& gs = a.gsec[r0 + r];
      if (best < gb) {
        gs = sec < gb ? sec : gb;
        gb = best;
        a.gidx[r0 + r] = code;
      } else if (best < gs) {
        gs = best;
      }
    }
  }
}

// Lane reduction shared by the ISAs without a specialised one: best, lowest code among equal
// bests, and second = min(seconds, bests of the other lanes).
template <int W>
inline void reduce_row_generic(const float* b, const float* s, const int32_t* id, float& best,
                               float& sec, int32_t& code) {
  int bl = 0;
  for (int l = 1; l < W; ++l)
    if (b[l] < b[bl] || (b[l] == b[bl] && id[l] + l < id[bl] + bl)) bl = l;
  float m0 = __builtin_inff(), m1 = __builtin_inff();
  for (int l = 0; l < W; l += 2) {
    m0 = s[l] < m0 ? s[l] : m0;
    m1 = s[l + 1] < m1 ? s[l + 1] : m1;
    const float o0 = l == bl ? __builtin_inff() : b[l], o1 = l + 1 == bl ? __builtin_inff() : b[l + 1];
    m0 = o0 < m0 ? o0 : m0;
    m1 = o1 < m1 ? o1 : m1;
  }
  best = b[bl];
  sec = m0 < m1 ? m0 : m1;
  code = id[bl] + bl;
}

}  // namespace
}  // namespace vqtok::nearest_detail
