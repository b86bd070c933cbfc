"""Triton LFQ (Yu et al. 2023, "Language Model Beats Diffusion"): codes and indices in one pass.

``code_b = +1 if z_b > 0 else -1``; bit b of the index is ``z_b > 0`` (LSB-first), as in
``ops.reference.lfq_forward``. The backward is the identity (straight-through), handled by the
public op without a kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import reference as ref


@triton.jit
def _lfq_fwd_kernel(
    z_ptr, codes_ptr, idx_ptr,
    M, B,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_B: tl.constexpr,  # next power of two >= B (B <= 62: one tile holds a row)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_B)
    m = (rows < M)[:, None] & (cols < B)[None, :]
    off2 = rows[:, None] * B + cols[None, :]
    z = tl.load(z_ptr + off2, mask=m, other=0.0)
    pos = z > 0
    tl.store(codes_ptr + off2, tl.where(pos, 1.0, -1.0), mask=m)
    bits = tl.where(m & pos, tl.full([1, BLOCK_B], 1, tl.int64) << cols[None, :].to(tl.int64), 0)
    tl.store(idx_ptr + rows, tl.sum(bits, 1).to(idx_ptr.dtype.element_ty), mask=rows < M)


def lfq_forward(z: torch.Tensor):
    """z [M, B] -> (codes float32 +-1 [M, B], indices [M] int32 for B <= 30 else int64)."""
    m, b = z.shape
    codes = torch.empty(m, b, dtype=torch.float32, device=z.device)
    idx = torch.empty(m, dtype=ref.lfq_index_dtype(b), device=z.device)
    if m:
        bm = 1024 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 256
        _lfq_fwd_kernel[(triton.cdiv(m, bm),)](z.contiguous(), codes, idx, m, b,
                                              BLOCK_M=bm, BLOCK_B=triton.next_power_of_2(b))
    return codes, idx
