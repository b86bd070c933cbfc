"""Exact LFQ / BSQ entropy terms without the N x 2^B probability matrix.

Maths (Yu et al. 2023, "Language Model Beats Diffusion", LFQ; Zhao et al. 2024, BSQ). Codes are
``c in {-s, +s}^B`` (LFQ: s = 1; BSQ: s = 1/sqrt(B)) and the per-token distribution over codes is
``softmax_c(2 z.c / tau)``. It factorises over bits: with ``a_nb = 4 s z_nb / tau``,
``p_nb = P(bit b = 1) = sigmoid(a_nb)``.

* per-sample entropy = (1/N) sum_n sum_b H(p_nb)  (closed form, stable in ``|a|``);
* codebook entropy = H(pbar), ``pbar = (1/N) sum_n prod_b p_n(bit_b)``. Bits split into halves
  B = B1 + B2; ``P1 [N, 2^B1]`` and ``P2 [N, 2^B2]`` are the per-token probabilities of each half's
  codes, so ``pbar = P1^T P2 / N`` (one GEMM, chunked over N; never an N x 2^B matrix).
  Backward: ``G = dH/dpbar``, ``dP1 = P2 G^T / N``, ``dP2 = P1 G / N``, then through the products:
  ``d log P[n, c] / d a_nb = bit_b(c) - p_nb``.

Bit order is LSB-first (dimension b is bit b of the code index), as in ``lfq_quantize``: the
half-codebook matrix ``pbar[c1, c2]`` holds the usage of code index ``c1 + 2^B1 * c2``.

``eps_mode`` picks the entropy formula: ``exact`` (-p log p, 0 log 0 = 0, no clamp: uniform usage
of 2^18 codes is pbar ~ 3.8e-6, below the peers' 1e-5), ``vqtorch`` (vector-quantize-pytorch:
``-p log(max(p, 1e-5))`` on both terms), ``magvit`` (MAGVIT / Open-MAGVIT2 ``compute_entropy_loss``:
codebook ``-pbar log(pbar + 1e-5)``; their per-sample term is ``log_softmax(logits / tau + 1e-5)``,
which a constant shift leaves exact). ``vqtorch``'s per-sample term does not factorise over bits;
it is computed exactly in O(N 2^B1 log 2^B2) time by sorting one half's log-probabilities.

DDP: when ``torch.distributed`` is initialised (or ``process_group`` is given) both values are the
global-batch ones (pbar and the per-sample sum are all-reduced, divided by the global token count).
Each rank's gradient w.r.t. its local z is ``world_size x d(global value)/d(z_local)``: DDP's mean
all-reduce of parameter gradients then yields exactly the gradient of the global-batch loss (the
convention of vector-quantize-pytorch's differentiable all-reduce mean).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks

EPS_MODES = ("exact", "vqtorch", "magvit")
COMPAT_EPS = 1e-5
# P1 + P2 elements per chunk of tokens: bounds the extra memory of the torch path (fp32: 8 MiB
# for P1 and P2 in the forward, twice that in the backward) while keeping the GEMMs large.
_CHUNK_ELEMS = 1 << 21
# Largest codebook whose pbar the torch path holds (2^26 fp32 = 256 MiB); beyond it use Triton.
MAX_TORCH_BITS = 26


# --------------------------------------------------------------------------------------------
# half-codebook probabilities
# --------------------------------------------------------------------------------------------
def half_probs(a: torch.Tensor) -> torch.Tensor:
    """a [n, k] bit logits -> P [n, 2^k], P[n, c] = prod_b sigmoid(+-a_nb), LSB-first (differentiable)."""
    n, k = a.shape
    p, q = torch.sigmoid(a), torch.sigmoid(-a)  # q computed directly: no 1 - p cancellation
    out = a.new_ones(n, 1)
    for b in range(k):
        out = torch.cat([out * q[:, b : b + 1], out * p[:, b : b + 1]], 1)
    return out


def flush_threshold(dtype: torch.dtype) -> float:
    """sqrt of the smallest normal number: entries below it are flushed to 0 in the GEMM path.

    A product of two flushed entries is then normal or exactly 0: denormal operands slow x86 FMAs
    down 10-100x (saturated sigmoids at small temperatures produce them in bulk). The flushed mass
    is below 2^-62 per token (fp32; 2^-510 in fp64), far under the result's rounding error.
    """
    return 2.0**-62 if dtype != torch.float64 else 2.0**-510


def half_probs_t(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [n, k] -> P^T [2^k, n] (codes major, so each doubling step is a contiguous block), flushed.

    Built by doubling in place: after bit b the first 2^(b+1) rows hold the codes of bits 0..b.
    """
    n, k = a.shape
    thr = flush_threshold(a.dtype)
    at = a.t().contiguous()  # rows p[b] contiguous: a strided row makes every broadcast multiply scalar
    p, q = F.threshold(torch.sigmoid(at), thr, 0.0), F.threshold(torch.sigmoid(-at), thr, 0.0)
    out = a.new_empty(1 << k, n) if out is None else out
    out[:1] = 1
    for b in range(k):
        w = 1 << b
        torch.mul(out[:w], p[b], out=out[w : 2 * w])
        out[:w].mul_(q[b])
        F.threshold_(out[: 2 * w], thr, 0.0)
    return out


def half_logprobs(a: torch.Tensor) -> torch.Tensor:
    """a [n, k] -> log P [n, 2^k] (finite even where P underflows)."""
    n, k = a.shape
    lp, lq = F.logsigmoid(a), F.logsigmoid(-a)
    out = a.new_zeros(n, 1)
    for b in range(k):
        out = torch.cat([out + lq[:, b : b + 1], out + lp[:, b : b + 1]], 1)
    return out


def bits_matrix(k: int, dtype, device) -> torch.Tensor:
    """[2^k, k] with entry [c, b] = bit b of c."""
    c = torch.arange(1 << k, device=device)[:, None]
    return ((c >> torch.arange(k, device=device)) & 1).to(dtype)


def _chunk_rows(n: int, b1: int, b2: int, chunk: int | None) -> int:
    if chunk is None:
        chunk = max(64, _CHUNK_ELEMS // ((1 << b1) + (1 << b2)))
    return max(1, min(n, int(chunk)))


# --------------------------------------------------------------------------------------------
# entropy formulas on pbar: value f(p) summed, and its derivative f'(p)
# --------------------------------------------------------------------------------------------
def entropy_of(p: torch.Tensor, mode: str) -> torch.Tensor:
    """sum over entries of f(p): -p log p (exact), -p log max(p, 1e-5) (vqtorch), -p log(p + 1e-5) (magvit)."""
    if mode == "exact":
        return -torch.special.xlogy(p, p).sum()
    if mode == "vqtorch":
        return -(p * p.clamp(min=COMPAT_EPS).log()).sum()
    return -(p * (p + COMPAT_EPS).log()).sum()


def entropy_grad(p: torch.Tensor, mode: str) -> torch.Tensor:
    """f'(p) elementwise. Exact mode: -(log p + 1), and 0 where p == 0 (no token reaches that code)."""
    if mode == "exact":
        pos = p > 0
        return torch.where(pos, -(torch.log(torch.where(pos, p, 1.0)) + 1), 0.0)
    if mode == "vqtorch":
        return -p.clamp(min=COMPAT_EPS).log() - (p >= COMPAT_EPS).to(p.dtype)
    return -(p + COMPAT_EPS).log() - p / (p + COMPAT_EPS)


def centered_entropy_grad(pbar: torch.Tensor, mode: str) -> torch.Tensor:
    """f'(pbar) minus its pbar-weighted mean. Every token's code probabilities sum to 1, so a constant
    shift of G changes no gradient; centring removes the ~|log pbar| offset that otherwise cancels
    in sum_c P (bit_b(c) - p_b) G(c) and costs fp32 digits."""
    g = entropy_grad(pbar, mode)
    return g.sub_((pbar * g).sum() / pbar.sum())


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
def _resolve_group(process_group):
    """(group, world_size) when the values must be global, else None."""
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    return (group, world) if world > 1 else None


def _all_reduce_(t: torch.Tensor, dist_info) -> torch.Tensor:
    if dist_info is not None:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dist_info[0])
    return t


def global_count(n: int, device, dist_info) -> int:
    t = torch.tensor([float(n)], dtype=torch.float64, device=device)
    return int(_all_reduce_(t, dist_info).item())


class _GlobalMean(torch.autograd.Function):
    """local_sum (scalar) -> all-reduced sum / n_global; gradient world / n_global (DDP mean convention)."""

    @staticmethod
    def forward(ctx, local_sum, n_global, dist_info):
        ctx.scale = (dist_info[1] if dist_info else 1) / n_global
        return _all_reduce_(local_sum.detach().clone(), dist_info) / n_global

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None, None


class _WithGrad(torch.autograd.Function):
    """Returns ``value``; its gradient w.r.t. ``x`` was computed eagerly (``grad``) chunk by chunk."""

    @staticmethod
    def forward(ctx, x, value, grad):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None


# --------------------------------------------------------------------------------------------
# codebook entropy, torch path: chunked BLAS GEMMs, pbar held (2^B floats), P1/P2 recomputed
# in the backward (kept from the forward when the tokens are one chunk)
# --------------------------------------------------------------------------------------------
def pbar_sum(a: torch.Tensor, b1: int, chunk: int):
    """(sum_n P1[n]^T P2[n] as [2^B1, 2^B2] (not divided by N), (P1^T, P2^T) when the tokens are one
    chunk, else None: ``pbar_backward`` then reuses them instead of building them again). a [N, B]."""
    n, bits = a.shape
    b2 = bits - b1
    acc = a.new_zeros(1 << b1, 1 << b2)
    m0 = min(chunk, n)
    buf1, buf2 = a.new_empty(1 << b1, m0), a.new_empty(1 << b2, m0)
    for r in range(0, n, chunk):
        ac = a[r : r + chunk]
        m = ac.shape[0]
        p1t, p2t = half_probs_t(ac[:, :b1], buf1[:, :m]), half_probs_t(ac[:, b1:], buf2[:, :m])
        acc.addmm_(p1t, p2t.t())
    return acc, (buf1, buf2) if 0 < n <= chunk else None


def _half_grad(pt: torch.Tensor, dpt: torch.Tensor, a_half: torch.Tensor, bits_t: torch.Tensor) -> torch.Tensor:
    """[m, k]: d/da of sum_c dP[c, n] P[c, n] with d log P/d a_nb = bit_b(c) - p_nb. dpt is overwritten;
    bits_t [k, 2^k] is bits_matrix transposed (contiguous: the GEMM then runs along w's rows)."""
    w = dpt.mul_(pt)  # [2^k, m]
    return torch.mm(bits_t, w).t() - torch.sigmoid(a_half) * w.sum(0)[:, None]


def pbar_backward(a: torch.Tensor, b1: int, chunk: int, g: torch.Tensor,
                  pts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """grad w.r.t. a [N, B] of sum(g * P1^T P2) for g [2^B1, 2^B2]; ``pts``: the one chunk's
    (P1^T, P2^T) from ``pbar_sum`` (the same values; else each chunk's are built again)."""
    n, bits = a.shape
    b2 = bits - b1
    bits1, bits2 = (bits_matrix(k, a.dtype, a.device).t().contiguous() for k in (b1, b2))
    grad = torch.empty_like(a)
    m0 = min(chunk, n)
    buf1, buf2 = pts if pts is not None else (a.new_empty(1 << b1, m0), a.new_empty(1 << b2, m0))
    dbuf1, dbuf2 = a.new_empty(1 << b1, m0), a.new_empty(1 << b2, m0)
    for r in range(0, n, chunk):
        ac = a[r : r + chunk]
        m = ac.shape[0]
        if pts is not None:
            p1t, p2t = buf1, buf2
        else:
            p1t, p2t = half_probs_t(ac[:, :b1], buf1[:, :m]), half_probs_t(ac[:, b1:], buf2[:, :m])
        dp1t = torch.mm(g, p2t, out=dbuf1[:, :m])  # dP1^T = G P2^T
        dp2t = torch.mm(g.t(), p1t, out=dbuf2[:, :m])  # dP2^T = G^T P1^T
        grad[r : r + m, :b1] = _half_grad(p1t, dp1t, ac[:, :b1], bits1)
        grad[r : r + m, b1:] = _half_grad(p2t, dp2t, ac[:, b1:], bits2)
    return grad


class _CodebookEntropyTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b1, chunk, mode, dist_info, n_global):
        acc, ctx.pts = pbar_sum(a.detach(), b1, chunk)  # one chunk's P1^T, P2^T: at most 2^21 floats
        pbar = _all_reduce_(acc, dist_info).div_(n_global)
        ctx.save_for_backward(a, pbar)
        ctx.b1, ctx.chunk, ctx.mode, ctx.n_global = b1, chunk, mode, n_global
        ctx.world = dist_info[1] if dist_info else 1
        return entropy_of(pbar, mode)

    @staticmethod
    def backward(ctx, gh):
        a, pbar = ctx.saved_tensors
        g = centered_entropy_grad(pbar, ctx.mode).mul_(gh * ctx.world / ctx.n_global)
        del pbar
        grad = pbar_backward(a.detach(), ctx.b1, ctx.chunk, g, ctx.pts)
        ctx.pts = None
        return grad, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# per-sample entropy
# --------------------------------------------------------------------------------------------
class _PerSampleExactSum(torch.autograd.Function):
    """sum_n sum_b H(sigmoid(a_nb)), H = softplus(-|a|) + |a| sigmoid(-|a|) (no cancellation);
    dH/da = -a p (1 - p). Saves only a."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        x = a.abs()
        return (F.softplus(-x) + x * torch.sigmoid(-x)).sum()

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return -g * a * torch.sigmoid(a) * torch.sigmoid(-a)


def per_sample_exact_sum(a: torch.Tensor) -> torch.Tensor:
    return _PerSampleExactSum.apply(a)


def _per_token_vqtorch(a: torch.Tensor, b1: int) -> torch.Tensor:
    """[n] of -sum_c p_c log max(p_c, eps), p_c = P1[c1] P2[c2], without the n x 2^B matrix.

    For each (n, c1) the codes c2 with log P2 >= log eps - log P1[c1] keep their log; the others
    use log eps. Sorting log P2 once per token turns that into prefix sums and one binary search.
    """
    l1, l2 = half_logprobs(a[:, :b1]), half_logprobs(a[:, b1:])
    asc, _ = l2.sort(dim=1)
    desc = asc.flip(1)
    p2 = desc.exp()
    zero = p2.new_zeros(p2.shape[0], 1)
    cum_p = torch.cat([zero, p2.cumsum(1)], 1)  # mass of the k most likely c2
    cum_pl = torch.cat([zero, (p2 * desc).cumsum(1)], 1)
    log_eps = math.log(COMPAT_EPS)
    k = asc.shape[1] - torch.searchsorted(asc.detach().contiguous(), (log_eps - l1).detach().contiguous(), side="left")
    above_p, above_pl = cum_p.gather(1, k), cum_pl.gather(1, k)
    inner = l1 * above_p + above_pl + log_eps * (cum_p[:, -1:] - above_p)
    return -(l1.exp() * inner).sum(1)


def per_sample_vqtorch_sum(a: torch.Tensor, b1: int) -> torch.Tensor:
    """Summed per-token vqtorch entropy, differentiable w.r.t. a; gradients computed chunk by chunk."""
    n, bits = a.shape
    fn, rows = _per_token_vqtorch, max(1, (1 << 21) // ((1 << b1) * 4 + (1 << (bits - b1))))
    value = a.new_zeros(())
    grad = torch.zeros_like(a) if a.requires_grad else None
    for r in range(0, n, rows):
        ac = a[r : r + rows].detach()
        with torch.enable_grad():
            ac.requires_grad_(grad is not None)
            v = fn(ac, b1).sum()
            if grad is not None:
                (grad[r : r + rows],) = torch.autograd.grad(v, ac)
        value += v.detach()
    return value if grad is None else _WithGrad.apply(a, value, grad)


# --------------------------------------------------------------------------------------------
# public op
# --------------------------------------------------------------------------------------------
def _use_triton(backend: str, a: torch.Tensor, bits: int) -> bool:
    if backend in ("torch", "cpp", "cuda"):
        return False
    if backend == "triton":
        from .dispatch import BackendUnavailable, _supports_device

        try:
            import triton  # noqa: F401
        except Exception as e:
            raise BackendUnavailable(f"backend 'triton' is not available for lfq_entropy ({e}); install triton") from e
        if not _supports_device("triton", a.device):
            raise BackendUnavailable(
                f"backend 'triton' cannot run lfq_entropy on {a.device.type} tensors "
                "(use CUDA tensors, or set TRITON_INTERPRET=1 before importing triton)"
            )
        return True
    # auto: the fused kernel only where pbar is too big to hold
    return a.device.type == "cuda" and bits > 24 and _triton_importable()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def lfq_entropy(
    z: torch.Tensor,
    *,
    temperature: float = 1.0,
    scale: float = 1.0,
    split: int | None = None,
    chunk: int | None = None,
    eps_mode: str = "exact",
    process_group=None,
    backend: str = "auto",
):
    """Per-sample and codebook entropy (nats) of the LFQ/BSQ code distribution softmax(2 z.c / tau).

    Args:
        z: [..., B] pre-quantisation latents, any float dtype; computed in fp32 (fp64 if z is fp64).
        temperature: tau > 0 (vector-quantize-pytorch's ``inv_temperature`` is 1/tau).
        scale: code magnitude s (LFQ 1; BSQ 1/sqrt(B) with z on the unit sphere).
        split: B1, bits in the first half (default B // 2); any value in [0, B] gives the same result.
        chunk: tokens per chunk of the GEMM path (default: 2^21 P1+P2 elements, i.e. 2048 tokens at
            B=18; smaller saves memory).
        eps_mode: ``exact`` | ``vqtorch`` | ``magvit`` (see the module docstring).
        process_group: all-reduce over this group (default: the world group when torch.distributed
            is initialised). Each rank's gradient is world_size x the gradient of the global value.
        backend: ``auto`` | ``torch`` (chunked BLAS; ``cpp``/``cuda`` are accepted aliases) |
            ``triton`` (fused kernel, pbar never stored; ``auto`` picks it on CUDA for B > 24).

    Returns:
        (per_sample_entropy, codebook_entropy): 0-d tensors in the compute dtype, differentiable.
    """
    _checks.check_float_tensor("z", z, min_ndim=1)
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if backend not in ("auto", "torch", "cpp", "cuda", "triton"):
        raise ValueError(f"backend must be auto|torch|cpp|cuda|triton, got {backend!r}")
    bits = z.shape[-1]
    b1 = bits // 2 if split is None else split
    if isinstance(b1, bool) or not isinstance(b1, int) or not 0 <= b1 <= bits:
        raise ValueError(f"split must be an int in [0, {bits}] (bits of z), got {split!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    _checks.check_finite("z", z)
    dist_info = _resolve_group(process_group)
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    a = z.reshape(-1, bits).to(dtype) * (4.0 * scale / temperature)
    n_global = global_count(a.shape[0], a.device, dist_info) if dist_info else a.shape[0]
    if n_global == 0:
        raise ValueError(f"z holds no tokens (shape {tuple(z.shape)})")
    use_triton = _use_triton(backend, a, bits)
    if not use_triton and bits > MAX_TORCH_BITS:
        raise ValueError(
            f"B={bits} bits: pbar (2^{bits} floats) is too large for the torch path (B <= {MAX_TORCH_BITS}); "
            "use backend='triton' on a CUDA device"
        )
    if eps_mode == "vqtorch":
        ps_sum = per_sample_vqtorch_sum(a, b1)
    else:
        ps_sum = per_sample_exact_sum(a)
    per_sample = _GlobalMean.apply(ps_sum, n_global, dist_info)
    if use_triton:
        from .triton.lfq_entropy import codebook_entropy_fused

        codebook = codebook_entropy_fused(a, b1, eps_mode, dist_info)
    else:
        rows = _chunk_rows(a.shape[0], b1, bits - b1, chunk)
        codebook = _CodebookEntropyTorch.apply(a, b1, rows, eps_mode, dist_info, n_global)
    return per_sample, codebook
