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
  with digit j, one GEMM with the digits' one-hot matrix) and through the per-dim log-softmaxes to
  h (``_DimProbs``). When the tokens fit one chunk, the forward's P1 and P2 serve the backward.

Layout: the per-dim tensors are [d, Lmax, N], tokens innermost, so every elementwise op runs
along N (not along a row of a few levels) and ``p[d, :L_d]`` is the [L_d, N] block the products use.

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


def _dim_probs_forward(h: torch.Tensor, levels: list[int], temperature: float):
    """(p, log p, kept, t) of ``dim_probs`` (no autograd): ``kept`` [d, Lmax, N] marks the levels
    whose log p follows their logit (the others have p = 0), t = tanh(h + shift) [d, N]."""
    half_l, offset, shift, grid, pad = _tables(levels, h.dtype, h.device)
    t = torch.tanh(h.t() + shift[:, None])
    u = t * half_l[:, None] - offset[:, None]  # [d, N], level units
    logits = (u[:, None, :] - grid[:, :, None]).square_().div_(-temperature).masked_fill_(pad[:, :, None], -math.inf)
    # the log-softmax written out (torch's kernel is slow on rows of a few levels), with the levels
    # past L_d and those whose probability would be denormal (far levels at small tau, e.g. e^-98
    # at distance 7, tau 0.5) set to exactly 0: exp of -inf or into the denormals is far slower on
    # x86, and the GEMM path flushes anything below 2^-62 regardless (flush_threshold)
    lo = math.log(torch.finfo(h.dtype).tiny) + 1.0  # exp at exactly log(tiny) takes the slow path too
    shifted = logits.sub_(logits.amax(1, keepdim=True))  # <= 0, the most likely level at 0
    kept = shifted >= lo  # not the -inf past L_d
    shifted.clamp_(min=lo)
    e = torch.exp(shifted).mul_(kept)
    s = e.sum(1, keepdim=True)  # >= 1
    return e.div_(s), shifted.sub_(s.log_()), kept, t  # log p finite; p = 0 entries carry no weight


@functools.lru_cache(maxsize=64)
def _tables_cached(levels: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    with torch.inference_mode(False):  # plain tensors even when first asked for under inference mode
        half_l, offset, shift, half_width = fsq_constants(list(levels), dtype=dtype, device=device)
        j = torch.arange(max(levels), device=device, dtype=dtype)
        pad = j[None, :] >= torch.tensor(levels, device=device, dtype=dtype)[:, None]
        return half_l, offset, shift, j - half_width[:, None], pad


def _tables(levels: list[int], dtype: torch.dtype, device: torch.device):
    """(half_l, offset, shift) [d] of the bound (``reference.fsq_constants``), grid [d, Lmax] (each
    dim's level values g = digit - half_width) and pad [d, Lmax] (the entries past L_d); cached per
    levels, dtype and device (read-only)."""
    return _tables_cached(tuple(levels), dtype, torch.device(device))


class _DimProbs(torch.autograd.Function):
    """(p, log p) of ``dim_probs``, differentiable w.r.t. h, with the gradient in closed form.

    With s_j = logit_j - max (kept levels; the max is a constant of the gradient), p_j = e^s_j / S
    and log p_j = s_j - log S:  dL/ds_k = kept_k (p_k (Gp_k - sum_j Gp_j p_j) + Gl_k) - p_k sum_j Gl_j
    for gradients Gp, Gl of p and log p; then dL/du = sum_k dL/ds_k * -2 (u - g_k) / tau and
    dL/dh = dL/du * half_l * (1 - tanh^2). Autograd through the 17 ops of the forward would record
    and replay each of them, which at a training step's size costs more than the math."""

    @staticmethod
    def forward(ctx, h, levels, temperature):
        p, logp, kept, t = _dim_probs_forward(h, levels, temperature)
        ctx.save_for_backward(p, kept, t)
        ctx.levels, ctx.temperature = levels, temperature
        ctx.set_materialize_grads(False)
        return p, logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gp, gl):
        p, kept, t = ctx.saved_tensors
        if gp is None and gl is None:
            return None, None, None
        ds = torch.zeros_like(p)
        if gp is not None:
            ds.addcmul_(p, gp - (gp * p).sum(1, keepdim=True))
        if gl is not None:
            ds.add_(gl).mul_(kept).sub_(p * gl.sum(1, keepdim=True))
        else:
            ds.mul_(kept)
        half_l, offset, _, grid, _ = _tables(ctx.levels, t.dtype, t.device)
        u = t * half_l[:, None] - offset[:, None]
        # sum_k ds_k * -2 (u - g_k) / tau
        du = (ds.sum(1) * u - (ds * grid[:, :, None]).sum(1)).mul_(-2.0 / ctx.temperature)
        return du.mul_(half_l[:, None]).mul_(1.0 - t * t).t(), None, None


def dim_probs(h: torch.Tensor, levels: list[int], temperature: float):
    """h [N, d] (compute dtype) -> (p, log p) [d, Lmax, N] of each dim's soft assignment over its
    grid (differentiable, once). Tokens are the innermost axis: every elementwise op then runs over
    rows of N, not of a few levels, and ``p[d, :L_d]`` is already the [L_d, N] block the GEMM path
    multiplies. Entries past L_d, and levels whose probability would be below the dtype's smallest
    normal number, have p = 0 and a finite log p."""
    return _DimProbs.apply(h, list(levels), float(temperature))


def group_probs_t(p: torch.Tensor, dims: tuple[int, ...], levels: list[int]) -> torch.Tensor:
    """p [d, Lmax, m] -> P^T [prod(L of dims), m]: per-token probabilities of the group's codes,
    first dim of the group least significant (so the rows view as [L_dk, ..., L_d1, m]); entries
    below the flush threshold set to 0."""
    m = p.shape[2]
    thr = flush_threshold(p.dtype)
    out = None
    for d in dims:
        pd = F.threshold(p[d, : levels[d]], thr, 0.0)  # [L_d, m]
        out = pd if out is None else F.threshold_((pd[:, None, :] * out[None, :, :]).reshape(-1, m), thr, 0.0)
    return p.new_ones(1, m) if out is None else out  # an empty group: its one code has P = 1


@functools.lru_cache(maxsize=64)
def _digit_onehot_cached(levels: tuple[int, ...], dims: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """[sum L_d, K_g] over the group's dims d: row (d, j) is 1 at the codes whose digit d is j."""
    with torch.inference_mode(False):
        codes = torch.arange(math.prod(levels[d] for d in dims), device=device)
        rows, stride = [], 1
        for d in dims:  # the group's first dim least significant, as group_probs_t
            digit = codes // stride % levels[d]
            rows.append(digit[None, :] == torch.arange(levels[d], device=device)[:, None])
            stride *= levels[d]
        return torch.cat(rows).to(dtype)


def _group_grad_(grad: torch.Tensor, pt: torch.Tensor, dpt: torch.Tensor, dims: tuple[int, ...],
                 levels: list[int]) -> None:
    """grad [d, Lmax, m] += d/d log p of sum_c dP[c, n] P[c, n] for one group: with
    d P[c, n] / d log p_nd(j) = P[c, n] [c_d = j], entry (d, j, n) is the sum of w = dP * P over the
    group's codes whose digit d is j: one GEMM of the [sum L_d, K_g] digit one-hot matrix with w.
    dpt is overwritten."""
    if not dims:
        return
    w = dpt.mul_(pt)
    marginals = _digit_onehot_cached(tuple(levels), dims, w.dtype, w.device) @ w  # [sum L_d, m]
    row = 0
    for d in dims:
        grad[d, : levels[d]] += marginals[row : row + levels[d]]
        row += levels[d]


def pbar_sum(p: torch.Tensor, groups, levels: list[int], chunk: int):
    """(sum_n P1[n]^T P2[n] as [K1, K2] (not divided by N), (P1^T, P2^T) when the tokens are one
    chunk, else None: ``pbar_backward`` then reuses them); p [d, Lmax, N] detached."""
    g1, g2 = groups
    acc = p.new_zeros(math.prod(levels[i] for i in g1), math.prod(levels[i] for i in g2))
    pts = None
    for r in range(0, p.shape[2], chunk):
        pc = p[:, :, r : r + chunk]
        pts = group_probs_t(pc, g1, levels), group_probs_t(pc, g2, levels)
        acc.addmm_(pts[0], pts[1].t())
    return acc, pts if p.shape[2] <= chunk else None


def pbar_backward(p: torch.Tensor, groups, levels: list[int], chunk: int, g: torch.Tensor,
                  pts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """grad w.r.t. log p [d, Lmax, N] of sum(g * P1^T P2) for g [K1, K2] (p detached; 0 past L_d);
    ``pts``: the one chunk's (P1^T, P2^T) from ``pbar_sum``, else each chunk's are built again."""
    g1, g2 = groups
    grad = torch.zeros_like(p)
    for r in range(0, p.shape[2], chunk):
        pc = p[:, :, r : r + chunk]
        p1t, p2t = pts if pts is not None else (group_probs_t(pc, g1, levels), group_probs_t(pc, g2, levels))
        dp1t, dp2t = g @ p2t, g.t() @ p1t  # dP1^T = G P2^T, dP2^T = G^T P1^T
        _group_grad_(grad[:, :, r : r + chunk], p1t, dp1t, g1, levels)
        _group_grad_(grad[:, :, r : r + chunk], p2t, dp2t, g2, levels)
    return grad


class _CodebookEntropy(torch.autograd.Function):
    """H(pbar) from p [d, Lmax, N]; differentiable w.r.t. log p (``dim_probs``; p = 0 past L_d),
    whose gradient comes in closed form (``_group_grad_``) instead of autograd through the products."""

    @staticmethod
    def forward(ctx, logp, p, groups, levels, chunk, dist_info, n_global):
        p = p.detach()
        acc, ctx.pts = pbar_sum(p, groups, levels, chunk)  # one chunk's P1^T, P2^T: at most 2^21 floats
        pbar = _all_reduce_(acc, dist_info).div_(n_global)
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
            grad = pbar_backward(p, ctx.groups, ctx.levels, ctx.chunk, g, ctx.pts)
        ctx.pts = None
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
