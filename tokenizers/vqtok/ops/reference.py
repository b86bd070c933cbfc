"""Plain-torch reference of every vqtok op: the spec, the CPU fallback and the test oracle.

Every other backend (C++, CUDA, Triton) must agree with these functions bit for bit on indices
and codes for fp32 inputs. Shapes use these letters: N rows (tokens), D feature dim, K codes.

Conventions (documented contract, see DESIGN.md "Ops contract"):

* ``nearest_code``: the nearest code is the lowest index k minimising the exact squared L2
  distance ``sum_i (x_i - c_ki)^2`` evaluated in float64 (exact for fp32 inputs up to the last
  fp64 ulp). Candidates are ranked by ``|c|^2 - 2 x.c`` (no clamp), every code whose score is
  within the rounding-error bound of the best is re-decided in the direct form, and the returned
  distance is the direct form of the winner, rounded to fp32.
* FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple"): per dimension with
  L levels, ``half_l = (L-1)(1-eps)/2``, ``offset = 0.5`` for even L else 0,
  ``shift = atanh(offset/half_l)``, ``bound = tanh(z + shift) * half_l - offset``, round half to
  even, divide by ``L // 2``. ``tanh`` is evaluated in float64 and rounded once to fp32
  (correctly rounded, so every backend can match it bit for bit; torch's fp32 tanh is not
  correctly rounded and differs between CPUs). For L = 2 the shift would be atanh of a value above 1; there the
  shift is 0, which splits the two levels {-1, 0} symmetrically at z = 0. Digits are
  ``level + L // 2``; the index is ``sum_i digit_i * basis_i`` with ``basis = [1, L0, L0*L1, ...]``
  (the first dimension is the least significant digit).
* LFQ (Yu et al. 2023, "Language Model Beats Diffusion"): ``code_b = +1 if z_b > 0 else -1`` and
  bit b of the index is ``z_b > 0`` (LSB-first: dimension 0 is bit 0).
"""

from __future__ import annotations

import math

import torch

FSQ_EPS = 1e-3
# Rows x codes per chunk of the reference search: bounds its extra memory to ~ 8 * CHUNK bytes.
_REF_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------
# nearest-code search
# --------------------------------------------------------------------------------------------
def _direct_sqdist64(x64: torch.Tensor, c64: torch.Tensor) -> torch.Tensor:
    """Exact-form squared distances in float64. x64 [n, D], c64 [m, D] -> [n, m]."""
    return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def nearest_code_l2(x: torch.Tensor, codebook: torch.Tensor, chunk: int = _REF_CHUNK):
    """Exact nearest code by squared L2. x [N, D], codebook [K, D] -> (int64 [N], float32 [N]).

    Memory: at most ``chunk`` float64 scores live at once (no N x K matrix for large inputs).
    """
    n, d = x.shape
    k = codebook.shape[0]
    x64 = x.to(torch.float64)
    c64 = codebook.to(torch.float64)
    cn = (c64 * c64).sum(1)  # [K]
    cabs_max = codebook.abs().to(torch.float64).amax(1) if k else cn
    # fp64 error bound of s_k = |c|^2 - 2 x.c : gamma_D * (|c|^2 + 2 sum|x_i c_i|) with
    # gamma_D = (D+2) u / (1 - (D+2) u), u = 2^-53; bounded with sum|x_i c_i| <= |x|_1 max|c|.
    u = 2.0**-53
    gamma = (d + 2) * u / (1 - (d + 2) * u)
    best_idx = torch.empty(n, dtype=torch.int64, device=x.device)
    best_dist = torch.empty(n, dtype=torch.float32, device=x.device)
    rows = max(1, min(n, chunk // max(k, 1)))
    for r0 in range(0, n, rows):
        xr = x64[r0 : r0 + rows]
        s = torch.addmm(cn[None, :], xr, c64.t(), beta=1.0, alpha=-2.0)  # [r, K]
        err = gamma * (cn[None, :] + 2.0 * xr.abs().sum(1, keepdim=True) * cabs_max[None, :])
        smin, _ = s.min(1, keepdim=True)
        # every code whose score may be the true minimum once rounding errors are accounted for
        emin = torch.gather(err, 1, s.argmin(1, keepdim=True))
        cand = s <= smin + emin + err
        del s, err
        ncand = cand.sum(1)
        first = cand.to(torch.int8).argmax(1)  # lowest candidate index
        rsl = slice(r0, r0 + xr.shape[0])
        best_idx[rsl] = first
        for i in (ncand > 1).nonzero().squeeze(1).tolist():
            ks = cand[i].nonzero().squeeze(1)
            dd = _direct_sqdist64(xr[i : i + 1], c64[ks])[0]
            best_idx[r0 + i] = ks[(dd == dd.min()).nonzero()[0, 0]]  # lowest index among exact ties
        best_dist[rsl] = ((xr - c64[best_idx[rsl]]) ** 2).sum(1).to(torch.float32)
    return best_idx, best_dist


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 unit rows; zero rows stay zero. Computed once here so every backend sees the same bits."""
    t32 = t.to(torch.float32)
    norm = torch.linalg.vector_norm(t32, dim=-1, keepdim=True)
    return torch.where(norm > 0, t32 / torch.where(norm > 0, norm, torch.ones_like(norm)), t32)


def cosine_distance_of(xn: torch.Tensor, cn: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """1 - cos between normalised rows xn [N, D] and their chosen codes cn[idx], in fp32."""
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=xn.device)
    dots = (xn.to(torch.float64) * cn[idx].to(torch.float64)).sum(-1)
    return (1.0 - dots).to(torch.float32)


# --------------------------------------------------------------------------------------------
# FSQ
# --------------------------------------------------------------------------------------------
def _tanh_rn(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 tanh: evaluated in float64, rounded once."""
    return torch.tanh(t.to(torch.float64)).to(torch.float32)


def fsq_constants(levels: list[int], dtype=torch.float32, device=None):
    """Per-dimension (half_l, offset, shift, half_width) tensors of the FSQ bound."""
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 - FSQ_EPS) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(torch.float64)
    ratio = offset / half_l
    shift = torch.where(ratio < 1, torch.atanh(ratio.clamp(max=0.999999)), torch.zeros_like(ratio))
    half_width = torch.div(lv, 2, rounding_mode="floor")
    return tuple(t.to(dtype=dtype, device=device) for t in (half_l, offset, shift, half_width))


def fsq_basis(levels: list[int], device=None) -> torch.Tensor:
    basis = [1]
    for lv in levels[:-1]:
        basis.append(basis[-1] * lv)
    return torch.tensor(basis, dtype=torch.int64, device=device)


def fsq_index_dtype(levels: list[int]) -> torch.dtype:
    return torch.int64 if math.prod(levels) >= 2**31 else torch.int32


def fsq_bound(z: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """z [M, d] -> (the bounded value float32 [M, d] in level units, which the codes round, and
    half_width = L // 2 [d], which divides a level into a code)."""
    half_l, offset, shift, half_width = fsq_constants(levels, device=z.device)
    return _tanh_rn(z.to(torch.float32) + shift) * half_l - offset, half_width


def fsq_forward(z: torch.Tensor, levels: list[int]):
    """z [M, d] -> (codes float32 [M, d] in [-1, 1], indices [M] int32/int64)."""
    bound, half_width = fsq_bound(z, levels)
    q = torch.round(bound)  # round half to even
    codes = q / half_width
    digits = (q + half_width).to(torch.int64)
    idx = (digits * fsq_basis(levels, z.device)).sum(-1)
    return codes, idx.to(fsq_index_dtype(levels))


def fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """Straight-through rounding: d codes / d z = half_l * (1 - tanh^2(z + shift)) / (L // 2)."""
    half_l, _, shift, half_width = fsq_constants(levels, device=z.device)
    t = _tanh_rn(z.to(torch.float32) + shift)
    return grad_codes.to(torch.float32) * (1 - t * t) * (half_l / half_width)


def fsq_indices_to_codes(indices: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """indices [M] -> codes float32 [M, d]; exact inverse of fsq_forward's indices."""
    basis = fsq_basis(levels, indices.device)
    lv = torch.tensor(levels, dtype=torch.int64, device=indices.device)
    digits = (indices.to(torch.int64)[:, None] // basis) % lv
    half_width = torch.div(lv, 2, rounding_mode="floor")
    return ((digits - half_width).to(torch.float32)) / half_width.to(torch.float32)


# --------------------------------------------------------------------------------------------
# LFQ
# --------------------------------------------------------------------------------------------
def lfq_index_dtype(bits: int) -> torch.dtype:
    return torch.int64 if bits >= 31 else torch.int32


def lfq_forward(z: torch.Tensor):
    """z [M, B] -> (codes float32 +-1 [M, B], indices [M]); bit b of the index is z[:, b] > 0."""
    bits = z.shape[-1]
    pos = z > 0
    codes = torch.where(pos, 1.0, -1.0).to(torch.float32)
    weights = torch.ones(bits, dtype=torch.int64, device=z.device) << torch.arange(bits, device=z.device)
    idx = (pos.to(torch.int64) * weights).sum(-1)
    return codes, idx.to(lfq_index_dtype(bits))


def lfq_indices_to_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits, device=indices.device)
    b = (indices.to(torch.int64)[:, None] >> shifts) & 1
    return (b * 2 - 1).to(torch.float32)
