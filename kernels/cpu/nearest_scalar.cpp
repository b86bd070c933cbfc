// Portable block kernel of the nearest-code search: plain C++ over 8-wide "lanes" (the compiler
// may vectorise it with the baseline ISA). Same packing and lane-state rules as the SIMD kernels.
#include <algorithm>

#include "nearest_tile.h"

namespace vqtok::nearest_detail {
namespace {

struct Lanes {
  float v[8];
};
struct LanesI {
  int32_t v[8];
};

struct OpsScalar {
  using V = Lanes;
  using I = LanesI;
  static constexpr int W = 8;
  static constexpr int kRegs = 1024;  // vector registers (scalar lanes: no limit)
  static constexpr int64_t kSweepBytes = 0;  // small d: row tiles sweep the whole panel
  static constexpr int64_t kSweepMaxD = 16;  // row tiles sweep the panel up to this d
  static V load(const float* p) {
    V r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l];
    return r;
  }
  static void store(float* p, const V& a) {
    for (int l = 0; l < W; ++l) p[l] = a.v[l];
  }
  static I loadi(const int32_t* p) {
    I r;
    for (int l = 0; l < W; ++l) r.v[l] = p[l];
    return r;
  }
  static void storei(int32_t* p, const I& a) {
    for (int l = 0; l < W; ++l) p[l] = a.v[l];
  }
  static V set1(float x) {
    V r;
    for (int l = 0; l < W; ++l) r.v[l] = x;
    return r;
  }
  static I set1i(int32_t x) {
    I r;
    for (int l = 0; l < W; ++l) r.v[l] = x;
    return r;
  }
  // one or two roundings (the compiler may contract); the driver's error bound allows two
  static V fmadd(const V& a, const V& b, const V& c) {
    V r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static V min(const V& a, const V& b) {
    V r;
    for (int l = 0; l < W; ++l) r.v[l] = b.v[l] < a.v[l] ? b.v[l] : a.v[l];
    return r;
  }
  static void update(V& b, V& s2, I& id, const V& s, const I& vbase) {
    for (int l = 0; l < W; ++l) {
      if (s.v[l] < b.v[l]) {
        s2.v[l] = b.v[l];
        b.v[l] = s.v[l];
        id.v[l] = vbase.v[l];
      } else if (s.v[l] < s2.v[l]) {
        s2.v[l] = s.v[l];
      }
    }
  }
  static void reduce_row(const float* pb, const float* ps, const int32_t* pi, float& best,
                         float& sec, int32_t& code) {
    reduce_row_generic<W>(pb, ps, pi, best, sec, code);
  }
};

constexpr int kMr = 4, kNrv = 1;

}  // namespace

const BlockKernel& scalar_kernel(int64_t /*d*/) {
  // One group per tile (kNrv = 1): nothing to recover, so run_ids is run.
  static const BlockKernel k{OpsScalar::W, kMr, kNrv, false, "scalar", &run_block<OpsScalar, kMr, kNrv>,
                             &run_block<OpsScalar, kMr, kNrv>, &pack_rows<kMr>,
                             OpsScalar::kSweepMaxD};
  return k;
}

}  // namespace vqtok::nearest_detail
