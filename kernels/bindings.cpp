// The single pybind11 file of vqtok._C: argument checks with readable messages, GIL released
// while kernels run. Kernels themselves are torch-free and take raw pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "vqtok/codebook_health.h"
#include "vqtok/cpu_features.h"
#include "vqtok/fsq_lfq.h"
#include "vqtok/host_buffer.h"
#include "vqtok/nearest.h"

namespace py = pybind11;

// ---- nearest-code search -------------------------------------------------------------------
namespace {

// Raises ValueError with `msg` when `cond` fails.
#define VQTOK_CHECK(cond, msg)                  \
  do {                                          \
    if (!(cond)) throw py::value_error(msg);    \
  } while (0)

py::tuple nearest_code_l2_py(uintptr_t x, uintptr_t codebook, int64_t n, int64_t k, int64_t d,
                             int dtype, bool fast, uintptr_t out_idx, uintptr_t out_dist) {
  const std::string where = "vqtok._C.nearest_code_l2: ";
  VQTOK_CHECK(n >= 0, where + "n (rows of x) must be >= 0, got " + std::to_string(n));
  VQTOK_CHECK(k >= 1 && k < (int64_t{1} << 31),
              where + "k (codes) must be in [1, 2^31), got " + std::to_string(k));
  VQTOK_CHECK(d >= 1 && d <= (int64_t{1} << 20),
              where + "d (feature dim) must be in [1, 2^20], got " + std::to_string(d));
  VQTOK_CHECK(dtype >= 0 && dtype <= 2,
              where + "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                  std::to_string(dtype));
  VQTOK_CHECK(codebook != 0, where + "codebook pointer is null");
  VQTOK_CHECK(n == 0 || (x != 0 && out_idx != 0 && out_dist != 0),
              where + "x, out_idx and out_dist pointers must be non-null when n > 0");
  vqtok::NearestStats st;
  {
    py::gil_scoped_release nogil;
    st = vqtok::nearest_code_l2(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(codebook),
                                n, k, d, static_cast<vqtok::DType>(dtype), fast,
                                reinterpret_cast<int64_t*>(out_idx), reinterpret_cast<float*>(out_dist));
  }
  return py::make_tuple(st.exact_rows, std::string(st.isa));
}

void bind_nearest(py::module_& m) {
  m.def("nearest_code_l2", &nearest_code_l2_py, py::arg("x"), py::arg("codebook"), py::arg("n"),
        py::arg("k"), py::arg("d"), py::arg("dtype"), py::arg("fast"), py::arg("out_idx"),
        py::arg("out_dist"),
        "Exact nearest code by squared L2 on raw pointers (data_ptr()): x n*d and codebook k*d "
        "contiguous elements of one dtype (0 f32, 1 f16, 2 bf16); writes out_idx (n int64) and "
        "out_dist (n float32). fast: the certified bf16 path where nearest_fast_isa() is not empty "
        "(same answer). Returns (rows re-decided in the direct form, or in fast mode rows sent to the "
        "exact search; ISA used).");
  m.def("nearest_fast_isa", [] { return std::string(vqtok::nearest_fast_kernel()); },
        "The kernel nearest_code_l2(fast=True) runs here now: 'amx-bf16', 'avx512-bf16', or '' when it "
        "runs the exact path (VQTOK_ISA and VQTOK_NEAREST_FAST_KERNEL are read at each call).");
  m.def(
      "nearest_fast_kernels",
      [] {
        py::list out;
        for (const char* name : {"amx-bf16", "avx512-bf16"})
          if (vqtok::nearest_fast_kernel_usable(name)) out.append(name);
        return out;
      },
      "The fast mode's kernels this CPU can run (VQTOK_NEAREST_FAST_KERNEL picks one of them).");
  m.def(
      "nearest_layout",
      [](int64_t n, int64_t k, int64_t d) {
        VQTOK_CHECK(n >= 0 && k >= 1 && d >= 1, "nearest_layout needs n >= 0, k >= 1, d >= 1, got n=" +
                                                    std::to_string(n) + " k=" + std::to_string(k) + " d=" + std::to_string(d));
        const vqtok::NearestLayout L = vqtok::nearest_layout(n, k, d);
        py::dict out;
        out["rows_per_tile"] = L.rows_per_tile;
        out["codes_per_chunk"] = L.codes_per_chunk;
        out["codes_per_panel"] = L.codes_per_panel;
        out["rows_per_block"] = L.rows_per_block;
        out["rows_per_super_block"] = L.rows_per_super_block;
        return out;
      },
      py::arg("n"), py::arg("k"), py::arg("d"),
      "How the exact search at the active SIMD level splits n rows x k codes of d features: "
      "rows_per_tile, codes_per_chunk, codes_per_panel, rows_per_block, rows_per_super_block (0: none).");
  m.def("nearest_fast_runs", &vqtok::nearest_fast_runs, py::arg("k"), py::arg("d"),
        "True when nearest_code_l2(fast=True) takes the bf16 path for k codes of d features (by size; "
        "VQTOK_NEAREST_FAST=always forces it).");
}

// ---- codebook health -----------------------------------------------------------------------
void bind_health(py::module_& m) {
  m.def(
      "health_step",
      [](uintptr_t ema, uintptr_t hist, int64_t k, uintptr_t ids, int64_t n, uintptr_t counts, double decay,
         float dead_threshold, int64_t moments_below) {
        const std::string where = "vqtok._C.health_step: ";
        VQTOK_CHECK(k >= 1, where + "k (codes) must be >= 1, got " + std::to_string(k));
        VQTOK_CHECK(ema != 0 && hist != 0, where + "ema and hist pointers must be non-null");
        VQTOK_CHECK(ids != 0 || counts != 0, where + "give ids or counts");
        VQTOK_CHECK(ids == 0 || n >= 0, where + "n (ids) must be >= 0, got " + std::to_string(n));
        VQTOK_CHECK(decay >= 0.0 && decay < 1.0, where + "decay must be in [0, 1)");
        const vqtok::HealthStep st = vqtok::health_step(
            reinterpret_cast<float*>(ema), reinterpret_cast<int64_t*>(hist), k,
            reinterpret_cast<const int64_t*>(ids), n, reinterpret_cast<const int64_t*>(counts), decay,
            dead_threshold, moments_below);
        return py::make_tuple(st.distinct, st.total, st.batch_entropy, st.dead, st.moments, st.d_sum, st.d_xlogx);
      },
      py::arg("ema"), py::arg("hist"), py::arg("k"), py::arg("ids"), py::arg("n"), py::arg("counts"),
      py::arg("decay"), py::arg("dead_threshold"), py::arg("moments_below"),
      "One CodebookHealth update on raw pointers (data_ptr()): ema (k float32) and hist (k int64) "
      "in place, from ids (n int64 in [0, k), counted here) or, with ids=0, dense counts (k int64). "
      "Returns (distinct codes, total ids, batch entropy in nats, dead codes after the update, "
      "whether the moment changes were taken, their change of sum w, of sum w log w); see "
      "kernels/include/vqtok/codebook_health.h.");
}

#undef VQTOK_CHECK
}  // namespace
// ---- end nearest-code search and codebook health ------------------------------------------

// ---- FSQ / LFQ -----------------------------------------------------------------------------
namespace {

#define VQTOK_FSQ_CHECK(cond, msg)              \
  do {                                          \
    if (!(cond)) throw py::value_error(msg);    \
  } while (0)

// Per-column FSQ constants, computed in double and rounded to float exactly as
// ops/reference.fsq_constants does (eps = 1e-3), plus the int64 basis.
struct FsqHost {
  std::vector<float> half_l, offset, shift, half_width, grad_scale;
  std::vector<int64_t> levels, basis;
};

FsqHost fsq_host(const std::vector<int64_t>& levels, const std::string& where) {
  VQTOK_FSQ_CHECK(!levels.empty(), where + "levels must not be empty");
  FsqHost h;
  h.levels = levels;
  const double eps = 1e-3;
  int64_t b = 1;
  for (size_t j = 0; j < levels.size(); ++j) {
    const int64_t lv = levels[j];
    VQTOK_FSQ_CHECK(lv >= 2, where + "levels[" + std::to_string(j) + "] must be >= 2, got " + std::to_string(lv));
    const double hl = double(lv - 1) * (1 - eps) / 2;
    const double off = lv % 2 == 0 ? 0.5 : 0.0;
    const double ratio = off / hl;
    const double sh = ratio < 1 ? std::atanh(std::min(ratio, 0.999999)) : 0.0;
    h.half_l.push_back(float(hl));
    h.offset.push_back(float(off));
    h.shift.push_back(float(sh));
    h.half_width.push_back(float(lv / 2));
    h.grad_scale.push_back(float(hl) / float(lv / 2));  // fp32 division, as the reference
    h.basis.push_back(b);
    if (j + 1 < levels.size()) {
      VQTOK_FSQ_CHECK(b <= INT64_MAX / lv, where + "prod(levels) does not fit in int64");
      b *= lv;
    }
  }
  return h;
}

vqtok::FsqArgs fsq_args(const FsqHost& h, uintptr_t z, int64_t m, int dtype, const std::string& where) {
  VQTOK_FSQ_CHECK(m >= 0, where + "m (rows of z) must be >= 0, got " + std::to_string(m));
  VQTOK_FSQ_CHECK(dtype >= 0 && dtype <= 2,
                  where + "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  VQTOK_FSQ_CHECK(m == 0 || z != 0, where + "z pointer is null");
  vqtok::FsqArgs a;
  a.z = reinterpret_cast<const void*>(z);
  a.dtype = static_cast<vqtok::InputType>(dtype);
  a.m = m;
  a.d = int(h.levels.size());
  a.half_l = h.half_l.data();
  a.offset = h.offset.data();
  a.shift = h.shift.data();
  a.half_width = h.half_width.data();
  a.grad_scale = h.grad_scale.data();
  a.basis = h.basis.data();
  return a;
}

int64_t fsq_forward_py(uintptr_t z, int64_t m, const std::vector<int64_t>& levels, int dtype, uintptr_t out_codes,
                    uintptr_t out_idx, bool idx_int64) {
  const std::string where = "vqtok._C.fsq_forward: ";
  const FsqHost h = fsq_host(levels, where);
  vqtok::FsqArgs a = fsq_args(h, z, m, dtype, where);
  VQTOK_FSQ_CHECK(m == 0 || (out_codes != 0 && out_idx != 0), where + "out_codes and out_idx must be non-null");
  a.codes = reinterpret_cast<float*>(out_codes);
  a.indices = reinterpret_cast<void*>(out_idx);
  a.indices_int64 = idx_int64;
  py::gil_scoped_release nogil;
  return vqtok::fsq_forward(a);
}

void fsq_backward_py(uintptr_t grad_codes, uintptr_t z, int64_t m, const std::vector<int64_t>& levels, int dtype,
                     uintptr_t out_grad_z) {
  const std::string where = "vqtok._C.fsq_backward: ";
  const FsqHost h = fsq_host(levels, where);
  vqtok::FsqArgs a = fsq_args(h, z, m, dtype, where);
  VQTOK_FSQ_CHECK(m == 0 || (grad_codes != 0 && out_grad_z != 0), where + "grad_codes and out_grad_z must be non-null");
  a.grad_codes = reinterpret_cast<const float*>(grad_codes);
  a.grad_z = reinterpret_cast<float*>(out_grad_z);
  py::gil_scoped_release nogil;
  vqtok::fsq_backward(a);
}

void fsq_indices_to_codes_py(uintptr_t idx, int64_t m, bool idx_int64, const std::vector<int64_t>& levels,
                             uintptr_t out_codes) {
  const std::string where = "vqtok._C.fsq_indices_to_codes: ";
  const FsqHost h = fsq_host(levels, where);
  VQTOK_FSQ_CHECK(m >= 0, where + "m (number of indices) must be >= 0, got " + std::to_string(m));
  VQTOK_FSQ_CHECK(m == 0 || (idx != 0 && out_codes != 0), where + "indices and out_codes must be non-null");
  py::gil_scoped_release nogil;
  vqtok::fsq_indices_to_codes(reinterpret_cast<const void*>(idx), idx_int64, m, int(h.levels.size()),
                              h.levels.data(), h.basis.data(), reinterpret_cast<float*>(out_codes));
}

int64_t lfq_forward_py(uintptr_t z, int64_t m, int bits, int dtype, uintptr_t out_codes, uintptr_t out_idx,
                    bool idx_int64) {
  const std::string where = "vqtok._C.lfq_forward: ";
  VQTOK_FSQ_CHECK(m >= 0, where + "m (rows of z) must be >= 0, got " + std::to_string(m));
  VQTOK_FSQ_CHECK(bits >= 1 && bits <= 62, where + "bits must be in [1, 62], got " + std::to_string(bits));
  VQTOK_FSQ_CHECK(dtype >= 0 && dtype <= 2,
                  where + "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  VQTOK_FSQ_CHECK(idx_int64 || bits <= 31, where + "bits >= 32 need int64 indices");
  VQTOK_FSQ_CHECK(m == 0 || (z != 0 && out_codes != 0 && out_idx != 0), where + "z, out_codes and out_idx must be non-null");
  vqtok::LfqArgs a;
  a.z = reinterpret_cast<const void*>(z);
  a.dtype = static_cast<vqtok::InputType>(dtype);
  a.m = m;
  a.bits = bits;
  a.codes = reinterpret_cast<float*>(out_codes);
  a.indices = reinterpret_cast<void*>(out_idx);
  a.indices_int64 = idx_int64;
  py::gil_scoped_release nogil;
  return vqtok::lfq_forward(a);
}

void bind_fsq_lfq(py::module_& m) {
  m.def("fsq_forward", &fsq_forward_py, py::arg("z"), py::arg("m"), py::arg("levels"), py::arg("dtype"),
        py::arg("out_codes"), py::arg("out_idx"), py::arg("idx_int64"),
        "FSQ forward on raw pointers (data_ptr()): z m*len(levels) contiguous elements (dtype 0 f32, 1 f16, "
        "2 bf16); writes out_codes (m*d float32) and out_idx (m int32, or int64 when idx_int64). Returns the "
        "number of NaN/Inf values in z (0 for valid input).");
  m.def("fsq_backward", &fsq_backward_py, py::arg("grad_codes"), py::arg("z"), py::arg("m"), py::arg("levels"),
        py::arg("dtype"), py::arg("out_grad_z"),
        "FSQ straight-through backward: grad_codes m*d float32, z as in fsq_forward; writes out_grad_z (m*d float32).");
  m.def("fsq_indices_to_codes", &fsq_indices_to_codes_py, py::arg("indices"), py::arg("m"), py::arg("idx_int64"),
        py::arg("levels"), py::arg("out_codes"),
        "FSQ indices (m int32/int64) to codes (m*len(levels) float32).");
  m.def("lfq_forward", &lfq_forward_py, py::arg("z"), py::arg("m"), py::arg("bits"), py::arg("dtype"),
        py::arg("out_codes"), py::arg("out_idx"), py::arg("idx_int64"),
        "LFQ forward: z m*bits elements; writes out_codes (m*bits float32 +-1) and out_idx (bit b = z_b > 0). "
        "Returns the number of NaN/Inf values in z.");
  m.def(
      "tanh_f32",
      [](uintptr_t x, int64_t n, uintptr_t out, bool exact) {
        VQTOK_FSQ_CHECK(n >= 0, "vqtok._C.tanh_f32: n must be >= 0, got " + std::to_string(n));
        VQTOK_FSQ_CHECK(n == 0 || (x != 0 && out != 0), "vqtok._C.tanh_f32: x and out must be non-null");
        py::gil_scoped_release nogil;
        vqtok::tanh_f32(reinterpret_cast<const float*>(x), n, reinterpret_cast<float*>(out), exact);
      },
      py::arg("x"), py::arg("n"), py::arg("out"), py::arg("exact") = false,
      "fp32 tanh of n floats as the FSQ kernels compute it: double evaluation rounded once, i.e. "
      "torch.tanh(x.double()).float(). exact=True: the plain double evaluation value by value (same bits, slower).");
  m.def(
      "fma_peak_gflops",
      [](double seconds) {
        VQTOK_FSQ_CHECK(seconds > 0 && seconds <= 60, "vqtok._C.fma_peak_gflops: seconds must be in (0, 60]");
        py::gil_scoped_release nogil;
        return vqtok::fma_peak_gflops(seconds);
      },
      py::arg("seconds") = 0.2,
      "Measured fp32 FMA peak in GFLOP/s: independent FMA chains of the active SIMD level on all threads.");
  m.def(
      "fma_peak_chain_sum",
      [](int64_t iters) {
        VQTOK_FSQ_CHECK(iters >= 0, "vqtok._C.fma_peak_chain_sum: iters must be >= 0");
        py::gil_scoped_release nogil;
        return vqtok::fma_peak_chain_sum(iters);
      },
      py::arg("iters"),
      "The FMA peak loop's 12 chains after iters rounds, summed over chains and averaged over lanes "
      "(chain c starts at 1 + 0.01 c, x <- fma(x, 0.999999, 1e-6)); 0.0 at the scalar level.");
  m.def(
      "fsq_constants",
      [](const std::vector<int64_t>& levels) {
        const FsqHost h = fsq_host(levels, "vqtok._C.fsq_constants: ");
        return py::make_tuple(h.half_l, h.offset, h.shift, h.half_width, h.grad_scale, h.basis);
      },
      py::arg("levels"), "Per-column FSQ constants as the kernels use them (half_l, offset, shift, half_width, grad_scale, basis).");
}

#undef VQTOK_FSQ_CHECK
}  // namespace
// ---- end FSQ / LFQ -------------------------------------------------------------------------

// ---- CUDA (built when nvcc is present) ------------------------------------------------------
#ifdef VQTOK_WITH_CUDA
#include "vqtok/cuda_kernels.h"

namespace {

// Pointers arrive as data_ptr() integers, the stream as torch.cuda.current_stream().cuda_stream.
template <typename T>
T* dptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void cuda_check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string("vqtok._C.") + what + ": CUDA error: " + vqtok::cuda::error_string(err));
}

void cuda_check_sizes(const char* what, int64_t m, int64_t d, int64_t d_max) {
  if (m < 0) throw py::value_error(std::string("vqtok._C.") + what + ": rows must be >= 0, got " + std::to_string(m));
  if (d < 1 || d > d_max)
    throw py::value_error(std::string("vqtok._C.") + what + ": feature dim must be in [1, " + std::to_string(d_max) +
                          "], got " + std::to_string(d));
}

void bind_cuda(py::module_& m) {
  m.def(
      "cuda_nearest_l2_top2",
      [](uintptr_t x, uintptr_t c, uintptr_t cn, int64_t n, int64_t k, int64_t d, int splits, uintptr_t scratch,
         uintptr_t best, uintptr_t index, uintptr_t second, uintptr_t stream) {
        cuda_check_sizes("cuda_nearest_l2_top2", n, d, int64_t{1} << 20);
        if (k < 1 || k >= (int64_t{1} << 31)) throw py::value_error("vqtok._C.cuda_nearest_l2_top2: k must be in [1, 2^31), got " + std::to_string(k));
        if (splits < 1) throw py::value_error("vqtok._C.cuda_nearest_l2_top2: splits must be >= 1, got " + std::to_string(splits));
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::nearest_l2_top2(dptr<const float>(x), dptr<const float>(c), dptr<const float>(cn), n, k, d,
                                                splits, dptr<void>(scratch), dptr<float>(best), dptr<int32_t>(index),
                                                dptr<float>(second), dptr<void>(stream)),
                   "cuda_nearest_l2_top2");
      },
      py::arg("x"), py::arg("codebook"), py::arg("code_norms"), py::arg("n"), py::arg("k"), py::arg("d"),
      py::arg("splits"), py::arg("scratch"), py::arg("out_best"), py::arg("out_index"), py::arg("out_second"),
      py::arg("stream"),
      "fp32 nearest-code candidates on device pointers: x n*d, codebook k*d, code_norms k floats; writes the best "
      "score (n f32), its index (n int32) and the second-best score (n f32). scratch: splits*n*12 bytes when splits > 1.");
  m.def(
      "cuda_rescore_f64",
      [](uintptr_t x, uintptr_t c, uintptr_t index, int64_t n, int64_t k, int64_t d, uintptr_t index64,
         uintptr_t dist, uintptr_t score, uintptr_t stream) {
        cuda_check_sizes("cuda_rescore_f64", n, d, int64_t{1} << 20);
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::rescore_f64(dptr<const float>(x), dptr<const float>(c), dptr<const int32_t>(index), n, k,
                                            d, dptr<int64_t>(index64), dptr<float>(dist), dptr<double>(score),
                                            dptr<void>(stream)),
                   "cuda_rescore_f64");
      },
      py::arg("x"), py::arg("codebook"), py::arg("index"), py::arg("n"), py::arg("k"), py::arg("d"),
      py::arg("out_index64"), py::arg("out_dist"), py::arg("out_score"), py::arg("stream"),
      "float64 direct-form distance (n f32) and score |c|^2 - 2x.c (n f64) of one candidate per row.");
  m.def(
      "cuda_fsq_forward",
      [](uintptr_t z, int64_t mm, int64_t d, uintptr_t hl, uintptr_t off, uintptr_t shift, uintptr_t hw, uintptr_t basis,
         uintptr_t codes, uintptr_t idx, bool idx_int64, uintptr_t stream) {
        cuda_check_sizes("cuda_fsq_forward", mm, d, 64);
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::fsq_forward(dptr<const float>(z), mm, d, dptr<const float>(hl), dptr<const float>(off),
                                            dptr<const float>(shift), dptr<const float>(hw), dptr<const int64_t>(basis),
                                            dptr<float>(codes), dptr<void>(idx), idx_int64, dptr<void>(stream)),
                   "cuda_fsq_forward");
      },
      py::arg("z"), py::arg("m"), py::arg("d"), py::arg("half_l"), py::arg("offset"), py::arg("shift"),
      py::arg("half_width"), py::arg("basis"), py::arg("out_codes"), py::arg("out_idx"), py::arg("idx_int64"),
      py::arg("stream"), "FSQ forward on device pointers: z m*d f32 -> codes m*d f32, indices m int32/int64.");
  m.def(
      "cuda_fsq_backward",
      [](uintptr_t g, uintptr_t z, int64_t mm, int64_t d, uintptr_t hl, uintptr_t shift, uintptr_t hw, uintptr_t out,
         uintptr_t stream) {
        cuda_check_sizes("cuda_fsq_backward", mm, d, 64);
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::fsq_backward(dptr<const float>(g), dptr<const float>(z), mm, d, dptr<const float>(hl),
                                             dptr<const float>(shift), dptr<const float>(hw), dptr<float>(out),
                                             dptr<void>(stream)),
                   "cuda_fsq_backward");
      },
      py::arg("grad_codes"), py::arg("z"), py::arg("m"), py::arg("d"), py::arg("half_l"), py::arg("shift"),
      py::arg("half_width"), py::arg("out_grad_z"), py::arg("stream"), "FSQ straight-through backward (m*d f32).");
  m.def(
      "cuda_fsq_indices_to_codes",
      [](uintptr_t idx, bool idx_int64, int64_t mm, int64_t d, uintptr_t levels, uintptr_t basis, uintptr_t codes,
         uintptr_t stream) {
        cuda_check_sizes("cuda_fsq_indices_to_codes", mm, d, 64);
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::fsq_indices_to_codes(dptr<const void>(idx), idx_int64, mm, d, dptr<const int64_t>(levels),
                                                     dptr<const int64_t>(basis), dptr<float>(codes), dptr<void>(stream)),
                   "cuda_fsq_indices_to_codes");
      },
      py::arg("indices"), py::arg("idx_int64"), py::arg("m"), py::arg("d"), py::arg("levels"), py::arg("basis"),
      py::arg("out_codes"), py::arg("stream"), "FSQ indices (m int32/int64) -> codes m*d f32.");
  m.def(
      "cuda_lfq_forward",
      [](uintptr_t z, int64_t mm, int64_t bits, uintptr_t codes, uintptr_t idx, bool idx_int64, uintptr_t stream) {
        cuda_check_sizes("cuda_lfq_forward", mm, bits, 62);
        py::gil_scoped_release nogil;
        cuda_check(vqtok::cuda::lfq_forward(dptr<const float>(z), mm, bits, dptr<float>(codes), dptr<void>(idx), idx_int64,
                                            dptr<void>(stream)),
                   "cuda_lfq_forward");
      },
      py::arg("z"), py::arg("m"), py::arg("bits"), py::arg("out_codes"), py::arg("out_idx"), py::arg("idx_int64"),
      py::arg("stream"), "LFQ forward on device pointers: z m*bits f32 -> codes +-1, indices (bit b = z_b > 0).");
}

}  // namespace
#endif  // VQTOK_WITH_CUDA
// ---- end CUDA ------------------------------------------------------------------------------

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqtok native kernels (C++ CPU; CUDA when built with nvcc)";
#ifdef VQTOK_WITH_CUDA
  m.attr("with_cuda") = true;
  bind_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
  m.def("detected_isa", [] { return std::string(vqtok::isa_name(vqtok::detected_isa())); },
        "Highest SIMD level this CPU supports (avx512 | avx2 | scalar).");
  m.def("active_isa", [] { return std::string(vqtok::isa_name(vqtok::active_isa())); },
        "SIMD level the kernels use now (VQTOK_ISA may lower it).");
  bind_nearest(m);
  bind_fsq_lfq(m);
  bind_health(m);
  py::class_<vqtok::HostBuffer>(m, "HostBuffer", py::buffer_protocol(),
                                "Writable host buffer of `nbytes` bytes, 2 MiB aligned and marked "
                                "MADV_HUGEPAGE (wrap it with torch.frombuffer). Freed with its last reference "
                                "into a cache of at most 256 MiB that serves the next buffer of the same size.")
      .def(py::init([](int64_t nbytes) {
             if (nbytes < 0) throw py::value_error("vqtok._C.HostBuffer: nbytes must be >= 0, got " + std::to_string(nbytes));
             return new vqtok::HostBuffer(static_cast<size_t>(nbytes));
           }),
           py::arg("nbytes"))
      .def_property_readonly("huge_pages", &vqtok::HostBuffer::huge_pages)
      .def_property_readonly("nbytes", &vqtok::HostBuffer::size)
      .def_property_readonly("recycled", &vqtok::HostBuffer::recycled)
      .def_buffer([](vqtok::HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {py::ssize_t{1}}, /*readonly=*/false);
      });
  m.def("host_buffer_cached_bytes", &vqtok::host_buffer_cached_bytes,
        "Bytes of freed HostBuffers kept for reuse (at most 256 MiB).");
  m.def("release_host_buffers", &vqtok::release_host_buffers, "Unmaps every cached HostBuffer.");
  m.def("build_info", [] {
    py::dict d;
#ifdef VQTOK_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["detected_isa"] = std::string(vqtok::isa_name(vqtok::detected_isa()));
    d["avx512_bf16"] = vqtok::has_avx512_bf16();
    d["nearest_fast"] = std::string(vqtok::nearest_fast_available() ? vqtok::nearest_fast_kernel() : "exact path");
    return d;
  });
}
