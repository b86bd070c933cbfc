// Internal interface between the nearest-code driver (nearest_common.cpp) and its per-ISA block
// kernels (nearest_scalar.cpp, nearest_avx2.cpp, nearest_avx512.cpp).
#pragma once

#include <cstdint>

namespace vqtok::nearest_detail {

// One block of query rows against one packed codebook panel.
//
// Codes are packed in chunks of NRV*W (NRV groups of W lanes): chunk q occupies
// panel[q*d*NRV*W : (q+1)*d*NRV*W] laid out [d][NRV*W] and holds -2*c (exact scaling), so that
// with cw = NRV*W the score of code q*cw + l is
//   norms[q*cw + l] + sum_j xq[r*d + j] * panel[(q*d + j)*cw + l] = |c|^2 - 2 x.c.
// Padding codes (up to a whole chunk) have norm +inf and are never selected.
// Each row tile keeps, per row and lane, the best score, the second-best score and the index of
// the group holding the best (codes reach a lane in ascending order and replace the best only
// when strictly smaller, so ties keep the lowest index); after the panel the lanes are reduced
// and merged into gbest / gsec / gidx.
struct BlockArgs {
  const float* xq;      // rows*d floats, row-major
  int64_t rows;         // a multiple of the kernel's MR, at most kMaxBlockTiles * MR
  int64_t valid_rows;   // rows [valid_rows, rows) are zero padding and are not merged
  int64_t d;
  const float* panel;   // nchunks*d*NRV*W floats
  const float* norms;   // nchunks*NRV*W floats
  int64_t nchunks;
  int32_t code_base;    // global index of the panel's first code
  float* gbest;         // valid_rows running best scores (in/out)
  float* gsec;          // valid_rows running second-best scores (in/out)
  int32_t* gidx;        // valid_rows running best codes (in/out)
  // Scores mode (used to re-decide near ties): when non-null, the kernel writes every score
  // to scores[r*ld + code - code_base] and leaves gbest / gsec / gidx alone.
  float* scores;
  int64_t ld;
  // d > sweep_max_d, scores mode off: the same rows packed by pack_rows (tile t of MR rows at xp + t*MR*d,
  // feature-major: xp[t*MR*d + j*MR + r] = row t*MR + r, feature j).
  const float* xp = nullptr;
};

constexpr int kMaxBlockTiles = 16;

struct BlockKernel {
  int width;  // W: codes per group (SIMD lanes)
  int mr;     // rows per micro-tile (block rows must be a multiple)
  int nrv;    // groups per micro-tile (panels are padded to whole chunks of width*nrv codes)
  bool fma;   // scores are single-rounding FMA chains (tightens the error bound)
  const char* name;
  void (*run)(const BlockArgs&);
  // The same search with a lane index per code group (kGroupIds): each score vector pays the full
  // lane update, and no row's winning group is recomputed afterwards. Cheaper than run with few
  // codes (see nearest_exact); a level may make it run itself.
  void (*run_ids)(const BlockArgs&);
  // Packs rows [0, rows) of xq (row-major, rows a multiple of mr) feature-major per mr-row tile,
  // the layout BlockArgs::xp holds.
  void (*pack_rows)(const float* xq, int64_t rows, int64_t d, float* xp);
  // d <= sweep_max_d: row tiles read rows row-major and sweep the panel's chunks; larger d: each
  // chunk meets the block's tiles, whose rows come packed (BlockArgs::xp).
  int64_t sweep_max_d;  // the Ops struct's kSweepMaxD, which run_block tests
};

// The kernel for feature dim d (a level may pick its micro-tile shape by d).
const BlockKernel& scalar_kernel(int64_t d);
const BlockKernel& avx2_kernel(int64_t d);
const BlockKernel& avx512_kernel(int64_t d);

}  // namespace vqtok::nearest_detail
