"""Exact FSQ entropy terms without the N x K probability matrix.

The LFQ entropy regulariser (Yu et al. 2023, MAGVIT-v2; see ``lfq_entropy``) carried over to
finite scalar quantisation (Mentzer et al. 2023). With ``(half_l, offset, shift, half_width) =
reference.fsq_constants(levels)`` the bounded pre-rounding value of dim d, in level units, is

    u_nd = tanh(h_nd + shift_d) * half_l_d - offset_d,

which ``fsq_quantize`` rounds to the integer grid ``g_d = {-half_width_d, ..., L_d - 1 - half_width_d}``
(digit ``g + half_width_d`` of the code index). The soft assignment of token n in dim d is

    p_nd(g) = softmax_{g in g_d}( -(u_nd - g)^2 / tau ),

and a token's distribution over the K = prod(L_d) codes is the product ``P_n(c) = prod_d p_nd(c_d)``.

* per-sample entropy = (1/N) sum_n sum_d H(p_nd)  (the entropy of the product distribution);
* codebook entropy = H(pbar), ``pbar = (1/N) sum_n P_n``. The dims are split into two groups whose
  level products K1 * K2 = K are as balanced as possible (smallest K1 + K2); ``P1 [N, K1]`` and
  ``P2 [N, K2]`` are outer products of the per-dim p_nd within each group, so
  ``pbar = P1^T P2 / N`` (one K1 x K2 GEMM, chunked over N; never an N x K matrix).
  Backward: ``G = dH/dpbar`` (centred: every P_n sums to 1, so a constant shift of G changes no
  gradient), ``dP1 = P2 G^T / N``, ``dP2 = P1 G / N``, then in closed form to each dim's
  log-probabilities (``d P[c] / d log p_d(j) = P[c] [c_d = j]``: sums of ``dP * P`` over the codes
  with digit j) and by autograd through the per-dim log-softmaxes.

Entropies are in nats, ``-p log p`` with ``0 log 0 = 0`` and no clamp (lfq_entropy's ``exact`` mode:
uniform usage of 2^18 codes is pbar ~ 3.8e-6). A level whose p_nd would be below e times the
smallest normal number is exactly 0 (``dim_probs``), and code probabilities below sqrt(smallest
normal) are flushed to 0 in the GEMM path (``lfq_entropy.flush_threshold``: at most 2^-62 per token
in fp32).

DDP: as ``lfq_entropy`` (same helpers): when ``torch.distributed`` is initialised (or
``process_group`` is given) pbar, the per-sample sum and N are all-reduced, so both values are those
of the global batch, and each rank's gradient is ``world_size x d(global value)/d(h_local)`` (DDP's
mean all-reduce of parameter gradients then gives the gradient of the global-batch loss).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _checks
from .lfq_entropy import (
    MAX_TORCH_BITS,
    _GlobalMean,
    _all_reduce_,
    _resolve_group,
    centered_entropy_grad,
    entropy_of,
    flush_threshold,
    global_count,
)
from .reference import fsq_constants

# P1 + P2 elements per chunk of tokens (as lfq_entropy): bounds the extra memory, keeps GEMMs large.
_CHUNK_ELEMS = 1 << 21
# exhaustive search of the balanced split up to this many dims (2^16 subsets), greedy beyond
_EXHAUSTIVE_DIMS = 16


@functools.lru_cache(maxsize=64)
def split_dims(levels: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two groups of dim indices (each in increasing order) whose level products are as balanced as
    possible (smallest K1 + K2, then K1 <= K2). The GEMM costs N*K whatever the split; the balance
    bounds the size of P1 and P2 (N * (K1 + K2))."""
    d = len(levels)
    if d <= _EXHAUSTIVE_DIMS:
        k = math.prod(levels)
        best = None
        for mask in range(1 << d):
            k1 = math.prod(levels[i] for i in range(d) if mask >> i & 1)
            key = (k1 + k // k1, k1)
            if best is None or key < best[0]:
                best = (key, mask)
        mask = best[1]
        g1 = [i for i in range(d) if mask >> i & 1]
    else:  # largest levels first, each to the group with the smaller product
        g1, k1, k2 = [], 1, 1
        for i in sorted(range(d), key=lambda i: -levels[i]):
            if k1 <= k2:
                g1.append(i)
                k1 *= levels[i]
            else:
                k2 *= levels[i]
    g2 = [i for i in range(d) if i not in g1]
    return tuple(sorted(g1)), tuple(g2)


def dim_probs(h: torch.Tensor, levels: list[int], temperature: float):
    """h [N, d] (compute dtype) -> (p, log p) [N, d, Lmax] of each dim's soft assignment
    over its grid (differentiable). Entries past L_d, and levels whose probability would be below
    the dtype's smallest normal number, have p = 0 and a finite log p."""
    half_l, offset, shift, half_width = fsq_constants(levels, dtype=h.dtype, device=h.device)
    u = torch.tanh(h + shift) * half_l - offset  # [N, d], level units
    lmax = max(levels)
    j = torch.arange(lmax, device=h.device, dtype=h.dtype)
    grid = j - half_width[:, None]  # [d, Lmax]: g = digit - half_width
    pad = j[None, :] >= torch.tensor(levels, device=h.device, dtype=h.dtype)[:, None]  # [d, Lmax]
    logits = (-(u[:, :, None] - grid) ** 2 / temperature).masked_fill(pad, -math.inf)
    # the log-softmax written out (torch's kernel is slow on rows of a few levels), with the levels
    # past L_d and those whose probability would be denormal (far levels at small tau, e.g. e^-98
    # at distance 7, tau 0.5) set to exactly 0: exp of -inf or into the denormals is far slower on
    # x86, and the GEMM path flushes anything below 2^-62 regardless (flush_threshold)
    lo = math.log(torch.finfo(h.dtype).tiny) + 1.0  # exp at exactly log(tiny) takes the slow path too
    shifted = logits - logits.detach().amax(-1, keepdim=True)  # <= 0, the most likely level at 0
    drop = shifted < lo  # also the -inf past L_d
    shifted = shifted.clamp(min=lo)
    e = torch.exp(shifted).masked_fill(drop, 0.0)
    s = e.sum(-1, keepdim=True)  # >= 1
    logp = shifted - torch.log(s)  # finite; entries with p = 0 carry no weight anywhere
    return e / s, logp


def group_probs_t(p: torch.Tensor, dims: tuple[int, ...], levels: list[int]) -> torch.Tensor:
    """p [m, d, Lmax] -> P^T [prod(L of dims), m]: per-token probabilities of the group's codes,
    first dim of the group least significant (so the rows view as [L_dk, ..., L_d1, m]); entries
    below the flush threshold set to 0."""
    m = p.shape[0]
    thr = flush_threshold(p.dtype)
    out = p.new_ones(1, m)
    for d in dims:
        pd = F.threshold(p[:, d, : levels[d]].t().contiguous(), thr, 0.0)  # [L_d, m], rows contiguous
        out = F.threshold_((pd[:, None, :] * out[None, :, :]).reshape(-1, m), thr, 0.0)
    return out


def _group_grad_(grad: torch.Tensor, pt: torch.Tensor, dpt: torch.Tensor, dims: tuple[int, ...],
                 levels: list[int]) -> None:
    """grad [m, d, Lmax] += d/d log p of sum_c dP[c, n] P[c, n] for one group: with
    d P[c, n] / d log p_nd(j) = P[c, n] [c_d = j], entry (n, d, j) is the sum of w = dP * P over the
    group's codes whose digit d is j. dpt is overwritten."""
    m = pt.shape[1]
    w = dpt.mul_(pt).view(*(levels[d] for d in reversed(dims)), m)
    axes = list(range(len(dims)))
    for i, d in enumerate(dims):
        ax = len(dims) - 1 - i  # the group's first dim is the innermost axis
        rest = [a for a in axes if a != ax]
        grad[:, d, : levels[d]] += (w.sum(rest) if rest else w).t()


def pbar_sum(p: torch.Tensor, groups, levels: list[int], chunk: int) -> torch.Tensor:
    """sum_n P1[n]^T P2[n] as [K1, K2] (not divided by N); p [N, d, Lmax] detached."""
    g1, g2 = groups
    acc = p.new_zeros(math.prod(levels[i] for i in g1), math.prod(levels[i] for i in g2))
    for r in range(0, p.shape[0], chunk):
        pc = p[r : r + chunk]
        acc.addmm_(group_probs_t(pc, g1, levels), group_probs_t(pc, g2, levels).t())
    return acc


def pbar_backward(p: torch.Tensor, groups, levels: list[int], chunk: int, g: torch.Tensor) -> torch.Tensor:
    """grad w.r.t. log p [N, d, Lmax] of sum(g * P1^T P2) for g [K1, K2] (p detached; 0 past L_d)."""
    g1, g2 = groups
    grad = torch.zeros_like(p)
    for r in range(0, p.shape[0], chunk):
        pc = p[r : r + chunk]
        p1t, p2t = group_probs_t(pc, g1, levels), group_probs_t(pc, g2, levels)
        dp1t, dp2t = g @ p2t, g.t() @ p1t  # dP1^T = G P2^T, dP2^T = G^T P1^T
        _group_grad_(grad[r : r + chunk], p1t, dp1t, g1, levels)
        _group_grad_(grad[r : r + chunk], p2t, dp2t, g2, levels)
    return grad


class _CodebookEntropy(torch.autograd.Function):
    """H(pbar) from p [N, d, Lmax]; differentiable w.r.t. log p (``dim_probs``; p = 0 past L_d),
    whose gradient comes in closed form (``_group_grad_``) instead of autograd through the products."""

    @staticmethod
    def forward(ctx, logp, p, groups, levels, chunk, dist_info, n_global):
        p = p.detach()
        pbar = _all_reduce_(pbar_sum(p, groups, levels, chunk), dist_info).div_(n_global)
        ctx.save_for_backward(p, pbar)
        ctx.groups, ctx.levels, ctx.chunk, ctx.n_global = groups, levels, chunk, n_global
        ctx.world = dist_info[1] if dist_info else 1
        return entropy_of(pbar, "exact")

    @staticmethod
    def backward(ctx, gh):
        p, pbar = ctx.saved_tensors
        g = centered_entropy_grad(pbar, "exact").mul_(gh * ctx.world / ctx.n_global)
        del pbar
        with torch.autocast(p.device.type, enabled=False):
            grad = pbar_backward(p, ctx.groups, ctx.levels, ctx.chunk, g)
        return grad, None, None, None, None, None, None


def fsq_entropy(
    h: torch.Tensor,
    levels,
    *,
    temperature: float = 1.0,
    chunk: int | None = None,
    process_group=None,
):
    """Per-sample and codebook entropy (nats) of FSQ's soft code assignment (module docstring).

    Args:
        h: [..., len(levels)] FSQ inputs (after ``in_proj``, before the tanh bound), any float
            dtype; computed in fp32 (fp64 if h is fp64).
        levels: FSQ levels, e.g. [8, 5, 5, 5]; K = prod(levels) <= 2^26 (pbar is held in memory).
        temperature: tau > 0 of softmax(-(u - g)^2 / tau) over each dim's grid (level units).
        chunk: tokens per chunk of the GEMM path (default: 2^21 P1+P2 elements); any value gives
            the same result, smaller saves memory.
        process_group: all-reduce over this group (default: the world group when torch.distributed
            is initialised). Each rank's gradient is world_size x the gradient of the global value.

    Returns:
        (per_sample_entropy, codebook_entropy): 0-d tensors in the compute dtype, differentiable
        w.r.t. h. Maxima: sum_d log L_d and log K.
    """
    levels = _checks.check_levels(levels)
    _checks.check_float_tensor("h", h, min_ndim=1)
    _checks.check_last_dim("h", h, len(levels), "one entry per FSQ level")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    k = math.prod(levels)
    if k > 2**MAX_TORCH_BITS:
        raise ValueError(
            f"levels {levels}: K = {k} codes; pbar (K floats) is held in memory, so K <= 2^{MAX_TORCH_BITS}"
        )
    _checks.check_finite("h", h)
    dist_info = _resolve_group(process_group)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    x = h.reshape(-1, len(levels))
    n_global = global_count(x.shape[0], x.device, dist_info) if dist_info else x.shape[0]
    if n_global == 0:
        raise ValueError(f"h holds no tokens (shape {tuple(h.shape)})")
    groups = split_dims(tuple(levels))
    k1 = math.prod(levels[i] for i in groups[0])
    rows = max(1, min(max(x.shape[0], 1), chunk if chunk is not None else max(64, _CHUNK_ELEMS // (k1 + k // k1))))
    with torch.autocast(x.device.type, enabled=False):
        p, logp = dim_probs(x.to(dtype), levels, float(temperature))
        per_sample = _GlobalMean.apply(-(p * logp).sum(), n_global, dist_info)
        codebook = _CodebookEntropy.apply(logp, p, groups, levels, rows, dist_info, n_global)
    return per_sample, codebook
