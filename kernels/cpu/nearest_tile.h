// Register-blocked micro-kernel of the nearest-code search, templated on a SIMD "ops" struct.
// Included by exactly one translation unit per ISA (compiled with that ISA's flags); everything
// lives in an anonymous namespace so the per-ISA copies never clash.
//
// A micro-tile is MR query rows x NRV code groups (NRV*W codes): MR*NRV accumulators start at
// the codes' norms and take one FMA per feature (broadcast x times the -2-scaled codes), then an
// epilogue folds the MR*NRV score vectors into the rows' lane state.
#pragma once

#include <cstdint>
#include <type_traits>

#include "nearest_kernels.h"

namespace vqtok::nearest_detail {
namespace {

template <class O, int MR, int NRV>
inline void micro_tile(const float* __restrict xq, int64_t d, const float* __restrict gp,
                       const float* __restrict gn, int32_t base, float* __restrict best,
                       float* __restrict second, int32_t* __restrict idx) {
  using V = typename O::V;
  constexpr int W = O::W;
  V acc[MR][NRV];
#pragma GCC unroll 8
  for (int v = 0; v < NRV; ++v) {
    const V nv = O::load(gn + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][v] = nv;
  }
  const int64_t gstride = d * W;
  for (int64_t j = 0; j < d; ++j) {
    V cv[NRV];
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) cv[v] = O::load(gp + v * gstride + j * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V xb = O::set1(xq[r * d + j]);
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) acc[r][v] = O::fmadd(xb, cv[v], acc[r][v]);
    }
  }
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

// Runs a whole block. Small d: each micro-tile sweeps the panel (lane state stays in L1, codes
// stream from L2). Large d: each code micro-panel (NRV*W codes x d) stays in L1 while the row
// tiles stream past it.
template <class O, int MR, int NRV>
void run_block(const BlockArgs& a) {
  constexpr int W = O::W;
  const int64_t d = a.d, full = a.ngroups / NRV * NRV;
  auto tile = [&](int64_t r0, int64_t g0, auto nrv) {
    constexpr int N = decltype(nrv)::value;
    micro_tile<O, MR, N>(a.xq + r0 * d, d, a.panel + g0 * d * W, a.norms + g0 * W,
                         a.code_base + static_cast<int32_t>(g0 * W), a.best + r0 * W,
                         a.second + r0 * W, a.idx + r0 * W);
  };
  using Full = std::integral_constant<int, NRV>;
  using One = std::integral_constant<int, 1>;
  if (d <= 48) {
    for (int64_t r0 = 0; r0 < a.rows; r0 += MR) {
      for (int64_t g0 = 0; g0 < full; g0 += NRV) tile(r0, g0, Full{});
      for (int64_t g0 = full; g0 < a.ngroups; ++g0) tile(r0, g0, One{});
    }
  } else {
    for (int64_t g0 = 0; g0 < full; g0 += NRV)
      for (int64_t r0 = 0; r0 < a.rows; r0 += MR) tile(r0, g0, Full{});
    for (int64_t g0 = full; g0 < a.ngroups; ++g0)
      for (int64_t r0 = 0; r0 < a.rows; r0 += MR) tile(r0, g0, One{});
  }
}

}  // namespace
}  // namespace vqtok::nearest_detail
