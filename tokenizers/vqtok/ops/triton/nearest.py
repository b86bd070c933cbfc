"""Triton nearest-code search, flash-attention style, with a certified exact answer.

One program owns BLOCK_N rows of x [N, D] and streams the codebook [K, D] in BLOCK_K tiles
(``tl.dot`` with fp32 accumulation), keeping per row a sorted list of the TOPK smallest scores
``s_k = |c_k|^2 - 2 x.c_k`` (ties: lowest index; tiles merge in ascending order, no atomics) and
``evicted``, the smallest score it dropped. Scores are never clamped.

* ``precision="exact"``: fp32 operands (``input_precision="ieee"``), TOPK=1, so evicted is the
  second-best score.
* ``precision="fast"``: bf16 tensor-core dot products, fp32 accumulation. For D <= 64 the search is
  bound by the per-pair epilogue, not the GEMM, so operands are split in two bf16 terms
  (hi + lo, three MMAs: ~2^-16 relative error) and TOPK=2; above, one bf16 MMA (2^-8) and TOPK=4.
  Rounding to bf16 is done with integer ops (round to nearest even), so the interpreter and the
  GPU agree bit for bit.

Then one small kernel re-scores the kept candidates in float64 (direct form ``sum((x - c)^2)``
for the returned distance) and :mod:`._certify` decides which rows are proven; the rest are
re-decided exactly (fast -> exact kernel on those rows -> ``ops.reference`` on what remains), so
both modes return the float64 oracle's answer. Small N with large K uses a split-K grid whose
partial lists are merged by a second reduction kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import reference as ref
from . import _certify

_BIG = 2**31 - 1  # index sentinel of an empty candidate slot


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _round_bf16(v):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32; exact integer arithmetic."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_bf16(a, b, INTERPRET: tl.constexpr):
    """a [M, R] @ b [R, N] of bf16-representable fp32 values, fp32 accumulation."""
    if INTERPRET:  # bf16 tl.dot is wrong in the interpreter; bf16 products are exact in fp32
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _merge_topk(run_v, run_i, evicted, s, sidx, TOPK: tl.constexpr):
    """Merge a tile of scores s [BN, W] (indices sidx [BN, W]) into the sorted lists
    run_v/run_i [BN, TOPK]; order is (score, index). Returns (run_v, run_i, evicted)."""
    cols = tl.arange(0, TOPK)[None, :]
    new_v = tl.full(run_v.shape, float("inf"), tl.float32)
    new_i = tl.full(run_i.shape, 2147483647, tl.int32)
    p = tl.zeros([run_v.shape[0]], dtype=tl.int32)  # next unused entry of the running list
    for t in tl.static_range(TOPK):
        at_p = cols == p[:, None]
        rv = tl.min(tl.where(at_p, run_v, float("inf")), 1)
        ri = tl.min(tl.where(at_p, run_i, 2147483647), 1)
        tv = tl.min(s, 1)
        ti = tl.min(tl.where(s == tv[:, None], sidx, 2147483647), 1)  # lowest index among ties
        take_run = (rv < tv) | ((rv == tv) & (ri < ti))
        v = tl.where(take_run, rv, tv)
        i = tl.where(v < float("inf"), tl.where(take_run, ri, ti), 2147483647)  # empty slot
        new_v = tl.where(cols == t, v[:, None], new_v)
        new_i = tl.where(cols == t, i[:, None], new_i)
        p += take_run.to(tl.int32)
        s = tl.where((sidx == ti[:, None]) & (~take_run)[:, None], float("inf"), s)
    left_run = tl.min(tl.where(cols >= p[:, None], run_v, float("inf")), 1)
    evicted = tl.minimum(evicted, tl.minimum(left_run, tl.min(s, 1)))
    return new_v, new_i, evicted


@triton.jit
def _search_kernel(
    x_ptr, c_ptr, cn_ptr, out_v_ptr, out_i_ptr, out_e_ptr,
    N, K, D, k_per_split,
    stride_xn, stride_xd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr,  # rows per program (the MMA's M)
    BLOCK_K: tl.constexpr,  # codes per streamed tile (the MMA's N)
    BLOCK_D: tl.constexpr,  # feature chunk (the MMA's K), >= 16; D is padded and masked
    TOPK: tl.constexpr,  # candidates kept per row (1 for exact, a few for fast)
    MODE: tl.constexpr,  # dot operands: 0 fp32 (exact), 1 bf16, 2 bf16x3 (hi/lo split)
    INTERPRET: tl.constexpr,  # CPU interpreter: bf16 tl.dot is wrong there, so emulate it in fp32
):
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(N, BLOCK_N)
    # L2-aware order: consecutive programs share one K split, so the codebook slice they stream
    # at the same time is fetched from HBM once per wave instead of once per program.
    split = pid // n_row_tiles
    rows = (pid % n_row_tiles).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    dd = tl.arange(0, BLOCK_D)

    run_v = tl.full([BLOCK_N, TOPK], float("inf"), tl.float32)
    run_i = tl.full([BLOCK_N, TOPK], 2147483647, tl.int32)
    evicted = tl.full([BLOCK_N], float("inf"), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + dd) < D
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xn + (d0 + dd)[None, :].to(tl.int64) * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)
            ct = tl.load(  # [BLOCK_D, BLOCK_K]: the codebook tile, transposed by addressing
                c_ptr + kk[None, :].to(tl.int64) * stride_ck + (d0 + dd)[:, None].to(tl.int64) * stride_cd,
                mask=k_ok[None, :] & d_ok[:, None], other=0.0,
            ).to(tl.float32)
            if MODE == 0:
                acc += tl.dot(xt, ct, input_precision="ieee")
            else:
                xh = _round_bf16(xt)
                ch = _round_bf16(ct)
                acc += _dot_bf16(xh, ch, INTERPRET)
                if MODE == 2:  # the residuals x - x_hi are exact in fp32
                    xl = _round_bf16(xt - xh)
                    cl = _round_bf16(ct - ch)
                    acc += _dot_bf16(xh, cl, INTERPRET) + _dot_bf16(xl, ch, INTERPRET)
        cn = tl.load(cn_ptr + kk, mask=k_ok, other=0.0)
        s = tl.where(k_ok[None, :], cn[None, :] - 2.0 * acc, float("inf"))
        tile_min = tl.min(s, 1)
        thr = tl.max(run_v, 1)  # the TOPK-th kept score (lists are sorted)
        if tl.max((tile_min < thr).to(tl.int32), 0) > 0:
            sidx = kk[None, :] + tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
            run_v, run_i, evicted = _merge_topk(run_v, run_i, evicted, s, sidx, TOPK)
        else:  # no row can improve its list: later indices lose ties, so all of it is evicted
            evicted = tl.minimum(evicted, tile_min)

    cols = tl.arange(0, TOPK)[None, :]
    base = split.to(tl.int64) * N + rows
    tl.store(out_v_ptr + base[:, None] * TOPK + cols, run_v, mask=row_ok[:, None])
    tl.store(out_i_ptr + base[:, None] * TOPK + cols, run_i, mask=row_ok[:, None])
    tl.store(out_e_ptr + base, evicted, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    v_ptr, i_ptr, e_ptr, out_v_ptr, out_i_ptr, out_e_ptr,
    N, S,
    BLOCK_N: tl.constexpr,  # rows per program
    TOPK: tl.constexpr,  # list length, as in _search_kernel
):
    """Second (value, index) reduction of split-K: merge S partial lists in ascending split order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, TOPK)[None, :]
    run_v = tl.full([BLOCK_N, TOPK], float("inf"), tl.float32)
    run_i = tl.full([BLOCK_N, TOPK], 2147483647, tl.int32)
    evicted = tl.full([BLOCK_N], float("inf"), tl.float32)
    for sp in range(0, S):
        base = (rows * 0 + sp) * N + rows  # int64: S * N may pass 2^31
        pv = tl.load(v_ptr + base[:, None] * TOPK + cols, mask=row_ok[:, None], other=float("inf"))
        pi = tl.load(i_ptr + base[:, None] * TOPK + cols, mask=row_ok[:, None], other=2147483647)
        evicted = tl.minimum(evicted, tl.load(e_ptr + base, mask=row_ok, other=float("inf")))
        run_v, run_i, evicted = _merge_topk(run_v, run_i, evicted, pv, pi, TOPK)
    tl.store(out_v_ptr + rows[:, None] * TOPK + cols, run_v, mask=row_ok[:, None])
    tl.store(out_i_ptr + rows[:, None] * TOPK + cols, run_i, mask=row_ok[:, None])
    tl.store(out_e_ptr + rows, evicted, mask=row_ok)


@triton.jit
def _rescore_kernel(
    x_ptr, c_ptr, cand_ptr, out_i_ptr, out_d_ptr, out_s_ptr, out_gap_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # feature chunk
    TOPK: tl.constexpr,  # candidates per row in cand [N, TOPK]
):
    """float64 re-scoring of the kept candidates: the winner by direct form sum((x - c)^2)
    (ties: lowest index), its distance, the smallest float64 score |c|^2 - 2 x.c among the
    candidates, and the direct-form gap to the runner-up (inf with one candidate)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dd = tl.arange(0, BLOCK_D)
    best_d = tl.full([BLOCK_N], float("inf"), tl.float64)
    second_d = tl.full([BLOCK_N], float("inf"), tl.float64)
    best_i = tl.full([BLOCK_N], 2147483647, tl.int32)
    best_s = tl.full([BLOCK_N], float("inf"), tl.float64)
    for t in tl.static_range(TOPK):
        ci = tl.load(cand_ptr + rows * TOPK + t, mask=row_ok, other=2147483647)
        ok = row_ok & (ci >= 0) & (ci < K)
        dist = tl.zeros([BLOCK_N], dtype=tl.float64)
        cn = tl.zeros([BLOCK_N], dtype=tl.float64)
        dot = tl.zeros([BLOCK_N], dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            m = ok[:, None] & ((d0 + dd) < D)[None, :]
            xv = tl.load(x_ptr + rows[:, None] * stride_xn + (d0 + dd)[None, :].to(tl.int64) * stride_xd,
                         mask=m, other=0.0).to(tl.float64)
            cv = tl.load(c_ptr + ci[:, None].to(tl.int64) * stride_ck + (d0 + dd)[None, :].to(tl.int64) * stride_cd,
                         mask=m, other=0.0).to(tl.float64)
            diff = xv - cv
            dist += tl.sum(diff * diff, 1)
            cn += tl.sum(cv * cv, 1)
            dot += tl.sum(xv * cv, 1)
        dist = tl.where(ok, dist, float("inf"))
        better = ok & ((dist < best_d) | ((dist == best_d) & (ci < best_i)))
        second_d = tl.where(better, best_d, tl.minimum(second_d, dist))
        best_d = tl.where(better, dist, best_d)
        best_i = tl.where(better, ci, best_i)
        best_s = tl.minimum(best_s, tl.where(ok, cn - 2.0 * dot, float("inf")))
    tl.store(out_i_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    tl.store(out_d_ptr + rows, best_d.to(tl.float32), mask=row_ok)
    tl.store(out_s_ptr + rows, best_s, mask=row_ok)
    gap = second_d - tl.where(best_d < float("inf"), best_d, 0.0)  # inf with one candidate
    tl.store(out_gap_ptr + rows, gap, mask=row_ok)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
def autotune_configs(n: int, k: int, d: int) -> list[triton.Config]:
    """GPU configs for (N, K, D): wide code tiles for small D (epilogue-bound), deeper pipelines
    for large D (GEMM-bound); BLOCK_N never far above N."""
    out = []
    for bn in (64, 128):
        if bn > max(64, triton.next_power_of_2(n)):
            continue
        for bk in (64, 128, 256):
            if bk > max(64, triton.next_power_of_2(k)) or (d >= 128 and bk == 256):
                continue
            for warps, stages in ((4, 2), (4, 3), (8, 3), (8, 4)):
                out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


_TUNED: dict[tuple, object] = {}


def _tuned_search_kernel(n: int, k: int, d: int):
    """_search_kernel autotuned over autotune_configs(N, K, D); one tuner per (N, K) power-of-two
    bucket and D, so the config list always fits the shape (GPU only: never under the interpreter)."""
    key = (triton.next_power_of_2(n), triton.next_power_of_2(k), d)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=autotune_configs(n, k, d), key=["N", "K", "D", "TOPK", "MODE"])(
            _search_kernel
        )
    return _TUNED[key]


def _pick_blocks(n, k, d, block_n, block_k):
    """(BLOCK_N, BLOCK_K) when not autotuning: large tiles for the interpreter (~2 ms per op)."""
    if _interpreting():
        bn = block_n or min(128, max(16, triton.next_power_of_2(n)))
        bk = block_k or min(1024, max(16, triton.next_power_of_2(k)))
    else:
        bn, bk = block_n or 64, block_k or 128
    return bn, bk


def _block_d(d: int) -> int:
    cap = 256 if _interpreting() else 64
    return min(cap, max(16, triton.next_power_of_2(d)))


def _split_count(n_row_tiles: int, k: int, bk: int, split_k: int | None, device: torch.device) -> int:
    """Split-K factor: enough programs for ~2 waves when N alone gives too few (small N, large K)."""
    if split_k is not None:
        return max(1, min(split_k, triton.cdiv(k, bk)))
    if _interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, n_row_tiles)
    return max(1, min(want, k // (8 * bk)))


def _launch_search(x, c, cn, topk, mode, block_n, block_k, split_k):
    """Run the search (and the split reduction); returns (cand_v [N,T], cand_i [N,T], evicted [N])."""
    n, d = x.shape
    k = c.shape[0]
    bn, bk = _pick_blocks(n, k, d, block_n, block_k)
    dev = x.device
    splits = _split_count(triton.cdiv(n, bn), k, bk, split_k, dev)
    k_per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per)
    out_v = torch.empty(splits, n, topk, dtype=torch.float32, device=dev)
    out_i = torch.empty(splits, n, topk, dtype=torch.int32, device=dev)
    out_e = torch.empty(splits, n, dtype=torch.float32, device=dev)
    args = (x, c, cn, out_v, out_i, out_e, n, k, d, k_per, x.stride(0), x.stride(1), c.stride(0), c.stride(1))
    meta = dict(BLOCK_D=_block_d(d), TOPK=topk, MODE=mode, INTERPRET=_interpreting())
    if _interpreting() or block_n or block_k:  # fixed launch shape
        _search_kernel[(triton.cdiv(n, bn) * splits,)](*args, BLOCK_N=bn, BLOCK_K=bk, **meta)
    else:  # the grid follows the tuned BLOCK_N; k_per need not be a multiple of BLOCK_K (masked)
        grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]) * splits,)  # noqa: E731
        _tuned_search_kernel(n, k, d)[grid](*args, **meta)
    if splits == 1:
        return out_v[0], out_i[0], out_e[0]
    v = torch.empty(n, topk, dtype=torch.float32, device=dev)
    i = torch.empty(n, topk, dtype=torch.int32, device=dev)
    e = torch.empty(n, dtype=torch.float32, device=dev)
    rb = 128 if _interpreting() else 64
    _merge_splits_kernel[(triton.cdiv(n, rb),)](out_v, out_i, out_e, v, i, e, n, splits, BLOCK_N=rb, TOPK=topk)
    return v, i, e


def _rescore(x, c, cand_i, topk):
    n, d = x.shape
    dev = x.device
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    dist = torch.empty(n, dtype=torch.float32, device=dev)
    score = torch.empty(n, dtype=torch.float64, device=dev)
    gap = torch.empty(n, dtype=torch.float64, device=dev)
    rb = 128 if _interpreting() else 32
    _rescore_kernel[(triton.cdiv(n, rb),)](
        x, c, cand_i, idx, dist, score, gap, n, c.shape[0], d,
        x.stride(0), x.stride(1), c.stride(0), c.stride(1),
        BLOCK_N=rb, BLOCK_D=_block_d(d), TOPK=topk,
    )
    return idx, dist, score, gap


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def search(
    x: torch.Tensor,
    codebook: torch.Tensor,
    precision: str = "exact",
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    topk: int | None = None,
    operands: str | None = None,
    stats: dict | None = None,
):
    """Certified nearest code. x [N, D], codebook [K, D] (same dtype, any strides) ->
    (int64 [N], float32 [N]); identical to ``ops.reference.nearest_code_l2``'s indices.

    block_n/block_k/split_k/topk override the launch shape (tests use them to force the
    multi-tile and split-K paths); ``operands`` ("fp32" | "bf16" | "bf16x3") overrides how the fast
    mode forms its dot products; ``stats`` (a dict) receives how many rows were re-decided.
    """
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    n, d = x.shape
    fast = precision == "fast"
    operands = operands or ("fp32" if not fast else "bf16x3" if d <= 64 else "bf16")
    if operands not in _certify.OPERANDS:
        raise ValueError(f"operands must be one of {_certify.OPERANDS}, got {operands!r}")
    t = topk or {"fp32": 1, "bf16x3": 2, "bf16": 4}[operands]
    if t & (t - 1):
        raise ValueError(f"topk must be a power of two, got {t}")
    cn = codebook.to(torch.float32).square().sum(1)  # [K] fp32 norms, error gamma_D |c|^2
    mode = _certify.OPERANDS.index(operands)
    _, cand_i, evicted = _launch_search(x, codebook, cn, t, mode, block_n, block_k, split_k)
    idx, dist, score64, gap = _rescore(x, codebook, cand_i, t)
    err, e64 = _certify.row_bounds(x, cn, operands, inputs_bf16=x.dtype == torch.bfloat16)
    ok = _certify.certified(evicted, score64, err, e64) & (gap > e64)
    redo = (~ok).nonzero().squeeze(1)
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + n
        stats[f"redo_{precision}"] = stats.get(f"redo_{precision}", 0) + int(redo.numel())
    if redo.numel():
        xr = x.index_select(0, redo)
        if fast:
            ri, rd = search(xr, codebook, "exact", block_n=block_n, block_k=block_k, split_k=split_k, stats=stats)
        else:
            ri, rd = ref.nearest_code_l2(xr, codebook)
        idx[redo] = ri
        dist[redo] = rd
    return idx, dist
