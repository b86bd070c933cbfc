// AMX-BF16 scoring kernel of the certified fast nearest-code search (see nearest_fast.h).
//
// A micro-tile is 32 query rows x 32 codes in four 16 x 16 fp32 accumulator tiles (tmm0-3),
// started at the codes' norms (a stride-0 tile load repeats the 16 norms on every row), with
// two row tiles of x (tmm4-5) and two code tiles (tmm6-7) per step of up to 16 feature pairs:
// four TDPBF16PS per step, 16 x 16 x 32 multiply-adds each. The accumulators are stored to a
// 4 KiB buffer and each row's 32 scores cost two loads, a min and one compare against the row's
// capture threshold; the rare rows with a score under it take the capture slow path.
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "nearest_fast.h"

namespace vqtok::nearest_detail {
namespace {

constexpr int W = 16, CW = kFastNRV * kFastWidth;  // codes per panel chunk

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of each tile
  uint8_t rows[16] = {};
};

inline float round_up_f(double v) {
  const float f = static_cast<float>(v);
  return static_cast<double>(f) >= v ? f : std::nextafter(f, FLT_MAX);
}

// Slow path of the epilogue: row `r` has a score <= thr among s[0..32) (codes base..base+31).
// Visits only the lanes <= thr, in ascending code order, moving best / thr down first.
__attribute__((noinline)) void capture(const FastBlockArgs& a, int64_t r, const float* s, int32_t base) {
  int32_t& cnt = a.count[r];
  float& best = a.best[r];
  float& thr = a.thr[r];
  int32_t* codes = a.codes + r * kFastCap;
  float* sc = a.scores + r * kFastCap;
  uint32_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(thr), _CMP_LE_OQ) |
               uint32_t(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + W), _mm512_set1_ps(thr), _CMP_LE_OQ)) << 16;
  while (m != 0) {
    if (cnt > kFastCap) return;  // overflowed: the row goes the exact way
    const int l = __builtin_ctz(m);
    m &= m - 1;
    const float val = s[l];
    if (!(val <= thr)) continue;  // thr moved down since the mask was taken
    if (val < best) {
      best = val;
      thr = round_up_f(static_cast<double>(val) + a.band[r]);
    }
    if (cnt == kFastCap) {  // full: drop entries the lower best has pushed out of the band
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

// Epilogue of one 16-row x 32-code step, from its stored accumulators (cb: 16 rows x 32 dots,
// row-major): scores = norms + dots, then the per-row threshold test.
inline void epilogue(const FastBlockArgs& a, int64_t r0, int32_t base, const float* nrm, const float* cb) {
  const __m512 n0 = _mm512_loadu_ps(nrm), n1 = _mm512_loadu_ps(nrm + W);
  for (int r = 0; r < 16; ++r) {
    const __m512 s0 = _mm512_add_ps(n0, _mm512_load_ps(cb + r * 2 * W));
    const __m512 s1 = _mm512_add_ps(n1, _mm512_load_ps(cb + r * 2 * W + W));
    if (_mm512_cmp_ps_mask(_mm512_min_ps(s0, s1), _mm512_set1_ps(a.thr[r0 + r]), _CMP_LE_OQ)) {
      alignas(64) float s[2 * W];
      _mm512_store_ps(s, s0);
      _mm512_store_ps(s + W, s1);
      capture(a, r0 + r, s, base);
    }
  }
}

// One step: 16 rows (tmm4; reloaded per 16-pair slice when nk > 1) x 32 codes into the
// accumulator pair (C0, C1), zeroed first. A macro: GCC's tile intrinsics need literal tiles.
#define VQTOK_AMX_STEP(C0, C1, bp)                           \
  do {                                                       \
    _tile_zero(C0);                                          \
    _tile_zero(C1);                                          \
    for (int64_t kk = 0; kk < nk; ++kk) {                    \
      if (nk > 1) _tile_loadd(4, xa + kk * 16, xs);          \
      _tile_loadd(6, (bp) + kk * kc * CW, CW * 4);           \
      _tile_loadd(7, (bp) + kk * kc * CW + 16, CW * 4);      \
      _tile_dpbf16ps(C0, 4, 6);                              \
      _tile_dpbf16ps(C1, 4, 7);                              \
    }                                                        \
  } while (0)

}  // namespace

bool amx_bf16_usable() {
  static const bool ok = [] {
#if defined(__linux__) && defined(__x86_64__)
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (((d >> 22) & 1u) == 0 || ((d >> 24) & 1u) == 0) return false;  // AMX-BF16, AMX-TILE
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (((c >> 27) & 1u) == 0) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;  // XTILECFG and XTILEDATA state enabled
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;  // Linux >= 5.16
#else
    return false;
#endif
  }();
  return ok;
}

// Steps alternate between accumulator pairs (tmm0, tmm1) and (tmm2, tmm3): while TMUL works on
// one step, the previous step's pair is stored and its scores tested, so the tile stores and the
// epilogue overlap the dot products instead of waiting for them.
void fast_block_amx(const FastBlockArgs& a) {
  const int64_t d2 = a.d2, kc = d2 <= 16 ? d2 : 16, nk = d2 / kc;  // d2 > 16 is a multiple of 16
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 128 / 2;
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(kc * 4);
  for (int t = 6; t < 8; ++t) cfg.rows[t] = static_cast<uint8_t>(kc), cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) float cbuf[2][16 * 2 * W];
  const int64_t xs = d2 * 4;                // bytes per x row
  const int64_t steps = a.nchunks * CW / 32;  // 32 codes per step
  for (int64_t r0 = 0; r0 < a.rows; r0 += 16) {
    const uint32_t* xa = a.xq + r0 * d2;
    if (nk == 1) _tile_loadd(4, xa, xs);  // the rows stay in tmm4 for the whole panel
    auto bptr = [&](int64_t j) { return a.panel + (j / 2) * d2 * CW + (j % 2) * 32; };
    auto base = [&](int64_t j) { return a.code_base + static_cast<int32_t>(j * 32); };
    for (int64_t j = 0; j < steps; j += 2) {
      VQTOK_AMX_STEP(0, 1, bptr(j));
      if (j > 0) {  // previous odd step: pair (2, 3)
        _tile_stored(2, cbuf[1], 2 * W * 4);
        _tile_stored(3, cbuf[1] + W, 2 * W * 4);
        epilogue(a, r0, base(j - 1), a.norms + (j - 1) * 32, cbuf[1]);
      }
      VQTOK_AMX_STEP(2, 3, bptr(j + 1));  // steps is even: a chunk is two steps
      _tile_stored(0, cbuf[0], 2 * W * 4);
      _tile_stored(1, cbuf[0] + W, 2 * W * 4);
      epilogue(a, r0, base(j), a.norms + j * 32, cbuf[0]);
    }
    _tile_stored(2, cbuf[1], 2 * W * 4);
    _tile_stored(3, cbuf[1] + W, 2 * W * 4);
    epilogue(a, r0, base(steps - 1), a.norms + (steps - 1) * 32, cbuf[1]);
  }
  _tile_release();
}
#undef VQTOK_AMX_STEP

}  // namespace vqtok::nearest_detail
