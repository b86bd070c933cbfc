// Register-blocked micro-kernel of the nearest-code search, templated on a SIMD "ops" struct.
// Included by exactly one translation unit per ISA (compiled with that ISA's flags); everything
// lives in an anonymous namespace so the per-ISA copies never clash.
//
// A micro-tile is MR query rows x NRV*W codes: MR*NRV accumulators start at the codes' norms
// and take one FMA per feature (broadcast x times the -2-scaled codes), then an epilogue folds
// the score vectors into the rows' lane state (or stores them, in scores mode).
#pragma once

#include <algorithm>
#include <cstdint>

#include "nearest_kernels.h"

namespace vqtok::nearest_detail {
namespace {

// kGroupIds: every score vector updates the lane state itself (its group's own index), so the
// lanes know the winning group and every sibling's score; otherwise only the minimum over the NRV
// groups enters (1 op per extra group instead of 4) and run_block recovers the group afterwards.
// kPackedX: xq holds the tile's rows packed feature-major, xq[j * MR + r] (one contiguous
// broadcast source per feature instead of MR row streams); otherwise row-major, xq[r * d + j].
template <class O, int MR, int NRV, bool kScores, int DC = 0, bool kGroupIds = false, bool kPackedX = false>
__attribute__((always_inline)) inline void tile_body(const float* __restrict xq, int64_t d_rt, const float* __restrict cp,
                       const float* __restrict cn, int32_t base, float* __restrict best,
                       float* __restrict second, int32_t* __restrict idx,
                       float* __restrict scores, int64_t ld) {
  using V = typename O::V;
  constexpr int W = O::W, CW = NRV * W;
  const int64_t d = DC > 0 ? DC : d_rt;  // DC: feature count known at compile time (0: not)
  auto xat = [&](int r, int64_t j) { return kPackedX ? xq[j * MR + r] : xq[r * d + j]; };
  V acc[MR][NRV];
  {  // feature 0 peeled: the accumulators start as norm + x0 * c0 (no register copies)
    V cv[NRV];
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) cv[v] = O::load(cp + v * W);
#pragma GCC unroll 8
    for (int v = 0; v < NRV; ++v) {
      const V nv = O::load(cn + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) acc[r][v] = O::fmadd(O::set1(xat(r, 0)), cv[v], nv);
    }
  }
  // Codes first (NRV code vectors live, one broadcast at a time) when that fits the register file
  // next to the accumulators; otherwise broadcasts first (MR live, one code vector at a time).
  constexpr bool kBcastFirst = MR * NRV + NRV + 1 > O::kRegs;
#pragma GCC unroll 4
  for (int64_t j = 1; j < d; ++j) {
    if constexpr (kBcastFirst) {
      V xb[MR];
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) xb[r] = O::set1(xat(r, j));
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) {
        const V cv = O::load(cp + j * CW + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r][v] = O::fmadd(xb[r], cv, acc[r][v]);
      }
    } else {
      V cv[NRV];
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) cv[v] = O::load(cp + j * CW + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const V xb = O::set1(xat(r, j));
#pragma GCC unroll 8
        for (int v = 0; v < NRV; ++v) acc[r][v] = O::fmadd(xb, cv[v], acc[r][v]);
      }
    }
  }
  if constexpr (kScores) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) O::store(scores + r * ld + v * W, acc[r][v]);
  } else {
    const typename O::I vbase = O::set1i(base);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      V b = O::load(best + r * W);
      V s2 = O::load(second + r * W);
      typename O::I id = O::loadi(idx + r * W);
      if constexpr (kGroupIds) {
#pragma GCC unroll 8
        for (int v = 0; v < NRV; ++v) O::update(b, s2, id, acc[r][v], O::set1i(base + v * W));
      } else {
        // Only the row's minimum over the NRV groups enters the lane state; run_block later
        // recovers which group held it and the score of its siblings, which are the only
        // values this leaves out of the second best.
        V mn = acc[r][0];
#pragma GCC unroll 8
        for (int v = 1; v < NRV; ++v) mn = O::min(mn, acc[r][v]);
        O::update(b, s2, id, mn, vbase);
      }
      O::store(best + r * W, b);
      O::store(second + r * W, s2);
      O::storei(idx + r * W, id);
    }
  }
}

// One micro-tile (kept out of line: inlined into the block loops, GCC spills the code vectors).
template <class O, int MR, int NRV, bool kScores, bool kGroupIds = false, bool kPackedX = false>
__attribute__((noinline)) void micro_tile(const float* xq, int64_t d, const float* cp, const float* cn,
                                          int32_t base, float* best, float* second, int32_t* idx,
                                          float* scores, int64_t ld) {
  tile_body<O, MR, NRV, kScores, 0, kGroupIds, kPackedX>(xq, d, cp, cn, base, best, second, idx, scores, ld);
}

// Small d: one row tile sweeps all chunks of the panel in one call (DC = d when it is a
// compile-time size, so the feature loop unrolls completely).
template <class O, int MR, int NRV, int DC, bool kGroupIds>
__attribute__((noinline)) void micro_sweep(const float* xq, int64_t d, const float* panel,
                                           const float* norms, int64_t nchunks, int32_t base,
                                           float* best, float* second, int32_t* idx) {
  constexpr int CW = NRV * O::W;
  for (int64_t q = 0; q < nchunks; ++q)
    tile_body<O, MR, NRV, false, DC, kGroupIds>(xq, d, panel + q * d * CW, norms + q * CW,
                                     base + static_cast<int32_t>(q * CW), best, second, idx,
                                     nullptr, 0);
}

// Runs a whole block with its lane state on the stack, then reduces the lanes and merges them
// into the rows' running best / second / index (panels arrive in ascending code order, so an
// equal best keeps the earlier, lower index). Small d (up to O::kSweepMaxD): each row tile
// (L1-resident) sweeps the panel's chunks, in runs of O::kSweepBytes when that is set, otherwise
// as one sequential stream from L2. Large d: each chunk (NRV*W codes x d) stays
// in L1 while the block's row tiles stream past it (with per-group lane updates when kGroupIds:
// their cost is small next to d FMAs, and the winner needs no recomputation).
template <class O, int MR, int NRV, bool kGroupIds = false>
void run_block(const BlockArgs& a) {
  constexpr int W = O::W, CW = NRV * W;
  const int64_t d = a.d;
  if (a.scores != nullptr) {
    for (int64_t r0 = 0; r0 < a.rows; r0 += MR)
      for (int64_t q = 0; q < a.nchunks; ++q)
        micro_tile<O, MR, NRV, true>(a.xq + r0 * d, d, a.panel + q * d * CW, a.norms + q * CW, 0,
                                     nullptr, nullptr, nullptr, a.scores + r0 * a.ld + q * CW, a.ld);
    return;
  }
  alignas(64) float lb[kMaxBlockTiles * MR * W], ls[kMaxBlockTiles * MR * W];
  alignas(64) int32_t li[kMaxBlockTiles * MR * W];
  for (int64_t i = 0; i < a.rows * W; ++i) lb[i] = ls[i] = __builtin_inff(), li[i] = 0;
  // Past O::kSweepMaxD the tiles read the block's rows packed feature-major (a.xp, see BlockArgs).
  const float* xp = a.xp;
  auto tile = [&](int64_t r0, int64_t q) {
    micro_tile<O, MR, NRV, false, kGroupIds, true>(xp + r0 * d, d, a.panel + q * d * CW, a.norms + q * CW,
                                  a.code_base + static_cast<int32_t>(q * CW), lb + r0 * W,
                                  ls + r0 * W, li + r0 * W, nullptr, 0);
  };
  if (d <= O::kSweepMaxD) {
    // The row tiles sweep runs of O::kSweepBytes of the panel (all of it when 0): a run stays in
    // L1 while every tile of the block passes over it (for L2s too small to hold the panel).
    const int64_t run = O::kSweepBytes > 0 ? std::max<int64_t>(1, O::kSweepBytes / (4 * d * CW)) : a.nchunks;
    constexpr int D32 = O::kSweepMaxD >= 32 ? 32 : 0;  // compiled only where the sweep reaches d = 32
    auto sweep = d == 8 ? &micro_sweep<O, MR, NRV, 8, kGroupIds>
                 : d == 16 ? &micro_sweep<O, MR, NRV, 16, kGroupIds>
                 : d == 32 ? &micro_sweep<O, MR, NRV, D32, kGroupIds>
                 : &micro_sweep<O, MR, NRV, 0, kGroupIds>;
    for (int64_t q0 = 0; q0 < a.nchunks; q0 += run)
      for (int64_t r0 = 0; r0 < a.rows; r0 += MR)
        sweep(a.xq + r0 * d, d, a.panel + q0 * d * CW, a.norms + q0 * CW, std::min(run, a.nchunks - q0),
              a.code_base + static_cast<int32_t>(q0 * CW), lb + r0 * W, ls + r0 * W, li + r0 * W);
  } else {
    for (int64_t q = 0; q < a.nchunks; ++q)
      for (int64_t r0 = 0; r0 < a.rows; r0 += MR) tile(r0, q);
  }
  auto commit = [&](int64_t r, float best, float sec, int32_t code) {
    float& gb = a.gbest[r];
    a.gsec[r] = sec < gb ? sec : gb;
    gb = best;
    a.gidx[r] = code;
  };
  // Rows whose best this panel improves; without kGroupIds their winning group is recovered
  // below, kRecompute rows at a time.
  constexpr bool kRecover = NRV > 1 && !kGroupIds;
  int32_t pend[kRecover ? kMaxBlockTiles * MR : 1], np = 0;
  float pbest[kRecover ? kMaxBlockTiles * MR : 1], psec[kRecover ? kMaxBlockTiles * MR : 1];
  int32_t pcode[kRecover ? kMaxBlockTiles * MR : 1];
  for (int64_t r = 0; r < a.valid_rows; ++r) {
    float best, sec;
    int32_t code;
    O::reduce_row(lb + r * W, ls + r * W, li + r * W, best, sec, code);
    float& gb = a.gbest[r];
    float& gs = a.gsec[r];
    if (!(best < gb)) {  // the panel's minimum bounds all its codes, siblings included
      if (best < gs) gs = best;
      continue;
    }
    if constexpr (kRecover) pend[np] = static_cast<int32_t>(r), pbest[np] = best, psec[np] = sec, pcode[np] = code, ++np;
    else commit(r, best, sec, code);
  }
  if constexpr (kRecover) {
    // code = chunk start + lane; the winner is the lowest group v whose score equals best, and
    // its siblings' scores join the second best. They are recomputed with the kernel's exact
    // FMA sequence (bitwise identical). Each row's recomputation is NRV chains of d dependent
    // FMAs; kRecompute rows side by side keep enough of them in flight to hide the latency.
    constexpr int kRecompute = 4;
    for (int i0 = 0; i0 < np; i0 += kRecompute) {
      const float* cp[kRecompute];
      const float* xr[kRecompute];
      float s[kRecompute][NRV];
      for (int t = 0; t < kRecompute; ++t) {
        const int i = i0 + t < np ? i0 + t : np - 1;  // a short batch repeats its last row
        const int64_t off = pcode[i] - a.code_base, q = off / CW, lane = off % CW;
        cp[t] = a.panel + q * d * CW + lane;
        xr[t] = a.xq + pend[i] * d;
#pragma GCC unroll 8
        for (int v = 0; v < NRV; ++v) s[t][v] = __builtin_fmaf(xr[t][0], cp[t][v * W], a.norms[q * CW + lane + v * W]);
      }
      for (int64_t j = 1; j < d; ++j)
#pragma GCC unroll 4
        for (int t = 0; t < kRecompute; ++t)
#pragma GCC unroll 8
          for (int v = 0; v < NRV; ++v) s[t][v] = __builtin_fmaf(xr[t][j], cp[t][j * CW + v * W], s[t][v]);
      for (int t = 0; t < kRecompute && i0 + t < np; ++t) {
        const int i = i0 + t;
        const float best = pbest[i];
        float sec = psec[i];
        int win = -1;
        for (int v = 0; v < NRV; ++v) {
          if (win < 0 && s[t][v] == best) win = v;
          else if (s[t][v] < sec) sec = s[t][v];
        }
        if (win < 0) win = 0, sec = best;  // unreachable for finite scores: force a re-decision
        commit(pend[i], best, sec, pcode[i] + win * W);
      }
    }
  }
}

// BlockKernel::pack_rows for MR-row tiles (compiled with each ISA's flags).
template <int MR>
void pack_rows(const float* xq, int64_t rows, int64_t d, float* xp) {
  for (int64_t t = 0; t < rows; t += MR) {
    float* dst = xp + t * d;
    const float* src = xq + t * d;
    for (int64_t j = 0; j < d; ++j)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) dst[j * MR + r] = src[r * d + j];
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
