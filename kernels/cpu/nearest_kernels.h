// Internal interface between the nearest-code driver (nearest_common.cpp) and its per-ISA block
// kernels (nearest_scalar.cpp, nearest_avx2.cpp, nearest_avx512.cpp).
#pragma once

#include <cstdint>

namespace vqtok::nearest_detail {

// One block of query rows against one packed codebook panel.
//
// Codes are packed in groups of W (the kernel's lane width): group g occupies
// panel[g*d*W : (g+1)*d*W] laid out [d][W] and holds -2*c (exact scaling), so that
// score = norms[g*W + l] + sum_j xq[r*d + j] * panel[(g*d + j)*W + l] = |c|^2 - 2 x.c.
// Padding codes have norm +inf and are never selected.
// Lane state per row r (W entries each, at r*W): best score, second-best score and the index of
// the first code of the group that holds the best (the code is idx + lane). Codes reach a lane
// in ascending order and replace the best only when strictly smaller, so ties keep the lowest.
struct BlockArgs {
  const float* xq;      // rows*d floats, row-major; rows is a multiple of the kernel's MR
  int64_t rows;
  int64_t d;
  const float* panel;   // ngroups*d*W floats
  const float* norms;   // ngroups*W floats
  int64_t ngroups;
  int32_t code_base;    // global index of the panel's first code
  float* best;          // rows*W
  float* second;        // rows*W
  int32_t* idx;         // rows*W
};

struct BlockKernel {
  int width;  // W: codes per group (SIMD lanes)
  int mr;     // rows per micro-tile (block rows must be a multiple)
  int nrv;    // groups per micro-tile (panel sizes are rounded to width*nrv codes)
  const char* name;
  void (*run)(const BlockArgs&);
};

const BlockKernel& scalar_kernel();
const BlockKernel& avx2_kernel();
const BlockKernel& avx512_kernel();

}  // namespace vqtok::nearest_detail
