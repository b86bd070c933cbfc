"""lfq_entropy: exact against dense float64 softmaxes, invariances, peers' formulas, DDP, Triton."""

import math
import os
import socket

import pytest
import torch

from vqtok.ops import lfq_entropy
from vqtok.ops.lfq_entropy import half_probs, half_probs_t


def dense_probs(z: torch.Tensor, tau: float = 1.0, s: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Independent oracle: the full N x 2^B softmax of 2 z.c / tau over codes c in {-s, s}^B."""
    z = z.to(dtype).reshape(-1, z.shape[-1])
    bits = z.shape[1]
    codes = (((torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1).to(dtype) * 2 - 1) * s
    return torch.softmax(2 * z @ codes.t() / tau, -1)


def dense_entropy(z, tau=1.0, s=1.0, f=lambda p: -torch.special.xlogy(p, p), dtype=torch.float64):
    p = dense_probs(z, tau, s, dtype)
    return f(p).sum(-1).mean(), f(p.mean(0)).sum()


def plain_fp32_grad_error(z64, grad64, fn):
    """Max |grad error| of plain torch autograd of ``fn`` in fp32: the yardstick for fp32 tolerances."""
    z32 = z64.float().requires_grad_()
    fn(z32).backward()
    err = (z32.grad.double() - grad64).abs().max().item()
    return 0.0 if math.isnan(err) else err  # plain xlogy has NaN gradients where p underflows to 0


def chunked_pbar64(z: torch.Tensor, tau: float, b1: int, chunk: int = 256) -> torch.Tensor:
    """float64 pbar [2^B1, 2^B2] from exp(sum of log-sigmoids) per half; independent of the op's code."""
    z = z.double()
    a = 4 * z / tau
    bits = z.shape[1]

    def half(ah):
        k = ah.shape[1]
        bm = ((torch.arange(2**k)[:, None] >> torch.arange(k)) & 1).double()
        return torch.exp(torch.nn.functional.logsigmoid(-ah).sum(1, keepdim=True) + ah @ bm.t())

    acc = torch.zeros(2**b1, 2 ** (bits - b1), dtype=torch.float64)
    for r in range(0, z.shape[0], chunk):
        acc += half(a[r : r + chunk, :b1]).t() @ half(a[r : r + chunk, b1:])
    return acc / z.shape[0]


def _rel(a, b):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / max(abs(b), 1e-300)


# ------------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,n,tau,s", [(1, 50, 1.0, 1.0), (3, 257, 0.5, 1.0), (7, 300, 0.3, 1.0), (14, 67, 1.0, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense_softmax(bits, n, tau, s, dtype):
    z = torch.randn(n, bits, dtype=torch.float64)
    zr = z.to(dtype).detach().clone().requires_grad_()
    ps, cb = lfq_entropy(zr, temperature=tau, scale=s, chunk=29)
    assert ps.dtype == cb.dtype == dtype
    zd = z.clone().requires_grad_()
    rps, rcb = dense_entropy(zd, tau, s)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert _rel(ps, rps) < tol and _rel(cb, rcb) < tol
    (0.3 * ps - cb).backward()
    (0.3 * rps - rcb).backward()
    err = (zr.grad.double() - zd.grad).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-10 * zd.grad.abs().max().item()
    else:  # at most 2x the error of the plain fp32 dense softmax (ours is usually far below it)
        loss = lambda t: (lambda r: 0.3 * r[0] - r[1])(dense_entropy(t, tau, s, dtype=torch.float32))  # noqa: E731
        assert err <= 2 * plain_fp32_grad_error(z, zd.grad, loss) + 2e-6 * zd.grad.abs().max().item()


def test_gradcheck_float64():
    z = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    for mode in ("exact", "magvit", "vqtorch"):
        zz = (z * 0.3).detach().requires_grad_() if mode == "vqtorch" else z  # keep p away from the clamp kink
        assert torch.autograd.gradcheck(
            lambda t: lfq_entropy(t, temperature=0.8, split=2, chunk=4, eps_mode=mode), (zz,)
        )


def test_bits18_against_chunked_float64_pbar():
    bits, n, tau = 18, 600, 0.5
    z = torch.randn(n, bits)
    zr = z.clone().requires_grad_()
    _, cb = lfq_entropy(zr, temperature=tau, chunk=128)
    pbar = chunked_pbar64(z, tau, 9)
    assert abs(pbar.sum().item() - 1) < 1e-12
    assert _rel(cb, -torch.special.xlogy(pbar, pbar).sum()) < 1e-6
    # gradient: autograd through the float64 oracle on a 300-token slice (P1, P2 are 300 x 512)
    zs = z[:300].double().requires_grad_()
    p = chunked_pbar64(zs, tau, 9, chunk=300)
    (-torch.special.xlogy(p, p).sum()).backward()
    zr2 = z[:300].clone().requires_grad_()
    lfq_entropy(zr2, temperature=tau, chunk=77)[1].backward()
    err = (zr2.grad.double() - zs.grad).abs().max().item()
    assert err <= 2 * plain_fp32_grad_error(z[:300].double(), zs.grad, lambda t: _neg_ent32(t, tau)) + 1e-9


def _neg_ent32(t, tau):
    """-H(pbar) with the oracle's construction in fp32 (plain torch autograd)."""
    a = 4 * t / tau
    halves = []
    for ah in (a[:, :9], a[:, 9:]):
        bm = ((torch.arange(2**9)[:, None] >> torch.arange(9)) & 1).float()
        halves.append(torch.exp(torch.nn.functional.logsigmoid(-ah).sum(1, keepdim=True) + ah @ bm.t()))
    p = halves[0].t() @ halves[1] / t.shape[0]
    return -torch.special.xlogy(p, p).sum()


def test_bsq_scale_and_half_probs_order():
    bits = 6
    z = torch.nn.functional.normalize(torch.randn(80, bits, dtype=torch.float64), dim=-1)
    ps, cb = lfq_entropy(z, temperature=0.05, scale=1 / math.sqrt(bits))
    rps, rcb = dense_entropy(z, 0.05, 1 / math.sqrt(bits))
    assert _rel(ps, rps) < 1e-12 and _rel(cb, rcb) < 1e-12
    # LSB-first: P1 P2 combined index c1 + 2^B1 c2 equals the dense code index
    a = 4 * z / 0.05 / math.sqrt(bits)
    p = (half_probs(a[:, :2])[:, :, None] * half_probs(a[:, 2:])[:, None, :]).transpose(1, 2).reshape(80, -1)
    torch.testing.assert_close(p, dense_probs(z, 0.05, 1 / math.sqrt(bits)), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(half_probs_t(a[:, 2:]), half_probs(a[:, 2:]).t(), rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------------
# invariances, edge cases, errors
# ------------------------------------------------------------------------------------------------
def test_invariant_to_split_chunk_and_bit_permutation():
    z = torch.randn(3, 41, 7, dtype=torch.float64)
    ref = lfq_entropy(z, temperature=0.6)
    for split in range(8):
        for chunk in (1, 16, 1000):
            out = lfq_entropy(z, temperature=0.6, split=split, chunk=chunk)
            assert _rel(out[0], ref[0]) < 1e-13 and _rel(out[1], ref[1]) < 1e-13
    perm = torch.randperm(7)
    out = lfq_entropy(z[..., perm], temperature=0.6)
    assert _rel(out[0], ref[0]) < 1e-13 and _rel(out[1], ref[1]) < 1e-13
    # gradients permute with the bits
    za, zb = z.clone().requires_grad_(), z[..., perm].clone().requires_grad_()
    sum(lfq_entropy(za, temperature=0.6, split=2)).backward()
    sum(lfq_entropy(zb, temperature=0.6, split=5)).backward()
    torch.testing.assert_close(za.grad[..., perm], zb.grad, rtol=1e-10, atol=1e-14)


def test_backward_reuses_the_forward_products_bit_for_bit():
    """One chunk of tokens: pbar_sum hands its P1^T, P2^T to pbar_backward, whose gradient is then
    the one it computes by building them again, bit for bit; several chunks build them again."""
    from vqtok.ops.lfq_entropy import pbar_backward, pbar_sum

    a = torch.randn(300, 10, generator=torch.Generator().manual_seed(5)) * 3
    g = torch.randn(32, 32, generator=torch.Generator().manual_seed(6))
    acc, pts = pbar_sum(a, 5, 512)
    assert pts is not None and pbar_sum(a, 5, 100)[1] is None
    torch.testing.assert_close(acc, pbar_sum(a, 5, 100)[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(pbar_backward(a, 5, 512, g, pts), pbar_backward(a, 5, 512, g))
    torch.testing.assert_close(pbar_backward(a, 5, 512, g), pbar_backward(a, 5, 64, g), rtol=1e-5, atol=1e-6)


def test_saturated_codes_no_nan():
    """pbar == 0 for most codes (0 log 0 = 0), sigmoid saturates to exactly 0/1."""
    z = torch.sign(torch.randn(64, 12)) * 50
    z[:, 0] = 0.0  # one bit undecided: half the tokens' mass on two codes
    zr = z.clone().requires_grad_()
    ps, cb = lfq_entropy(zr, temperature=0.01)
    assert torch.isfinite(ps) and torch.isfinite(cb)
    rps, rcb = dense_entropy(z, 0.01)
    assert abs(ps.item() - rps.item()) < 1e-6 and _rel(cb, rcb) < 1e-6
    (ps - cb).backward()
    assert torch.isfinite(zr.grad).all()
    for mode in ("vqtorch", "magvit"):
        assert all(torch.isfinite(v) for v in lfq_entropy(z, temperature=0.01, eps_mode=mode))


def test_uniform_usage_exact_mode_does_not_clamp():
    """z = 0: every token is uniform over 2^18 codes, pbar = 2^-18 < 1e-5. Exact gives 18 ln 2; the
    peers' clamp gives ln(1e5) for both terms."""
    bits = 18
    z = torch.zeros(8, bits)
    ps, cb = lfq_entropy(z, temperature=0.1)
    assert _rel(ps, bits * math.log(2)) < 1e-6 and _rel(cb, bits * math.log(2)) < 1e-6
    ps_v, cb_v = lfq_entropy(z, eps_mode="vqtorch")
    assert _rel(cb_v, math.log(1e5)) < 1e-6 and _rel(ps_v, math.log(1e5)) < 1e-6


def test_low_precision_inputs_and_shapes():
    z = torch.randn(2, 3, 5, 8)
    ref = lfq_entropy(z)
    for dt in (torch.bfloat16, torch.float16):
        out = lfq_entropy(z.to(dt))
        assert out[0].dtype == torch.float32
        exp = lfq_entropy(z.to(dt).float())
        assert out[0].item() == exp[0].item() and out[1].item() == exp[1].item()
    assert _rel(ref[1], dense_entropy(z)[1]) < 1e-6


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"eps_mode": "clamp"}, ValueError, "eps_mode"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"scale": -1.0}, ValueError, "scale"),
        ({"split": 9}, ValueError, "split"),
        ({"chunk": 0}, ValueError, "chunk"),
        ({"backend": "faiss"}, ValueError, "backend"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        lfq_entropy(torch.randn(4, 8), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="z must be a floating-point"):
        lfq_entropy(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="no tokens"):
        lfq_entropy(torch.randn(0, 8))
    with pytest.raises(ValueError, match="non-finite"):
        lfq_entropy(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="too large for the torch path"):
        lfq_entropy(torch.randn(2, 27), backend="torch")


# ------------------------------------------------------------------------------------------------
# peers' formulas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,inv_t,s", [(6, 100.0, 1.0), (10, 10.0, 1.0), (12, 30.0, 0.5)])
def test_vqtorch_mode_matches_vector_quantize_pytorch(bits, inv_t, s):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    lfq = vqp.LFQ(dim=bits, entropy_loss_weight=0.1, codebook_scale=s).train()
    x = torch.randn(2, 150, bits)
    xr = x.clone().requires_grad_()
    _, br = lfq(xr, inv_temperature=inv_t, return_loss_breakdown=True)
    (0.7 * br.per_sample_entropy - br.batch_entropy).backward()
    zr = x.clone().requires_grad_()
    ps, cb = lfq_entropy(zr, temperature=1 / inv_t, scale=s, eps_mode="vqtorch", chunk=61)
    (0.7 * ps - cb).backward()
    assert _rel(ps, br.per_sample_entropy) < 5e-6 and _rel(cb, br.batch_entropy) < 1e-6
    torch.testing.assert_close(zr.grad, xr.grad, rtol=0, atol=1e-4 * xr.grad.abs().max().item())


def test_magvit_mode_matches_magvit_entropy_loss():
    """MAGVIT's entropy_loss: per-sample with log_softmax(logits / tau + 1e-5), codebook log(pbar + 1e-5)."""
    z = torch.randn(120, 9, dtype=torch.float64)
    codes = ((torch.arange(2**9)[:, None] >> torch.arange(9)) & 1).double() * 2 - 1
    zr, zd = z.clone().requires_grad_(), z.clone().requires_grad_()
    ps, cb = lfq_entropy(zr, temperature=0.05, eps_mode="magvit")
    logits = 2 * zd @ codes.t()
    probs = torch.softmax(logits / 0.05, -1)
    rps = -(probs * torch.log_softmax(logits / 0.05 + 1e-5, -1)).sum(-1).mean()
    avg = probs.mean(0)
    rcb = -(avg * torch.log(avg + 1e-5)).sum()
    assert _rel(ps, rps) < 1e-12 and _rel(cb, rcb) < 1e-12
    (ps - cb).backward()
    (rps - rcb).backward()
    torch.testing.assert_close(zr.grad, zd.grad, rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Triton fused kernel (interpreter on CPU: tiny sizes)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits,split,n,mode",
    [(6, 3, 37, "exact"), (7, 2, 50, "vqtorch"), (5, 5, 20, "magvit"), (13, 7, 33, "exact"), (4, 0, 9, "exact")],
)
def test_triton_fused_matches_float64(bits, split, n, mode):
    pytest.importorskip("triton")
    from vqtok.ops.dispatch import _supports_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _supports_device("triton", device):
        pytest.skip("triton needs a CUDA device or TRITON_INTERPRET=1")
    z = torch.randn(n, bits, dtype=torch.float64)
    z[0] = 30.0  # saturated token: P entries flushed to 0
    zr = z.float().to(device).requires_grad_()
    ps, cb = lfq_entropy(zr, temperature=0.5, split=split, eps_mode=mode, backend="triton")
    (0.5 * ps - cb).backward()
    zd = z.clone().requires_grad_()
    rps, rcb = lfq_entropy(zd, temperature=0.5, split=split, eps_mode=mode, backend="torch")
    (0.5 * rps - rcb).backward()
    assert _rel(cb.cpu(), rcb) < 1e-6 and _rel(ps.cpu(), rps) < 1e-6
    # gradient error at most 2x that of the fp32 torch path (+ a floor at fp32 resolution)
    z32 = z.float().requires_grad_()
    (lambda r: 0.5 * r[0] - r[1])(lfq_entropy(z32, temperature=0.5, split=split, eps_mode=mode)).backward()
    err32 = (z32.grad.double() - zd.grad).abs().max().item()
    err = (zr.grad.cpu().double() - zd.grad).abs().max().item()
    assert err <= 2 * err32 + 2e-6 * zd.grad.abs().max().item()


# ------------------------------------------------------------------------------------------------
# DDP: global-batch values, world_size x local gradients
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, z, out_dir, configs):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = _ddp_rows(z.shape[0])
        results = {}
        for backend, mode in configs:
            zl = z[rows[rank]].clone().requires_grad_()
            ps, cb = lfq_entropy(zl, temperature=0.4, eps_mode=mode, chunk=16, backend=backend)
            (0.5 * ps - cb).backward()
            results[backend, mode] = (ps.detach(), cb.detach(), zl.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_rows(n):
    return [slice(0, n * 2 // 5), slice(n * 2 // 5, n)]  # uneven local batches


@pytest.mark.ddp
def test_ddp_global_entropy_and_gradients(tmp_path):
    """Two gloo ranks: values equal the single-process ones on the concatenated batch; each rank's
    gradient is world_size x the single-process gradient of its rows. The fused Triton path (run by
    the interpreter here) all-gathers the logits."""
    import torch.multiprocessing as mp

    from vqtok.ops.dispatch import _supports_device

    configs = [("torch", "exact"), ("torch", "vqtorch")]
    if not torch.cuda.is_available() and _supports_device("triton", torch.device("cpu")):
        configs.append(("triton", "exact"))
    world = 2
    z = torch.randn(85, 6, dtype=torch.float64)
    mp.spawn(_ddp_worker, args=(world, _free_port(), z, str(tmp_path), configs), nprocs=world, join=True)
    rows = _ddp_rows(z.shape[0])
    for backend, mode in configs:
        zr = z.clone().requires_grad_()
        ps, cb = lfq_entropy(zr, temperature=0.4, eps_mode=mode)
        (0.5 * ps - cb).backward()
        tol = 1e-12 if backend == "torch" else 1e-6  # the fused kernel computes in fp32
        for rank in range(world):
            rps, rcb, grad = torch.load(tmp_path / f"rank{rank}.pt")[backend, mode]
            assert _rel(rps, ps) < tol and _rel(rcb, cb) < tol
            ref = world * zr.grad[rows[rank]]
            torch.testing.assert_close(grad, ref, rtol=0, atol=2 * tol * ref.abs().max().item())


def test_bench_suite_rows():
    from vqtok.bench.entropy import EntropyBenchConfig, run

    cfg = EntropyBenchConfig(bits=(8,), tokens=(256,), extra_cases=((6, 100),), reps=1, peer_max_dense_gib=1e-6)
    rows = run(cfg=cfg, progress=False)
    assert [(r["bits"], r["tokens"]) for r in rows] == [(8, 256), (6, 100)]
    for r in rows:
        assert r["ours_ms"] > 0 and r["ms"] == r["ours_ms"] and r["gflop"] == round(6 * r["tokens"] * 2.0 ** r["bits"] / 1e9, 2)
        assert r["peer"].startswith("needs") and r["peer"].endswith("not run")
