// Runtime ISA detection and the VQTOK_ISA override.
#pragma once

namespace vqtok {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Highest level this CPU supports.
Isa detected_isa();
// Level the kernels use: detected_isa(), lowered by the environment variable VQTOK_ISA
// (scalar | avx2 | avx512) read at each call so tests can force every level.
// Asking for a level the CPU lacks falls back to the best supported one below it.
Isa active_isa();
const char* isa_name(Isa isa);
// True when the CPU has AVX512-BF16 dot products (vdpbf16ps).
bool has_avx512_bf16();

}  // namespace vqtok
