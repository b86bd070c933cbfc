// Internal interface of the certified fast nearest-code search: the driver (in
// nearest_common.cpp) and its bf16 scoring kernels, AMX-BF16 (nearest_fast_amx.cpp) and
// AVX512-BF16 (nearest_fast_avx512bf16.cpp).
#pragma once

#include <cstdint>

#include "vqtok/nearest.h"

namespace vqtok::nearest_detail {

constexpr int kFastWidth = 16;  // codes per tile column group
constexpr int kFastMR = 16;     // rows per micro-tile (one 16-row tile)
constexpr int kFastNRV = 4;     // groups per panel chunk: a chunk is 64 codes
constexpr int kFastCap = 64;    // candidates kept per row; more and the row goes the exact way
constexpr int kFastBlockRows = 6 * kFastMR;  // rows of a block (FastBlockArgs::rows is at most this)

// One block of query rows (a multiple of kFastMR, at most kFastBlockRows) against one packed bf16
// panel.
//
// Pairs of features travel as one 32-bit word of two bf16 (feature 2p in the low half, 2p+1 in
// the high half; odd d is padded with a zero feature). Chunk q of the panel occupies
// panel[q*d2*CW : (q+1)*d2*CW] laid out [d2][CW] (CW = kFastNRV*kFastWidth codes) and holds -2*c
// rounded to bf16, so (V)(T)DPBF16PS accumulates the approximate score norms[code] - 2 x.c. Padding
// codes have norm +inf.
//
// Candidate capture. Each row carries best (lowest approximate score so far), thr (an fp32
// value >= best + band, rounded up) and a list of up to kFastCap (code, score) pairs. A score
// vector whose lanes are all above thr costs one compare; otherwise every lane <= thr joins the
// list (best and thr move down first; entries above thr are pruned when the list is full; a list
// that is still full marks the row with count = kFastCap + 1). Rows with thr = -FLT_MAX
// (padding) never capture.
struct FastBlockArgs {
  const uint32_t* xq;  // rows*d2 words (bf16 pairs), row-major
  int64_t rows;        // a multiple of kFastMR, at most kFastBlockRows
  int64_t d2;          // feature pairs
  const uint32_t* panel;
  const float* norms;  // nchunks*CW floats
  int64_t nchunks;
  int32_t code_base;   // global index of the panel's first code
  // per-row state, rows [0, rows)
  float* best;
  float* thr;
  const float* band;
  int32_t* count;
  int32_t* codes;      // rows*kFastCap
  float* scores;       // rows*kFastCap
};

// True when the CPU has AMX-BF16 and the OS lets this process use the tile registers (asks Linux
// once for XTILEDATA permission).
bool amx_bf16_usable();
// seed_steps: steps of 16 codes at the panel's start scanned first for the rows' minimum (see
// nearest_fast_amx.cpp); 0 for none.
void fast_block_amx(const FastBlockArgs& a, int64_t seed_steps);
// The same on AVX512-BF16 (VDPBF16PS); any d2 (no padding to tile steps).
void fast_block_avx512bf16(const FastBlockArgs& a, int64_t seed_steps);

enum class FastKernel { None, Amx, Avx512Bf16 };
// The scoring kernel the fast mode uses now (see nearest_fast_kernel() in nearest.h), and its name
// ("amx-bf16", "avx512-bf16", "" for None).
FastKernel fast_kernel();
const char* fast_kernel_name(FastKernel kern);

// The certified fast search (see nearest.h) with scoring kernel `kern` (not None); falls back to
// the exact search for rows it cannot certify.
NearestStats nearest_code_l2_fast(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                                  DType dtype, FastKernel kern, int64_t* out_idx, float* out_dist);

}  // namespace vqtok::nearest_detail
