"""Triton FSQ (Mentzer et al. 2023, "Finite Scalar Quantization"): forward, backward, decode.

Same semantics as ``ops.reference`` bit for bit: fp32 math in the reference's order,
``bound = tanh(z + shift) * half_l - offset``, round half to even, ``codes = q / (L // 2)``,
``index = sum_i (q_i + L_i // 2) * basis_i`` in int64 (first dimension least significant).

tanh is the spec's correctly rounded fp32 tanh: evaluated in float64 and rounded once (on the GPU
``libdevice.tanh`` in double; the CPU interpreter has no libdevice, so there it is built from exp in
float64, accurate to far below an fp32 ulp). Rounding half to even uses exact floor/fraction arithmetic, identical on both. Divisions are
``div_rn`` (IEEE) and kernels launch without FMA contraction, so each fp32 op rounds once, like
torch's.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import reference as ref

try:  # only traced when compiling for a GPU
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - older triton layouts
    libdevice = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tanh_f32(a, INTERPRET: tl.constexpr):
    """Correctly rounded fp32 tanh: float64 evaluation, one rounding (ops.reference._tanh_rn)."""
    if INTERPRET:
        a64 = a.to(tl.float64)
        ax = tl.abs(a64)
        big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
        a2 = ax * ax  # small |a|: odd Taylor series, exact to far below an fp32 ulp
        small = ax * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        t = tl.where(ax < 1e-3, small, big)
        return tl.where(a64 < 0, -t, t).to(tl.float32)
    else:
        return libdevice.tanh(a.to(tl.float64)).to(tl.float32)


@triton.jit
def _round_half_even(b):
    """rint(b) for fp32 b: exact (floor and b - floor(b) are exact), keeps the sign of zero."""
    r = tl.floor(b)
    f = b - r
    odd = r - 2.0 * tl.floor(r * 0.5)
    r = tl.where(f > 0.5, r + 1.0, tl.where(f == 0.5, r + odd, r))
    return tl.where(r == 0.0, b * 0.0, r)


@triton.jit
def _fsq_fwd_kernel(
    z_ptr, hl_ptr, off_ptr, shift_ptr, hw_ptr, basis_ptr, codes_ptr, idx_ptr,
    M, d,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d (d is small: one tile holds a row)
    INTERPRET: tl.constexpr,  # CPU interpreter: no libdevice
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    m = (rows < M)[:, None] & cm[None, :]
    off2 = rows[:, None] * d + cols[None, :]
    z = tl.load(z_ptr + off2, mask=m, other=0.0).to(tl.float32)
    hl = tl.load(hl_ptr + cols, mask=cm, other=1.0)
    offset = tl.load(off_ptr + cols, mask=cm, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cm, other=0.0)
    hw = tl.load(hw_ptr + cols, mask=cm, other=1.0)
    basis = tl.load(basis_ptr + cols, mask=cm, other=0)
    bound = _tanh_f32(z + shift[None, :], INTERPRET) * hl[None, :] - offset[None, :]
    q = _round_half_even(bound)
    tl.store(codes_ptr + off2, tl.math.div_rn(q, hw[None, :]), mask=m)  # IEEE division, as torch
    digits = (q + hw[None, :]).to(tl.int64)
    idx = tl.sum(tl.where(m, digits * basis[None, :], 0), 1)
    tl.store(idx_ptr + rows, idx.to(idx_ptr.dtype.element_ty), mask=rows < M)


@triton.jit
def _fsq_bwd_kernel(
    g_ptr, z_ptr, hl_ptr, shift_ptr, hw_ptr, out_ptr,
    M, d,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d
    INTERPRET: tl.constexpr,  # CPU interpreter: no libdevice
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    m = (rows < M)[:, None] & cm[None, :]
    off2 = rows[:, None] * d + cols[None, :]
    z = tl.load(z_ptr + off2, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off2, mask=m, other=0.0).to(tl.float32)
    ratio = tl.math.div_rn(tl.load(hl_ptr + cols, mask=cm, other=1.0), tl.load(hw_ptr + cols, mask=cm, other=1.0))
    t = _tanh_f32(z + tl.load(shift_ptr + cols, mask=cm, other=0.0)[None, :], INTERPRET)
    tl.store(out_ptr + off2, g * (1.0 - t * t) * ratio[None, :], mask=m)


@triton.jit
def _fsq_decode_kernel(
    idx_ptr, lv_ptr, basis_ptr, codes_ptr,
    M, d,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= d
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < d
    m = (rows < M)[:, None] & cm[None, :]
    idx = tl.load(idx_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    lv = tl.load(lv_ptr + cols, mask=cm, other=2)  # padded columns: no 0 divisor
    basis = tl.load(basis_ptr + cols, mask=cm, other=1)
    digits = (idx[:, None] // basis[None, :]) % lv[None, :]
    hw = lv // 2
    codes = tl.math.div_rn((digits - hw[None, :]).to(tl.float32), hw[None, :].to(tl.float32))
    tl.store(codes_ptr + rows[:, None] * d + cols[None, :], codes, mask=m)


@functools.lru_cache(maxsize=64)
def _constants(levels: tuple, device: torch.device):
    hl, off, shift, hw = ref.fsq_constants(list(levels), device=device)
    lv = torch.tensor(levels, dtype=torch.int64, device=device)
    return hl, off, shift, hw, ref.fsq_basis(list(levels), device), lv


def _grid(m: int):
    bm = 1024 if _interpreting() else 256
    return bm, (triton.cdiv(m, bm),)


def _exact_fp() -> dict:
    """Launch options: no FMA contraction on the GPU, so every op rounds once, as torch's do."""
    return {} if _interpreting() else {"enable_fp_fusion": False}


def fsq_forward(z: torch.Tensor, levels: list[int]):
    """z [M, d] contiguous -> (codes float32 [M, d], indices [M] int32/int64)."""
    m, d = z.shape
    hl, off, shift, hw, basis, _ = _constants(tuple(levels), z.device)
    codes = torch.empty(m, d, dtype=torch.float32, device=z.device)
    idx = torch.empty(m, dtype=ref.fsq_index_dtype(levels), device=z.device)
    if m:
        bm, grid = _grid(m)
        _fsq_fwd_kernel[grid](z.contiguous(), hl, off, shift, hw, basis, codes, idx, m, d,
                              BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(d), INTERPRET=_interpreting(), **_exact_fp())
    return codes, idx


def fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """Straight-through rounding: grad [M, d] * half_l (1 - tanh^2(z + shift)) / (L // 2), float32."""
    m, d = z.shape
    hl, _, shift, hw, _, _ = _constants(tuple(levels), z.device)
    out = torch.empty(m, d, dtype=torch.float32, device=z.device)
    if m:
        bm, grid = _grid(m)
        _fsq_bwd_kernel[grid](grad_codes.contiguous(), z.contiguous(), hl, shift, hw, out, m, d,
                              BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(d), INTERPRET=_interpreting(), **_exact_fp())
    return out


def fsq_indices_to_codes(indices: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """indices [M] (any integer dtype) -> codes float32 [M, d]."""
    m, d = indices.shape[0], len(levels)
    _, _, _, _, basis, lv = _constants(tuple(levels), indices.device)
    codes = torch.empty(m, d, dtype=torch.float32, device=indices.device)
    if m:
        bm, grid = _grid(m)
        _fsq_decode_kernel[grid](indices.contiguous(), lv, basis, codes, m, d,
                                 BLOCK_M=bm, BLOCK_D=triton.next_power_of_2(d), **_exact_fp())
    return codes
