// Candidate capture of the certified fast nearest-code search, shared by its scoring kernels
// (nearest_fast_amx.cpp, nearest_fast_avx512bf16.cpp). Plain C++: each kernel computes the lane
// mask with its own instructions and calls capture_lanes for the rare rows with a hit.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>

#include "nearest_fast.h"

namespace vqtok::nearest_detail {
namespace {

// The smallest float >= v (v finite, |v| < FLT_MAX).
inline float fast_round_up(double v) {
  const float f = static_cast<float>(v);
  if (static_cast<double>(f) >= v) return f;
  uint32_t b;
  std::memcpy(&b, &f, 4);
  b = f > 0.0f ? b + 1 : f < 0.0f ? b - 1 : 1u;  // one ulp up (0 -> the smallest subnormal)
  float r;
  std::memcpy(&r, &b, 4);
  return r;
}

// Slow path of a kernel's epilogue: row `r` has scores <= thr among s[l] for the lanes l set in
// `mask` (codes base + l). Visits those lanes in ascending code order, moving best / thr down
// first; a full list drops the entries the lower best has pushed out of the band, and a list
// still full marks the row (count = kFastCap + 1: the exact search decides it).
__attribute__((noinline)) void capture_lanes(const FastBlockArgs& a, int64_t r, const float* s, int32_t base,
                                             uint64_t mask) {
  int32_t& cnt = a.count[r];
  float& best = a.best[r];
  float& thr = a.thr[r];
  int32_t* codes = a.codes + r * kFastCap;
  float* sc = a.scores + r * kFastCap;
  while (mask != 0) {
    if (cnt > kFastCap) return;  // overflowed: the row goes the exact way
    const int l = __builtin_ctzll(mask);
    mask &= mask - 1;
    const float val = s[l];
    if (!(val <= thr)) continue;  // thr moved down since the mask was taken
    if (val < best) {
      best = val;
      thr = fast_round_up(static_cast<double>(val) + a.band[r]);
    }
    if (cnt == kFastCap) {
      int keep = 0;
      for (int i = 0; i < cnt; ++i)
        if (sc[i] <= thr) codes[keep] = codes[i], sc[keep] = sc[i], ++keep;
      cnt = keep == kFastCap ? kFastCap + 1 : keep;
      if (cnt > kFastCap) return;
    }
    codes[cnt] = base + l;
    sc[cnt] = val;
    ++cnt;
  }
}

// A seed minimum v (an approximate score of a real code) lowers the row's best and threshold;
// padding rows and rows sent to the exact search (thr = -FLT_MAX) are left alone.
inline void seed_row(const FastBlockArgs& a, int64_t row, float v) {
  if (v < a.best[row] && a.thr[row] > -FLT_MAX) {
    a.best[row] = v;
    a.thr[row] = fast_round_up(static_cast<double>(v) + a.band[row]);
  }
}

}  // namespace
}  // namespace vqtok::nearest_detail
