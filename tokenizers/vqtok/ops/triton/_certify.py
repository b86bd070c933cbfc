"""Rounding-error bounds that certify a low-precision nearest-code search (pure torch).

A search kernel ranks codes by the score ``s_k = |c_k|^2 - 2 x.c_k`` computed in some precision
and keeps, per row, a few candidates plus ``evicted``: the smallest score of every code it did
not keep. Each candidate is then re-scored in float64. With ``E`` an upper bound of the kernel's
score error for *every* code of the row, the kept set provably contains the nearest code when

    evicted - E > min_kept score64 + E64                                   (certificate)

because every code outside the set has a true score >= evicted - E. ``E64`` covers the float64
re-scoring and the float64 direct-form distances of the oracle, so the winner also agrees with
``sum((x - c)^2)`` evaluated in float64. Rows failing the certificate are re-decided exactly.

The bounds (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3), with
``S = max_k sum_i |x_i c_ki| <= |x|_2 max_k |c_k|_2`` (Cauchy-Schwarz) and
``gamma_m = m u / (1 - m u)``; fp32 accumulation uses ``u = 2^-23`` (twice the unit roundoff, so
truncating tensor-core adders are covered too):

* ``"fp32"`` (exact: fp32 products, fp32 accumulation):  E = gamma_{D+2} (|c|^2_max + 2 S)
* ``"bf16"`` (operands rounded to bf16, exact products, fp32 accumulation):
  E = gamma_{D+2} (|c|^2_max + 2 S (1 + 3 u_b)) + 2 S (2 u_b + u_b^2),  u_b = 2^-8 (0 for bf16 inputs)
* ``"bf16x3"`` (x = x_hi + x_lo in two bf16 terms, likewise c; x_hi c_hi + x_hi c_lo + x_lo c_hi):
  each product is off by at most 4 u_b^2 |x_i c_i| (the dropped x_lo c_lo and the roundings of the
  lo terms), and 3D products are accumulated: E = gamma_{3D+4} (|c|^2_max + 2 S (1 + 3 u_b)) + 8 u_b^2 S
"""

from __future__ import annotations

import torch

U32 = 2.0**-23  # fp32 accumulation, conservatively 2x the unit roundoff
U64 = 2.0**-53
UBF16 = 2.0**-8  # round-to-nearest bf16 unit roundoff
SAFETY = 1.25  # slack on top of the worst-case bounds (they are already worst-case)


def _gamma(m: int, u: float) -> float:
    return m * u / (1.0 - m * u)


OPERANDS = ("fp32", "bf16", "bf16x3")


def row_bounds(x: torch.Tensor, cn: torch.Tensor, operands: str, inputs_bf16: bool = False):
    """Per-row score error bounds.

    Args:
        x: [N, D] the search rows (any float dtype, any strides).
        cn: [K] float32 squared norms of the codes, as the kernel used them.
        operands: how the kernel formed its dot products: "fp32", "bf16" or "bf16x3".
        inputs_bf16: the inputs already are bf16, so rounding them to bf16 is exact.

    Returns:
        (E [N] float64: the kernel's score error bound, E64 [N] float64: the float64 margin).
    """
    d = x.shape[1]
    xn = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).to(torch.float64) * (1 + 4 * d * U32)
    cn_max = cn.max().to(torch.float64) * (1 + _gamma(d, U32))  # cn itself has error gamma_D
    cnorm_max = cn_max.sqrt() * (1 + U32)
    s_max = xn * cnorm_max
    ub = 0.0 if inputs_bf16 else UBF16
    if operands == "fp32":
        err = _gamma(d + 2, U32) * (cn_max + 2 * s_max)
    elif operands == "bf16":
        err = _gamma(d + 2, U32) * (cn_max + 2 * s_max * (1 + 3 * ub)) + 2 * s_max * (2 * ub + ub * ub)
    elif operands == "bf16x3":
        err = _gamma(3 * d + 4, U32) * (cn_max + 2 * s_max * (1 + 3 * ub)) + 8 * ub * ub * s_max
    else:
        raise ValueError(f"operands must be one of {OPERANDS}, got {operands!r}")
    # tiny absolute slack for subnormal operands (their rounding error is absolute, not relative)
    err = SAFETY * err + d * 2.0**-100
    e64 = 8 * _gamma(d + 2, U64) * (xn * xn + cn_max + 2 * s_max)
    return err, e64


def certified(evicted: torch.Tensor, best_score64: torch.Tensor, err: torch.Tensor, e64: torch.Tensor):
    """Rows whose kept candidates provably contain the nearest code (False on NaN/inf bounds)."""
    lhs = evicted.to(torch.float64) - err
    return lhs > best_score64 + e64
