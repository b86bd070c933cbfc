// One step of codebook health tracking; see vqtok/codebook_health.h.
#include "vqtok/codebook_health.h"
#include "vqtok/cpu_features.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace vqtok {
namespace {

inline double xlogx(double v) { return v > 0.0 ? v * std::log(v) : 0.0; }

// c log c of a count: a batch's counts are mostly small, and a table beats a log per code.
inline double clogc(int64_t c) {
  static const std::vector<double> table = [] {
    std::vector<double> t(4096, 0.0);
    for (size_t i = 2; i < t.size(); ++i) t[i] = static_cast<double>(i) * std::log(static_cast<double>(i));
    return t;
  }();
  return c < static_cast<int64_t>(table.size()) ? table[static_cast<size_t>(c)]
                                                 : static_cast<double>(c) * std::log(static_cast<double>(c));
}

// Entropy (nats) of counts / total from sum c log c: H = log T - (sum c log c) / T.
inline double entropy_of(double sum_clogc, int64_t total) {
  const double t = static_cast<double>(total);
  return std::max(0.0, std::log(t) - sum_clogc / t);
}

// The decayed, flushed EMA value (torch: mul_ then threshold_(FLT_MIN, 0)).
inline float decayed(float v, float d) {
  const float w = v * d;
  return w > FLT_MIN ? w : 0.0f;
}

// ema = flush(ema * d) over [0, k); returns how many end below `threshold`. Counted in int32
// blocks, which the compiler vectorises (an int64 count of comparisons it does not); inlined into
// one function per ISA level, each vectorised at its own width (the same bits: one multiply, one
// compare each).
__attribute__((always_inline)) inline int64_t decay_and_count_body(float* __restrict ema, int64_t k, float d,
                                                                   float threshold) {
  int64_t below = 0;
  for (int64_t start = 0; start < k; start += int64_t{1} << 20) {
    const int64_t end = std::min(k, start + (int64_t{1} << 20));
    int32_t block = 0;
    for (int64_t i = start; i < end; ++i) {
      const float v = decayed(ema[i], d);
      ema[i] = v;
      block += v < threshold ? 1 : 0;
    }
    below += block;
  }
  return below;
}

int64_t decay_and_count_sse2(float* ema, int64_t k, float d, float threshold) {
  return decay_and_count_body(ema, k, d, threshold);
}

__attribute__((target("avx2"))) int64_t decay_and_count_avx2(float* ema, int64_t k, float d, float threshold) {
  return decay_and_count_body(ema, k, d, threshold);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t decay_and_count_avx512(float* ema, int64_t k, float d,
                                                                                       float threshold) {
  return decay_and_count_body(ema, k, d, threshold);
}

int64_t decay_and_count(float* ema, int64_t k, float d, float threshold) {
  const Isa isa = active_isa();
  return isa == Isa::Avx512 ? decay_and_count_avx512(ema, k, d, threshold)
         : isa == Isa::Avx2 ? decay_and_count_avx2(ema, k, d, threshold)
                            : decay_and_count_sse2(ema, k, d, threshold);
}

// Per-thread scratch of the sparse path, kept between calls: counts (all zero between calls; only
// used entries are touched) and the list of used ids.
struct Scratch {
  std::vector<int32_t> counts;
  std::vector<int64_t> used;
};

Scratch& scratch(int64_t k) {
  thread_local Scratch s;
  if (static_cast<int64_t>(s.counts.size()) < k) s.counts.assign(static_cast<size_t>(k), 0);
  s.used.clear();
  return s;
}

}  // namespace

HealthStep health_step(float* ema, int64_t* hist, int64_t k, const int64_t* ids, int64_t n,
                       const int64_t* counts, double decay, float dead_threshold, int64_t moments_below) {
  HealthStep st;
  const float d = static_cast<float>(decay);
  if (ids == nullptr) {  // dense counts: totals first (the scale and the moments flag need them)
    for (int64_t i = 0; i < k; ++i) {
      st.total += counts[i];
      st.distinct += counts[i] > 0;
    }
    if (st.total <= 0) return st;
  } else {
    st.total = n;
    if (n <= 0) return st;
  }
  const float scale = static_cast<float>((1.0 - decay) / static_cast<double>(st.total));

  if (ids == nullptr) {
    st.moments = moments_below > 0 && st.distinct * moments_below < k;
    int64_t dead = 0;
    double sum_clogc = 0.0, ds = 0.0, dx = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      float v = decayed(ema[i], d);
      const int64_t c = counts[i];
      if (c > 0) {
        const float before = v;
        v = v + static_cast<float>(c) * scale;
        hist[i] += c;
        sum_clogc += clogc(c);
        if (st.moments) {
          ds += static_cast<double>(v) - static_cast<double>(before);
          dx += xlogx(v) - xlogx(before);
        }
      }
      ema[i] = v;
      dead += v < dead_threshold;
    }
    st.dead = dead;
    st.batch_entropy = entropy_of(sum_clogc, st.total);
    st.d_sum = ds;
    st.d_xlogx = dx;
    return st;
  }

  // sparse: count the ids, decay every code, then add the batch at the used ones
  Scratch& sc = scratch(k);
  std::vector<int32_t>& cnt = sc.counts;
  std::vector<int64_t>& used = sc.used;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t id = ids[j];
    if (cnt[id]++ == 0) used.push_back(id);
  }
  st.distinct = static_cast<int64_t>(used.size());
  st.moments = moments_below > 0 && st.distinct * moments_below < k;
  int64_t dead = decay_and_count(ema, k, d, dead_threshold);
  double sum_clogc = 0.0, ds = 0.0, dx = 0.0;
  for (const int64_t id : used) {
    const int64_t c = cnt[id];
    cnt[id] = 0;
    const float before = ema[id];
    const float after = before + static_cast<float>(c) * scale;
    ema[id] = after;
    dead += static_cast<int64_t>(after < dead_threshold) - static_cast<int64_t>(before < dead_threshold);
    hist[id] += c;
    sum_clogc += clogc(c);
    if (st.moments) {
      ds += static_cast<double>(after) - static_cast<double>(before);
      dx += xlogx(after) - xlogx(before);
    }
  }
  st.dead = dead;
  st.batch_entropy = entropy_of(sum_clogc, st.total);
  st.d_sum = ds;
  st.d_xlogx = dx;
  return st;
}

}  // namespace vqtok
