// The single pybind11 file of vqtok._C: argument checks with readable messages, GIL released
// while kernels run. Kernels themselves are torch-free and take raw pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "vqtok/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vqtok native kernels (C++ CPU; CUDA when built with nvcc)";
#ifdef VQTOK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("detected_isa", [] { return std::string(vqtok::isa_name(vqtok::detected_isa())); },
        "Highest SIMD level this CPU supports (avx512 | avx2 | scalar).");
  m.def("active_isa", [] { return std::string(vqtok::isa_name(vqtok::active_isa())); },
        "SIMD level the kernels use now (VQTOK_ISA may lower it).");
  m.def("build_info", [] {
    py::dict d;
#ifdef VQTOK_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["detected_isa"] = std::string(vqtok::isa_name(vqtok::detected_isa()));
    d["avx512_bf16"] = vqtok::has_avx512_bf16();
    return d;
  });
}
