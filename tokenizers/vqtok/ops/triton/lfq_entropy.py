"""Fused Triton kernels for the LFQ/BSQ codebook entropy: pbar is never stored.

One program owns a tile (c1 in [i*BLOCK_1, ...), c2 in [j*BLOCK_2, ...)) of the half-codebook
matrix pbar = P1^T P2 / N (see ``vqtok.ops.lfq_entropy``). It loops over all N tokens: builds the
P1 [BLOCK_N, BLOCK_1] and P2 [BLOCK_N, BLOCK_2] tiles from the per-bit log-sigmoids
(log P[n, c] = sum_b (bit_b(c) ? log sigma(a_nb) : log sigma(-a_nb))), accumulates
P1^T P2 with ``tl.dot`` in fp32 (``ieee``: no TF32), and ends with the entropy epilogue on its tile.

Forward: per-tile partial sums of f(pbar), pbar f'(pbar) and pbar (for the centring shift of G,
see ``centered_entropy_grad``), summed in a fixed order by torch (deterministic).
Backward: the program recomputes its pbar tile (a second N loop), forms G, then loops over N again:
dP1 = P2 G^T, dP2 = P1 G, W = dP * P, and adds T[n, b] = sum_c W[n, c] bit_b(c) and
S[n] = sum_c W[n, c] into [N, B] / [N, 2] buffers with atomics; torch finishes
grad[n, b] = T[n, b] - sigma(a_nb) S[n, half(b)]. Memory: O(N B), whatever 2^B is.
Under DDP the logits are all-gathered (N_global x B floats, small) so each rank sees the global
pbar; the gradient loop covers the rank's own rows only.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_MODES = {"exact": 0, "vqtorch": 1, "magvit": 2}
_EPS = 1e-5
_LOG_THR = -62 * math.log(2.0)  # flush P entries below 2^-62 (as the torch path does)


@triton.jit
def _build_half(lp_ptr, lq_ptr, rows, row_ok, codes, stride_n, bit0, NBITS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, LOG_THR: tl.constexpr):
    """P tile [BLOCK_N, BLOCK_C] of the codes ``codes`` over bits bit0 .. bit0 + NBITS - 1 (0 for bad rows)."""
    logp = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for b in range(NBITS):
        lp = tl.load(lp_ptr + rows * stride_n + bit0 + b, mask=row_ok, other=0.0)
        lq = tl.load(lq_ptr + rows * stride_n + bit0 + b, mask=row_ok, other=0.0)
        bit = (codes >> b) & 1
        logp += tl.where(bit[None, :] == 1, lp[:, None], lq[:, None])
    keep = (logp > LOG_THR) & row_ok[:, None]
    return tl.where(keep, tl.exp(logp), 0.0)


@triton.jit
def _pbar_tile(lp_ptr, lq_ptr, n_tokens, stride_n, c1, c2, B1: tl.constexpr, B2: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, LOG_THR: tl.constexpr):
    acc = tl.zeros((BLOCK_1, BLOCK_2), dtype=tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < n_tokens
        p1 = _build_half(lp_ptr, lq_ptr, rows, row_ok, c1, stride_n, 0, B1, BLOCK_N, BLOCK_1, LOG_THR)
        p2 = _build_half(lp_ptr, lq_ptr, rows, row_ok, c2, stride_n, B1, B2, BLOCK_N, BLOCK_2, LOG_THR)
        acc += tl.dot(tl.trans(p1), p2, input_precision="ieee")
    return acc


@triton.jit
def _f_and_fprime(p, MODE: tl.constexpr, EPS: tl.constexpr):
    """Entropy summand f(p) and f'(p): 0 exact (-p log p), 1 vqtorch (clamp), 2 magvit (+eps)."""
    if MODE == 0:
        pos = p > 0
        lg = tl.log(tl.where(pos, p, 1.0))
        return tl.where(pos, -p * lg, 0.0), tl.where(pos, -(lg + 1.0), 0.0)
    elif MODE == 1:
        lg = tl.log(tl.maximum(p, EPS))
        return -p * lg, -lg - tl.where(p >= EPS, 1.0, 0.0)
    else:
        lg = tl.log(p + EPS)
        return -p * lg, -lg - p / (p + EPS)


@triton.jit
def _entropy_fwd_kernel(
    lp_ptr, lq_ptr, part_ptr,  # lp/lq: [N, B] log sigma(+-a); part: [n_tiles, 3] fp32
    n_tokens, stride_n, inv_n,
    B1: tl.constexpr, B2: tl.constexpr,  # bits per half (constexpr: unrolled bit loops)
    MODE: tl.constexpr, EPS: tl.constexpr, LOG_THR: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per step of the N loop
    BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,  # tile of codes per half (>= 16 for tl.dot)
):
    i, j = tl.program_id(0), tl.program_id(1)
    c1 = i * BLOCK_1 + tl.arange(0, BLOCK_1)
    c2 = j * BLOCK_2 + tl.arange(0, BLOCK_2)
    pbar = _pbar_tile(lp_ptr, lq_ptr, n_tokens, stride_n, c1, c2, B1, B2, BLOCK_N, BLOCK_1, BLOCK_2, LOG_THR) * inv_n
    valid = (c1[:, None] < (1 << B1)) & (c2[None, :] < (1 << B2))
    pbar = tl.where(valid, pbar, 0.0)
    f, fp = _f_and_fprime(pbar, MODE, EPS)
    tile = i * tl.num_programs(1) + j
    tl.store(part_ptr + tile * 3 + 0, tl.sum(tl.sum(tl.where(valid, f, 0.0), 1), 0))
    tl.store(part_ptr + tile * 3 + 1, tl.sum(tl.sum(pbar * fp, 1), 0))
    tl.store(part_ptr + tile * 3 + 2, tl.sum(tl.sum(pbar, 1), 0))


@triton.jit
def _bits_tile(codes, BPAD: tl.constexpr, NBITS: tl.constexpr):
    """[BLOCK_C, BPAD] fp32: bit b of each code (0 for b >= NBITS)."""
    b = tl.arange(0, BPAD)
    bits = (codes[:, None] >> b[None, :]) & 1
    return tl.where(b[None, :] < NBITS, bits, 0).to(tl.float32)


@triton.jit
def _entropy_bwd_kernel(
    lp_ptr, lq_ptr, t_ptr, s_ptr,  # t: [n_grad, B] fp32 zeroed; s: [n_grad, 2] fp32 zeroed
    n_tokens, stride_n, inv_n, g_scale, shift,
    grad_row0, n_grad,  # gradients for rows grad_row0 .. grad_row0 + n_grad - 1 (this rank's tokens)
    B1: tl.constexpr, B2: tl.constexpr, BPAD: tl.constexpr,  # BPAD: pow2 >= max(B1, B2, 16)
    MODE: tl.constexpr, EPS: tl.constexpr, LOG_THR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,
):
    i, j = tl.program_id(0), tl.program_id(1)
    c1 = i * BLOCK_1 + tl.arange(0, BLOCK_1)
    c2 = j * BLOCK_2 + tl.arange(0, BLOCK_2)
    pbar = _pbar_tile(lp_ptr, lq_ptr, n_tokens, stride_n, c1, c2, B1, B2, BLOCK_N, BLOCK_1, BLOCK_2, LOG_THR) * inv_n
    valid = (c1[:, None] < (1 << B1)) & (c2[None, :] < (1 << B2))
    _, fp = _f_and_fprime(tl.where(valid, pbar, 0.0), MODE, EPS)
    g = tl.where(valid, (fp - shift) * g_scale, 0.0)  # [BLOCK_1, BLOCK_2]
    bits1, bits2 = _bits_tile(c1, BPAD, B1), _bits_tile(c2, BPAD, B2)
    col = tl.arange(0, BPAD)
    for n0 in range(0, n_grad, BLOCK_N):
        out_rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = out_rows < n_grad
        rows = out_rows + grad_row0
        p1 = _build_half(lp_ptr, lq_ptr, rows, row_ok, c1, stride_n, 0, B1, BLOCK_N, BLOCK_1, LOG_THR)
        p2 = _build_half(lp_ptr, lq_ptr, rows, row_ok, c2, stride_n, B1, B2, BLOCK_N, BLOCK_2, LOG_THR)
        rows = out_rows
        w1 = tl.dot(p2, tl.trans(g), input_precision="ieee") * p1  # [BLOCK_N, BLOCK_1]
        w2 = tl.dot(p1, g, input_precision="ieee") * p2  # [BLOCK_N, BLOCK_2]
        t1 = tl.dot(w1, bits1, input_precision="ieee")  # [BLOCK_N, BPAD]
        t2 = tl.dot(w2, bits2, input_precision="ieee")
        tl.atomic_add(t_ptr + rows[:, None] * stride_n + col[None, :], t1, mask=row_ok[:, None] & (col[None, :] < B1))
        tl.atomic_add(t_ptr + rows[:, None] * stride_n + B1 + col[None, :], t2,
                      mask=row_ok[:, None] & (col[None, :] < B2))
        tl.atomic_add(s_ptr + rows * 2, tl.sum(w1, 1), mask=row_ok)
        tl.atomic_add(s_ptr + rows * 2 + 1, tl.sum(w2, 1), mask=row_ok)


def _launch_cfg(b1: int, b2: int):
    block_1 = min(64, max(16, 1 << b1))
    block_2 = min(64, max(16, 1 << b2))
    grid = (triton.cdiv(1 << b1, block_1), triton.cdiv(1 << b2, block_2))
    bpad = max(16, triton.next_power_of_2(max(b1, b2, 1)))
    return block_1, block_2, grid, bpad


def _gather_rows(t: torch.Tensor, dist_info) -> tuple[torch.Tensor, int]:
    """All ranks' rows of t [n_local, B] concatenated in rank order, and this rank's first row."""
    import torch.distributed as dist

    group, world = dist_info
    counts = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    sizes = [int(c.item()) for c in all_counts]
    padded = t.new_zeros(max(sizes), t.shape[1])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([p[:m] for p, m in zip(parts, sizes)]), sum(sizes[:rank])


class _CodebookEntropyFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b1, mode, dist_info):
        a32 = a.detach().to(torch.float32).contiguous()
        n_local, bits = a32.shape
        b2 = bits - b1
        row0 = 0
        a_all = a32
        if dist_info is not None:  # every rank computes the global pbar tiles from all ranks' logits
            a_all, row0 = _gather_rows(a32, dist_info)
        n = a_all.shape[0]
        lp, lq = torch.nn.functional.logsigmoid(a_all), torch.nn.functional.logsigmoid(-a_all)
        block_1, block_2, grid, _ = _launch_cfg(b1, b2)
        part = torch.empty(grid[0] * grid[1], 3, dtype=torch.float32, device=a.device)
        _entropy_fwd_kernel[grid](
            lp, lq, part, n, bits, 1.0 / n, B1=b1, B2=b2, MODE=_MODES[mode], EPS=_EPS, LOG_THR=_LOG_THR,
            BLOCK_N=32, BLOCK_1=block_1, BLOCK_2=block_2,
        )
        tot = part.to(torch.float64).sum(0)
        ctx.save_for_backward(a32, lp, lq)
        ctx.b1, ctx.mode, ctx.in_dtype, ctx.row0 = b1, mode, a.dtype, row0
        ctx.world = dist_info[1] if dist_info is not None else 1
        ctx.shift = float(tot[1] / tot[2]) if float(tot[2]) > 0 else 0.0
        return tot[0].to(a.dtype)

    @staticmethod
    def backward(ctx, gh):
        a32, lp, lq = ctx.saved_tensors
        n_local, bits = a32.shape
        n = lp.shape[0]
        b1, b2 = ctx.b1, bits - ctx.b1
        block_1, block_2, grid, bpad = _launch_cfg(b1, b2)
        t = torch.zeros(n_local, bits, dtype=torch.float32, device=a32.device)
        s = torch.zeros(n_local, 2, dtype=torch.float32, device=a32.device)
        if n_local:
            _entropy_bwd_kernel[grid](
                lp, lq, t, s, n, bits, 1.0 / n, float(gh) * ctx.world / n, ctx.shift, ctx.row0, n_local,
                B1=b1, B2=b2, BPAD=bpad, MODE=_MODES[ctx.mode], EPS=_EPS, LOG_THR=_LOG_THR,
                BLOCK_N=32, BLOCK_1=block_1, BLOCK_2=block_2,
            )
        half = torch.cat([s[:, :1].expand(n_local, b1), s[:, 1:].expand(n_local, b2)], 1)
        grad = t - torch.sigmoid(a32) * half
        return grad.to(ctx.in_dtype), None, None, None


def codebook_entropy_fused(a: torch.Tensor, b1: int, mode: str, dist_info=None) -> torch.Tensor:
    """H(pbar) for bit logits a [N, B] (a = 4 s z / tau), differentiable; pbar is never materialised.

    With ``dist_info = (group, world)`` the logits of all ranks are all-gathered (N_global x B floats)
    and every rank evaluates the global pbar tiles; its gradient covers its own rows, scaled by
    world_size (the DDP mean convention of ``vqtok.ops.lfq_entropy``).
    """
    return _CodebookEntropyFused.apply(a, b1, mode, dist_info)
