// Driver of the exact nearest-code search: codebook norms, panel packing, OpenMP over query
// blocks, lane-state reduction, the fp32 error-bound certificate and the direct-form re-decision.
//
// Certificate. The kernels compute s_k = fl(|c_k|^2 + sum_j (-2 x_j) c_kj) in fp32 (any order,
// FMA or not). With u = 2^-24 and g = (2d+2)u / (1 - (2d+2)u),
//   |s_k - t_k| <= E = g * (max_k |c_k|^2 + 2 * min(|x|_1 max_kj |c_kj|, |x|_2 max_k |c_k|_2))
// (plus a few subnormal quanta), where t_k is the exact |c_k|^2 - 2 x.c_k. If the best and
// second-best computed scores differ by more than 2E the best is the unique exact winner; other
// rows are re-decided by a direct-form scan sum((x - c)^2) in double (ties -> lowest index).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "nearest_kernels.h"
#include "vqtok/cpu_features.h"
#include "vqtok/nearest.h"

namespace vqtok {
namespace nearest_detail {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -f : f;
  }
  if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((exp + 112u) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Converts n consecutive elements starting at element `off` of a dtype array to float.
void to_float(const void* p, DType t, int64_t off, int64_t n, float* out) {
  if (t == DType::F32) {
    std::memcpy(out, static_cast<const float*>(p) + off, static_cast<size_t>(n) * 4);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p) + off;
    if (t == DType::F16)
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
    else
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(h[i]);
  }
}

const BlockKernel& pick_kernel(int64_t d) {
  switch (active_isa()) {
    case Isa::Avx512: return avx512_kernel(d);
    case Isa::Avx2: return avx2_kernel(d);
    default: return scalar_kernel(d);
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct CodebookStats {
  double norm2_max = 0, abs_max = 0, norm_max = 0;
};

// |c_k|^2 (double, rounded to fp32) and the maxima the certificate needs.
CodebookStats codebook_norms(const void* cb, DType t, int64_t k, int64_t d, float* norms) {
  double n2max = 0, amax = 0;
#pragma omp parallel if (k * d > (int64_t{1} << 18)) reduction(max : n2max, amax)
  {
    std::vector<float> row(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < k; ++i) {
      to_float(cb, t, i * d, d, row.data());
      double s = 0, m = 0;
      for (int64_t j = 0; j < d; ++j) {
        s += static_cast<double>(row[j]) * row[j];
        m = std::max(m, static_cast<double>(std::fabs(row[j])));
      }
      norms[i] = static_cast<float>(s);
      n2max = std::max(n2max, s);
      amax = std::max(amax, m);
    }
  }
  return {n2max, amax, std::sqrt(n2max)};
}

// Lowest index minimising sum((x - c)^2) in double. x64: d doubles.
template <DType T>
int64_t scan_direct(const double* x64, const void* cb, int64_t k, int64_t d, double* dist) {
  int64_t best = 0;
  double bd = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < k; ++i) {
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      double c;
      if constexpr (T == DType::F32) c = static_cast<const float*>(cb)[i * d + j];
      else if constexpr (T == DType::F16) c = half_to_float(static_cast<const uint16_t*>(cb)[i * d + j]);
      else c = bf16_to_float(static_cast<const uint16_t*>(cb)[i * d + j]);
      const double e = x64[j] - c;
      s += e * e;
    }
    if (s < bd) bd = s, best = i;
  }
  *dist = bd;
  return best;
}

double direct_dist(const double* x64, const void* cb, DType t, int64_t i, int64_t d, float* tmp) {
  to_float(cb, t, i * d, d, tmp);
  double s = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double e = x64[j] - static_cast<double>(tmp[j]);
    s += e * e;
  }
  return s;
}

// Everything one search needs; the panel buffers are shared by the threads.
struct Search {
  const BlockKernel& kern;
  const void* x;
  const void* cb;
  DType dtype;
  int64_t n, k, d;
  int64_t cw;  // codes per chunk (width * nrv)
  int64_t kp;  // codes per panel (a multiple of cw)
  std::vector<float> cnorm, panel, pnorm;

  Search(const BlockKernel& kr, const void* x_, const void* cb_, DType t, int64_t n_, int64_t k_,
         int64_t d_)
      : kern(kr), x(x_), cb(cb_), dtype(t), n(n_), k(k_), d(d_), cw(int64_t{kr.width} * kr.nrv) {
    // ~1 MiB of packed codes per panel: fits each core's L2 next to the streaming rows.
    kp = std::max<int64_t>(cw, (int64_t{1} << 20) / (4 * d) / cw * cw);
    kp = std::min(kp, round_up(k, cw));
    cnorm.resize(static_cast<size_t>(k));
    panel.resize(static_cast<size_t>(kp * d));
    pnorm.resize(static_cast<size_t>(kp));
  }

  int64_t chunks_in(int64_t c0) const { return (std::min(kp, k - c0) + cw - 1) / cw; }

  // Packs codes [c0, c0 + chunks*cw) as -2*c in [chunk][d][cw] order. Call inside a parallel
  // region (work-shared loop, implicit barrier at the end). crow: d floats of scratch.
  void pack(int64_t c0, float* crow) {
    const int64_t nch = chunks_in(c0), w = kern.width, groups = nch * kern.nrv;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t q = g / kern.nrv, lane0 = (g % kern.nrv) * w;
      float* dst = panel.data() + q * d * cw + lane0;
      for (int64_t l = 0; l < w; ++l) {
        const int64_t code = c0 + g * w + l;
        if (code < k) {
          to_float(cb, dtype, code * d, d, crow);
          for (int64_t j = 0; j < d; ++j) dst[j * cw + l] = -2.0f * crow[j];
          pnorm[g * w + l] = cnorm[code];
        } else {
          for (int64_t j = 0; j < d; ++j) dst[j * cw + l] = 0.0f;
          pnorm[g * w + l] = kInf;
        }
      }
    }
  }

  // Converts rows `ids[0..rows)` (or rows r0.. when ids is null) into xbuf, zero-padded to rpad.
  const float* load_rows(int64_t r0, const int64_t* ids, int64_t rows, int64_t rpad, float* xbuf) const {
    if (ids == nullptr && dtype == DType::F32 && rows == rpad)
      return static_cast<const float*>(x) + r0 * d;
    for (int64_t r = 0; r < rows; ++r)
      to_float(x, dtype, (ids ? ids[r] : r0 + r) * d, d, xbuf + r * d);
    std::fill(xbuf + rows * d, xbuf + rpad * d, 0.0f);
    return xbuf;
  }
};

}  // namespace
}  // namespace nearest_detail

NearestStats nearest_code_l2(const void* x, const void* codebook, int64_t n, int64_t k, int64_t d,
                             DType dtype, bool /*fast*/, int64_t* out_idx, float* out_dist) {
  using namespace nearest_detail;
  Search S(pick_kernel(d), x, codebook, dtype, n, k, d);
  NearestStats stats;
  stats.isa = S.kern.name;
  if (n <= 0) return stats;
  const int mr = S.kern.mr;
  const CodebookStats cs = codebook_norms(codebook, dtype, k, d, S.cnorm.data());

  // Error bound of a score: gamma_m with m = d + 2 roundings for FMA chains (2d + 2 otherwise).
  const double u = std::ldexp(1.0, -24), m = (S.kern.fma ? 1.0 : 2.0) * d + 2.0;
  const double gamma = m * u < 0.5 ? m * u / (1 - m * u) : std::numeric_limits<double>::infinity();
  // Scores stay far from fp32 overflow when |c|^2 and |x|^2 are below 1e36 (|s| < 3e36);
  // other inputs take the plain direct-form scan.
  const bool huge = cs.norm2_max > 1e36;

  // Row blocks of the main pass: ~64 KiB of rows (at least 16 micro-tiles for small d).
  int64_t mb = std::clamp<int64_t>(16384 / d / mr * mr, int64_t{mr} * 2, int64_t{mr} * kMaxBlockTiles);
  mb = std::min(mb, round_up(n, mr));
  const int64_t nblocks = (n + mb - 1) / mb;
  // Rows re-decided by scores are processed fb at a time (scores buffer fb x kp floats).
  const int64_t fb = int64_t{mr} * 2;

  std::vector<float> gbest(static_cast<size_t>(n), kInf), gsec(static_cast<size_t>(n), kInf);
  std::vector<int32_t> gidx(static_cast<size_t>(n), 0);
  std::vector<double> bound(static_cast<size_t>(n));
  std::vector<int64_t> redo;        // rows whose gap is inside the bound
  std::vector<double> redo_dist;    // their best direct-form distance so far
  int64_t exact_rows = 0;

  // Small searches (< ~1 ms of FMA work) run on one thread: the region's barriers would cost
  // more than they save, especially when another process holds one of the cores.
  const bool parallel = 2.0 * static_cast<double>(n) * k * d > 2e8 && nblocks > 1;

#pragma omp parallel if (parallel) reduction(+ : exact_rows)
  {
    std::vector<float> xbuf(static_cast<size_t>(std::max(mb, fb) * d));
    std::vector<float> crow(static_cast<size_t>(d));
    std::vector<double> x64(static_cast<size_t>(d));

    // 1. fp32 scores, best / second per row.
    for (int64_t c0 = 0; c0 < k; c0 += S.kp) {
      S.pack(c0, crow.data());
      const int64_t nch = S.chunks_in(c0);
#pragma omp for schedule(static)
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t r0 = blk * mb, rows = std::min(mb, n - r0), rpad = round_up(rows, mr);
        BlockArgs a{S.load_rows(r0, nullptr, rows, rpad, xbuf.data()), rpad, rows, d,
                    S.panel.data(), S.pnorm.data(), nch, static_cast<int32_t>(c0),
                    gbest.data() + r0, gsec.data() + r0, gidx.data() + r0, nullptr, 0};
        S.kern.run(a);
      }
    }

    // 2. Certificate: a gap above 2E proves the winner; the others are re-decided.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      to_float(x, dtype, r * d, d, crow.data());
      double l1 = 0, l2 = 0;
      for (int64_t j = 0; j < d; ++j) {
        l1 += std::fabs(static_cast<double>(crow[j]));
        l2 += static_cast<double>(crow[j]) * crow[j];
      }
      const double dots = std::min(l1 * cs.abs_max, std::sqrt(l2) * cs.norm_max);
      bound[r] = gamma * (cs.norm2_max + 2.0 * dots) * (1 + 1e-6) + m * std::ldexp(1.0, -147);
      if (huge || l2 >= 1e36) bound[r] = std::numeric_limits<double>::infinity();
    }
#pragma omp single
    {
      for (int64_t r = 0; r < n; ++r) {
        const double gap = static_cast<double>(gsec[r]) - static_cast<double>(gbest[r]);
        if (!(gap > 2.0 * bound[r])) redo.push_back(r);
      }
      redo_dist.assign(redo.size(), std::numeric_limits<double>::infinity());
    }  // implicit barrier

    // 3a. Inputs beyond the bound's range: a plain direct-form scan.
    const int64_t nredo = static_cast<int64_t>(redo.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nredo; ++i) {
      const int64_t r = redo[i];
      if (!std::isinf(bound[r])) continue;
      to_float(x, dtype, r * d, d, crow.data());
      for (int64_t j = 0; j < d; ++j) x64[j] = crow[j];
      double dist;
      if (dtype == DType::F32) gidx[r] = static_cast<int32_t>(scan_direct<DType::F32>(x64.data(), codebook, k, d, &dist));
      else if (dtype == DType::F16) gidx[r] = static_cast<int32_t>(scan_direct<DType::F16>(x64.data(), codebook, k, d, &dist));
      else gidx[r] = static_cast<int32_t>(scan_direct<DType::BF16>(x64.data(), codebook, k, d, &dist));
      redo_dist[i] = dist;
    }

    // 3b. Near ties: scores again (same kernel, same bound); every code with s <= best + 2E may
    // be the exact winner and is decided in the direct form (ascending codes, strict <).
    const int64_t nfb = (nredo + fb - 1) / fb;
    if (nfb > 0) {
      std::vector<float> scores(static_cast<size_t>(fb * S.kp));
      for (int64_t c0 = 0; c0 < k; c0 += S.kp) {
        S.pack(c0, crow.data());
        const int64_t nch = S.chunks_in(c0), ncodes = std::min(S.kp, k - c0);
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < nfb; ++b) {
          const int64_t i0 = b * fb, rows = std::min(fb, nredo - i0), rpad = round_up(rows, mr);
          BlockArgs a{S.load_rows(0, redo.data() + i0, rows, rpad, xbuf.data()), rpad, rows, d,
                      S.panel.data(), S.pnorm.data(), nch, static_cast<int32_t>(c0), nullptr,
                      nullptr, nullptr, scores.data(), S.kp};
          S.kern.run(a);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = redo[i0 + i];
            if (std::isinf(bound[r])) continue;
            const double thr = static_cast<double>(gbest[r]) + 2.0 * bound[r];
            const float* xr = xbuf.data() + i * d;
            for (int64_t j = 0; j < d; ++j) x64[j] = xr[j];
            const float* sr = scores.data() + i * S.kp;
            for (int64_t c = 0; c < ncodes; ++c) {
              if (static_cast<double>(sr[c]) > thr) continue;
              const double dd = direct_dist(x64.data(), codebook, dtype, c0 + c, d, crow.data());
              if (dd < redo_dist[i0 + i]) redo_dist[i0 + i] = dd, gidx[r] = static_cast<int32_t>(c0 + c);
            }
          }
        }
      }
    }

    // 4. Outputs: the winner's direct-form distance.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      out_idx[r] = gidx[r];
      to_float(x, dtype, r * d, d, crow.data());
      for (int64_t j = 0; j < d; ++j) x64[j] = crow[j];
      out_dist[r] = static_cast<float>(direct_dist(x64.data(), codebook, dtype, gidx[r], d, crow.data()));
    }
#pragma omp single
    exact_rows = nredo;
  }
  stats.exact_rows = exact_rows;
  return stats;
}

}  // namespace vqtok
