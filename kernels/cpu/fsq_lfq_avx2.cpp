// FSQ/LFQ row kernels and the FMA peak loop compiled for AVX2 (body in fsq_lfq_isa.inc).
#pragma GCC optimize("fp-contract=off")
#define VQTOK_ISA_OPS Avx2Ops
#define VQTOK_ISA_NAME(f) f##_avx2
#include "fsq_lfq_isa.inc"
