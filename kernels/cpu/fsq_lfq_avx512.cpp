// FSQ/LFQ row kernels and the FMA peak loop compiled for AVX512 (body in fsq_lfq_isa.inc).
#pragma GCC optimize("fp-contract=off")
#define VQTOK_ISA_OPS Avx512Ops
#define VQTOK_ISA_NAME(f) f##_avx512
#include "fsq_lfq_isa.inc"
