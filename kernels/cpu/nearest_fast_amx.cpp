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
#include <algorithm>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "nearest_fast.h"
#include "nearest_fast_capture.h"

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

// Slow path of the epilogue: row `r` has a score <= thr among s[0..nl) (codes base..base+nl-1).
inline void capture(const FastBlockArgs& a, int64_t r, const float* s, int32_t base, int nl) {
  uint64_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(a.thr[r]), _CMP_LE_OQ);
  if (nl > W) m |= uint64_t(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + W), _mm512_set1_ps(a.thr[r]), _CMP_LE_OQ)) << 16;
  capture_lanes(a, r, s, base, m);
}

// Epilogue of one 16-row x 16-code step from its stored accumulator (cb: 16 x 16 dots):
// scores = norms + dots, then the per-row threshold test (seed pass: the running minimum).
inline void epilogue(const FastBlockArgs& a, int64_t r0, int32_t base, const float* nrm, float* cb) {
  const __m512 n0 = _mm512_loadu_ps(nrm);
  for (int r = 0; r < 16; ++r) {
    const __m512 s0 = _mm512_add_ps(n0, _mm512_load_ps(cb + r * W));
    if (_mm512_cmp_ps_mask(s0, _mm512_set1_ps(a.thr[r0 + r]), _CMP_LE_OQ)) {
      _mm512_store_ps(cb + r * W, s0);
      capture(a, r0 + r, cb + r * W, base, W);
    }
  }
}

inline void seed_epilogue(const float* nrm, const float* cb, float* mins) {
  const __m512 n0 = _mm512_loadu_ps(nrm);
  for (int r = 0; r < 16; ++r)
    _mm512_store_ps(mins + r * W, _mm512_min_ps(_mm512_load_ps(mins + r * W), _mm512_add_ps(n0, _mm512_load_ps(cb + r * W))));
}

// One step: 16 rows (tmm4; reloaded per 16-pair slice when nk > 1) x 16 codes into accumulator
// C (zeroed first) with code tile B. A macro: GCC's tile intrinsics need literal tile numbers.
#define VQTOK_AMX_STEP(C, B, j)                                  \
  do {                                                           \
    const uint32_t* bp_ = bptr(j);                               \
    _tile_zero(C);                                               \
    for (int64_t kk = 0; kk < nk; ++kk) {                        \
      if (nk > 1) _tile_loadd(4, xa + kk * 16, xs);              \
      _tile_loadd(B, bp_ + kk * kc * CW, CW * 4);                \
      _tile_dpbf16ps(C, 4, B);                                   \
    }                                                            \
  } while (0)

// Two steps (j, j+1) into accumulators (C0, C1) sharing each 16-pair slice of the rows (large d:
// one row-tile load per two code tiles).
#define VQTOK_AMX_STEP2(C0, C1, j)                               \
  do {                                                           \
    const uint32_t* bp0_ = bptr(j);                              \
    const uint32_t* bp1_ = bptr((j) + 1);                        \
    _tile_zero(C0);                                              \
    _tile_zero(C1);                                              \
    for (int64_t kk = 0; kk < nk; ++kk) {                        \
      _tile_loadd(4, xa + kk * 16, xs);                          \
      _tile_loadd(5, bp0_ + kk * kc * CW, CW * 4);               \
      _tile_loadd(6, bp1_ + kk * kc * CW, CW * 4);               \
      _tile_dpbf16ps(C0, 4, 5);                                  \
      _tile_dpbf16ps(C1, 4, 6);                                  \
    }                                                            \
  } while (0)

// Stores accumulator C into its buffer (tested one step later: loads right after a tile store
// would wait for it to reach L1).
#define VQTOK_AMX_STORE(C) _tile_stored(C, cbuf[C], W * 4)

// NSTEPS steps (a multiple of 4) through accumulators tmm0-3 and code tiles tmm5-6 with the rows
// held in tmm4 (d2 <= 16): step j's accumulator is stored two steps after its TDPBF16PS and
// CHECK(j), the epilogue macro, reads it one step later still.
#define VQTOK_AMX_PIPELINE(NSTEPS, CHECK)                        \
  do {                                                           \
    for (int64_t j = 0; j < (NSTEPS); j += 4) {                  \
      VQTOK_AMX_STEP(0, 5, j);                                   \
      if (j > 0) { VQTOK_AMX_STORE(2); CHECK(j - 3); }           \
      VQTOK_AMX_STEP(1, 6, j + 1);                               \
      if (j > 0) { VQTOK_AMX_STORE(3); CHECK(j - 2); }           \
      VQTOK_AMX_STEP(2, 5, j + 2);                               \
      VQTOK_AMX_STORE(0);                                        \
      if (j > 0) CHECK(j - 1);                                   \
      VQTOK_AMX_STEP(3, 6, j + 3);                               \
      VQTOK_AMX_STORE(1);                                        \
      CHECK(j);                                                  \
    }                                                            \
    VQTOK_AMX_STORE(2);                                          \
    CHECK((NSTEPS) - 3);                                         \
    VQTOK_AMX_STORE(3);                                          \
    CHECK((NSTEPS) - 2);                                         \
    CHECK((NSTEPS) - 1);                                         \
  } while (0)

// Stores accumulator C (the step jj) and runs its epilogue.
#define VQTOK_AMX_FLUSH(C, jj, EPI)                              \
  do {                                                           \
    _tile_stored(C, cbuf[C], W * 4);                             \
    EPI;                                                         \
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

// Steps of 16 codes rotate through four accumulators (tmm0-3) and two code tiles (tmm5-6): a
// step's accumulator is stored two steps after its TDPBF16PS was issued and its scores are
// tested one step later still, so tile stores and the epilogue overlap the dot products instead
// of waiting for their latency.
//
// Seed pass. A row's scan starts with no best score, so early codes all land under its
// threshold and the capture slow path runs for most of them. When seed_steps > 0 each row tile
// first takes the minimum over the first seed_steps steps (no capture) and starts from it: a
// real approximate score, so the band logic is unchanged, and captures become rare.
void fast_block_amx(const FastBlockArgs& a, int64_t seed_steps) {
  const int64_t d2 = a.d2, kc = d2 <= 16 ? d2 : 16, nk = d2 / kc;  // d2 > 16 is a multiple of 16
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(kc * 4);
  for (int t = 5; t < 7; ++t) cfg.rows[t] = static_cast<uint8_t>(kc), cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) float cbuf[4][16 * W];
  alignas(64) float mins[16 * W];
  const int64_t xs = d2 * 4;                  // bytes per x row
  const int64_t steps = a.nchunks * CW / 16;  // 16 codes per step (a multiple of 4)
  seed_steps = std::min(seed_steps, steps) / 4 * 4;
  for (int64_t r0 = 0; r0 < a.rows; r0 += 16) {
    const uint32_t* xa = a.xq + r0 * d2;
    if (nk == 1) _tile_loadd(4, xa, xs);  // the rows stay in tmm4 for the whole panel
    auto bptr = [&](int64_t j) { return a.panel + (j / 4) * d2 * CW + (j % 4) * 16; };
    auto base = [&](int64_t j) { return a.code_base + static_cast<int32_t>(j * 16); };
#define VQTOK_SEED(jj) seed_epilogue(a.norms + (jj) * 16, cbuf[(jj) % 4], mins)
#define VQTOK_TEST(jj) epilogue(a, r0, base(jj), a.norms + (jj) * 16, cbuf[(jj) % 4])
    if (seed_steps > 0) {
      for (int i = 0; i < 16 * W; ++i) mins[i] = FLT_MAX;
      VQTOK_AMX_PIPELINE(seed_steps, VQTOK_SEED);
      for (int r = 0; r < 16; ++r) {
        seed_row(a, r0 + r, _mm512_reduce_min_ps(_mm512_load_ps(mins + r * W)));
      }
    }
    if (nk == 1) {
      VQTOK_AMX_PIPELINE(steps, VQTOK_TEST);
    } else {  // d2 > 16: long TDPBF16PS chains hide the latency; share the row-tile loads
      for (int64_t j = 0; j < steps; j += 4) {
        VQTOK_AMX_STEP2(0, 1, j);
        if (j > 0) {
          VQTOK_AMX_FLUSH(2, j - 2, VQTOK_TEST(j - 2));
          VQTOK_AMX_FLUSH(3, j - 1, VQTOK_TEST(j - 1));
        }
        VQTOK_AMX_STEP2(2, 3, j + 2);
        VQTOK_AMX_FLUSH(0, j, VQTOK_TEST(j));
        VQTOK_AMX_FLUSH(1, j + 1, VQTOK_TEST(j + 1));
      }
      VQTOK_AMX_FLUSH(2, steps - 2, VQTOK_TEST(steps - 2));
      VQTOK_AMX_FLUSH(3, steps - 1, VQTOK_TEST(steps - 1));
    }
#undef VQTOK_SEED
#undef VQTOK_TEST
  }
  _tile_release();
}
#undef VQTOK_AMX_STEP
#undef VQTOK_AMX_STEP2
#undef VQTOK_AMX_FLUSH
#undef VQTOK_AMX_STORE
#undef VQTOK_AMX_PIPELINE

}  // namespace vqtok::nearest_detail
