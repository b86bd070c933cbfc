"""fsq_entropy: exact against the dense N x K product distribution, chunk invariance, gradients,
argument errors, DDP; the FSQ module's entropy regulariser."""

import math
import os
import socket

import pytest
import torch

from vqtok.ops import fsq_entropy, fsq_quantize
from vqtok.ops.fsq_entropy import split_dims
from vqtok.ops.reference import fsq_constants
from vqtok.quantizers import FSQ


def dense_probs(h: torch.Tensor, levels, tau: float) -> torch.Tensor:
    """Independent oracle: the full [N, K] distribution prod_d softmax_g(-(u_d - g)^2 / tau), in float64,
    codes enumerated dim 0 first (any order gives the same entropies)."""
    half_l, offset, shift, half_width = fsq_constants(levels, dtype=torch.float64)
    u = torch.tanh(h.double().reshape(-1, len(levels)) + shift) * half_l - offset
    p = u.new_ones(u.shape[0], 1)
    for d, lv in enumerate(levels):
        grid = torch.arange(lv, dtype=torch.float64) - half_width[d]
        pd = torch.softmax(-((u[:, d : d + 1] - grid) ** 2) / tau, -1)
        p = (p[:, :, None] * pd[:, None, :]).reshape(u.shape[0], -1)
    return p


def dense_entropy(h, levels, tau):
    p = dense_probs(h, levels, tau)
    f = lambda q: -torch.special.xlogy(q, q)  # noqa: E731
    return f(p).sum(-1).mean(), f(p.mean(0)).sum()


# ------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "levels,n,tau,scale",
    [([3], 50, 1.0, 1.0), ([2, 3], 77, 0.5, 2.0), ([3, 4, 5], 131, 0.2, 1.5), ([8, 5, 5, 5], 40, 1.0, 1.0),
     ([8, 5, 5, 5], 23, 0.05, 3.0)],
)
def test_matches_dense_product_distribution(levels, n, tau, scale):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, len(levels), generator=g, dtype=torch.float64) * scale
    ps, cb = fsq_entropy(h, levels, temperature=tau, chunk=7)
    ref_ps, ref_cb = dense_entropy(h, levels, tau)
    assert ps.dtype == cb.dtype == torch.float64 and ps.dim() == cb.dim() == 0
    assert abs(ps.item() - ref_ps.item()) < 1e-10 and abs(cb.item() - ref_cb.item()) < 1e-10
    assert 0 <= ps.item() <= sum(math.log(lv) for lv in levels) + 1e-12
    assert ps.item() - 1e-12 <= cb.item() <= math.log(math.prod(levels)) + 1e-12  # H(mean) >= mean H


def test_far_levels_are_zero_not_denormal():
    """Levels whose probability would be denormal get exactly 0 (denormals slow x86 10-100x); the
    entropies and their gradients stay those of the float64 dense distribution."""
    from vqtok.ops.fsq_entropy import dim_probs

    levels, tau = [8, 5, 5, 5], 0.05
    h = (torch.randn(64, 4, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_()
    p, logp = dim_probs(h.detach(), levels, tau)
    tiny = torch.finfo(torch.float32).tiny
    assert ((p == 0) | (p >= tiny)).all() and (p == 0).any()  # far levels: 0, not denormal
    assert torch.isfinite(logp).all()
    ps, cb = fsq_entropy(h, levels, temperature=tau)
    ref_ps, ref_cb = dense_entropy(h.detach(), levels, tau)
    assert abs(ps.item() - ref_ps.item()) < 1e-5 and abs(cb.item() - ref_cb.item()) < 1e-5
    # float64 keeps these levels (e^-98 is normal there): the gradients agree
    hd = h.detach().double().requires_grad_()
    (ps - cb).backward()
    (lambda r: r[0] - r[1])(fsq_entropy(hd, levels, temperature=tau)).backward()
    assert torch.allclose(h.grad.double(), hd.grad, atol=1e-5, rtol=1e-4)


def test_chunk_independent_and_shapes():
    levels = [4, 3, 5]
    h = torch.randn(2, 3, 9, 11, dtype=torch.float64).movedim(1, -1)  # [..., d], not contiguous
    ref = fsq_entropy(h.reshape(-1, 3), levels)
    for chunk in (1, 5, 64, 10_000):
        out = fsq_entropy(h, levels, chunk=chunk)
        for a, b in zip(out, ref):
            assert abs(a.item() - b.item()) < 1e-12
    ps32, cb32 = fsq_entropy(h.float(), levels)
    ps16, _ = fsq_entropy(h.bfloat16(), levels)
    assert ps32.dtype == cb32.dtype == ps16.dtype == torch.float32
    assert abs(ps32.item() - ref[0].item()) < 1e-5 and abs(cb32.item() - ref[1].item()) < 1e-5


def test_balanced_split():
    assert split_dims((3,)) == ((), (0,))
    for levels in [(8, 5, 5, 5), (8, 8, 8, 6, 5), (7, 5, 5, 5, 5), (2,) * 18]:
        g1, g2 = split_dims(levels)
        assert sorted(g1 + g2) == list(range(len(levels)))
        k1, k2 = math.prod(levels[i] for i in g1), math.prod(levels[i] for i in g2)
        k = math.prod(levels)
        # no subset has a smaller K1 + K2 (checked exhaustively)
        sums = [math.prod(levels[i] for i in range(len(levels)) if m >> i & 1) for m in range(1 << len(levels))]
        best = min(s + k // s for s in sums)
        assert k1 + k2 == best and k1 * k2 == k
    assert split_dims((8, 5, 5, 5)) in (((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2)), ((1, 2), (0, 3)),
                                         ((1, 3), (0, 2)), ((2, 3), (0, 1)))


def test_gradcheck_float64():
    h = (torch.randn(9, 3, dtype=torch.float64) * 1.2).requires_grad_()
    for fn in (lambda x: fsq_entropy(x, [3, 4, 2], temperature=0.6, chunk=4)[0],
               lambda x: fsq_entropy(x, [3, 4, 2], temperature=0.6, chunk=4)[1]):
        assert torch.autograd.gradcheck(fn, (h,), eps=1e-6, atol=1e-8)


def test_gradient_matches_dense_autograd():
    levels, tau = [5, 4, 3, 2], 0.3
    h = (torch.randn(61, 4, dtype=torch.float64) * 1.5).requires_grad_()
    ps, cb = fsq_entropy(h, levels, temperature=tau, chunk=8)
    (0.3 * ps - cb).backward()
    h2 = h.detach().clone().requires_grad_()
    rps, rcb = dense_entropy(h2, levels, tau)
    (0.3 * rps - rcb).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=0, atol=1e-12)


def _dim_probs_by_autograd(h, levels, tau):
    """dim_probs's values as plain differentiable torch ops ([d, Lmax, N], far and padded levels 0)."""
    half_l, offset, shift, half_width = fsq_constants(levels, dtype=h.dtype)
    u = (torch.tanh(h + shift) * half_l - offset).t()  # [d, N]
    j = torch.arange(max(levels), dtype=h.dtype)
    grid = j - half_width[:, None]
    pad = j[None, :] >= torch.tensor(levels, dtype=h.dtype)[:, None]
    logits = (-(u[:, None, :] - grid[:, :, None]) ** 2 / tau).masked_fill(pad[:, :, None], -math.inf)
    lo = math.log(torch.finfo(h.dtype).tiny) + 1.0
    shifted = logits - logits.detach().amax(1, keepdim=True)
    drop = shifted < lo
    shifted = shifted.clamp(min=lo)
    e = torch.exp(shifted).masked_fill(drop, 0.0)
    s = e.sum(1, keepdim=True)
    return e / s, shifted - torch.log(s)


@pytest.mark.parametrize("dtype,tau,scale", [(torch.float64, 0.4, 1.5), (torch.float32, 0.05, 3.0)])
@pytest.mark.parametrize("grads", ["both", "p", "logp"])
def test_dim_probs_closed_form_gradient_matches_autograd(dtype, tau, scale, grads):
    """The closed-form backward of dim_probs against autograd through the same ops, for any
    cotangents of p and log p, with padded levels (L = 5, 3, 2) and, in fp32 at tau 0.05, levels
    dropped for being below the smallest normal probability."""
    from vqtok.ops.fsq_entropy import dim_probs

    levels = [5, 3, 2]
    g = torch.Generator().manual_seed(7)
    h = (torch.randn(40, 3, generator=g, dtype=dtype) * scale).requires_grad_()
    p, logp = dim_probs(h, levels, tau)
    rp, rlogp = _dim_probs_by_autograd(h, levels, tau)
    torch.testing.assert_close(p, rp, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    torch.testing.assert_close(logp, rlogp, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-13)
    if dtype == torch.float32:
        assert (p == 0).any() and torch.equal(p == 0, rp == 0)
    cotangents = {"both": (True, True), "p": (True, False), "logp": (False, True)}[grads]
    cot = [torch.randn(p.shape, generator=g, dtype=dtype) if on else None for on in cotangents]

    def grad_of(outputs):
        pairs = [(o, c) for o, c in zip(outputs, cot) if c is not None]
        return torch.autograd.grad([o for o, _ in pairs], h, [c for _, c in pairs], retain_graph=True)[0]

    torch.testing.assert_close(grad_of((p, logp)), grad_of((rp, rlogp)),
                               rtol=1e-5 if dtype == torch.float32 else 1e-10,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_gradient_same_with_one_chunk_or_many():
    """The one-chunk path keeps P1^T, P2^T from the forward; more chunks build them again."""
    levels = [8, 5, 5, 5]
    h = torch.randn(300, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for chunk in (None, 64, 7):
        x = h.clone().requires_grad_()
        ps, cb = fsq_entropy(x, levels, temperature=0.5, chunk=chunk)
        (0.2 * ps - cb).backward()
        grads.append(x.grad)
    for other in grads[1:]:
        torch.testing.assert_close(grads[0], other, rtol=0, atol=1e-12)


def test_backward_reuses_the_forward_products_bit_for_bit():
    """One chunk: pbar_sum's P1^T, P2^T serve pbar_backward, bit for bit as building them again."""
    from vqtok.ops.fsq_entropy import dim_probs, pbar_backward, pbar_sum

    levels = [8, 5, 5, 5]
    h = torch.randn(200, 4, generator=torch.Generator().manual_seed(4))
    p, _ = dim_probs(h, levels, 0.5)
    groups = split_dims(tuple(levels))
    acc, pts = pbar_sum(p, groups, levels, 256)
    assert pts is not None and pbar_sum(p, groups, levels, 64)[1] is None
    g = torch.randn(acc.shape, generator=torch.Generator().manual_seed(8))
    assert torch.equal(pbar_backward(p, groups, levels, 256, g, pts), pbar_backward(p, groups, levels, 256, g))


def test_saturated_inputs_no_nan():
    h = torch.tensor([[40.0, -40.0, 0.0], [-40.0, 40.0, 1e-3]]).repeat(50, 1).requires_grad_()
    ps, cb = fsq_entropy(h, [8, 5, 4], temperature=1e-3)
    (ps - cb).backward()
    assert torch.isfinite(ps) and torch.isfinite(cb) and torch.isfinite(h.grad).all()
    assert abs(cb.item() - math.log(2)) < 1e-4  # two distinct hard codes, equally used


@pytest.mark.parametrize(
    "args,kwargs,err,match",
    [
        ((torch.zeros(4, 3), [8, 5]), {}, ValueError, "h must have last dim 2"),
        ((torch.zeros(4, 2), [8, 1]), {}, ValueError, r"levels\[1\] must be >= 2"),
        ((torch.zeros(4, 2), [8, 5]), {"temperature": 0.0}, ValueError, "temperature"),
        ((torch.zeros(4, 2), [8, 5]), {"temperature": True}, ValueError, "temperature"),
        ((torch.zeros(4, 2), [8, 5]), {"chunk": 0}, ValueError, "chunk"),
        ((torch.zeros(4, 2, dtype=torch.int64), [8, 5]), {}, TypeError, "h must be a floating-point"),
        ((torch.tensor([[0.0, math.nan]]), [8, 5]), {}, ValueError, "h contains 1 non-finite"),
        ((torch.zeros(0, 2), [8, 5]), {}, ValueError, "h holds no tokens"),
        ((torch.zeros(1, 4), [256, 256, 256, 256]), {}, ValueError, "K <= 2"),
    ],
)
def test_bad_arguments(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        fsq_entropy(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# DDP: global-batch values, world_size x local gradients
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(n):
    return [slice(0, n // 3), slice(n // 3, n)]  # uneven local batches


def _ddp_worker(rank, world, port, h, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hl = h[_rows(h.shape[0])[rank]].clone().requires_grad_()
        ps, cb = fsq_entropy(hl, [4, 3, 5], temperature=0.5, chunk=16)
        (0.5 * ps - cb).backward()
        # the module on a rank without tokens still joins the all-reduces (no hang), and the
        # other rank's entropies are those of its tokens alone
        m = FSQ([4, 3, 5], entropy_weight=0.1).train()
        mstats = m(h[:0] if rank == 0 else h).stats
        torch.save((ps.detach(), cb.detach(), hl.grad, mstats), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_global_entropy_and_gradients(tmp_path):
    import torch.multiprocessing as mp

    world, h = 2, torch.randn(70, 3, dtype=torch.float64)
    mp.start_processes(_ddp_worker, args=(world, _free_port(), h, str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    hr = h.clone().requires_grad_()
    ps, cb = fsq_entropy(hr, [4, 3, 5], temperature=0.5)
    (0.5 * ps - cb).backward()
    single = FSQ([4, 3, 5], entropy_weight=0.1).train()(h.float()).stats
    for rank in range(world):
        rps, rcb, grad, mstats = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(rps.item() - ps.item()) < 1e-12 and abs(rcb.item() - cb.item()) < 1e-12
        torch.testing.assert_close(grad, world * hr.grad[_rows(70)[rank]], rtol=0, atol=1e-12)
        for key in ("entropy_sample", "entropy_codebook"):
            assert abs(mstats[key].item() - single[key].item()) < 1e-5


# ------------------------------------------------------------------------------------------------
# the FSQ module
# ------------------------------------------------------------------------------------------------
def test_module_default_off_is_unchanged():
    z = torch.randn(2, 6, 5, 5, requires_grad=True)
    torch.manual_seed(0)
    plain = FSQ([8, 5, 5, 5], dim=6)
    torch.manual_seed(0)
    off = FSQ([8, 5, 5, 5], dim=6, entropy_weight=0.0, temperature=0.3)
    assert plain.state_dict().keys() == off.state_dict().keys()
    for m in (plain, off):
        m.train()
    a, b = plain(z), off(z)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert b.loss.item() == 0.0 and "entropy_codebook" not in b.stats
    codes, _ = fsq_quantize(plain.in_proj(z.movedim(1, -1).reshape(-1, 6)), [8, 5, 5, 5])
    assert torch.equal(a.quantized.movedim(1, -1).reshape(-1, 6), plain.out_proj(codes))


def test_module_entropy_loss_and_gradient():
    torch.manual_seed(0)
    m = FSQ([4, 4, 3], dim=8, entropy_weight=0.2, per_sample_weight=0.5, codebook_weight=2.0, temperature=0.5)
    z = torch.randn(3, 8, 4, 4, requires_grad=True)
    out = m(z)
    h = m.in_proj(z.detach().movedim(1, -1).reshape(-1, 8))
    ps, cb = fsq_entropy(h, [4, 4, 3], temperature=0.5)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - 0.2 * (0.5 * ps.item() - 2.0 * cb.item())) < 1e-5
    assert abs(out.stats["entropy_codebook"].item() - cb.item()) < 1e-5
    assert abs(out.stats["entropy_sample"].item() - ps.item()) < 1e-5
    out.loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0 and m.in_proj.weight.grad.abs().sum() > 0
    m.eval()  # evaluation: no entropy term
    assert m(z).loss.item() == 0.0


def test_codebook_entropy_raises_usage():
    """Only the codebook-entropy term on a collapsed latent: usage of a [4, 4] FSQ must rise (it
    would fall if the term's sign were wrong)."""
    torch.manual_seed(0)
    m = FSQ([4, 4], entropy_weight=1.0, per_sample_weight=0.0, temperature=0.5)
    z = (0.1 * torch.randn(512, 2) + 0.2).requires_grad_()  # nearly all tokens on one or two codes
    m.train()
    usage0 = m.encode(z).unique().numel()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        m(z).loss.backward()
        opt.step()
    usage1 = m.encode(z).unique().numel()
    assert usage0 <= 4 and usage1 >= 14, (usage0, usage1)


def test_build_quantizer_and_config_accept_entropy_keys():
    from vqtok.config import ConfigError, check_quantizer, load_config

    cfg = load_config(overrides=["quantizer.entropy_weight=0.1", "quantizer.temperature=0.5",
                                 "quantizer.per_sample_weight=0.5"])
    assert cfg.quantizer["name"] == "fsq"
    q = check_quantizer(cfg)
    assert isinstance(q, FSQ) and q.entropy_weight == 0.1 and q.temperature == 0.5
    cfg.quantizer = {"name": "fsq", "levels": [8, 5, 5, 5], "entropy_weight": -1.0}
    with pytest.raises(ConfigError, match="entropy_weight"):
        check_quantizer(cfg)


def test_fsq_entropy_bench_script(tmp_path, capsys):
    """benchmarks/bench_fsq_entropy.py times fwd+bwd of fsq_entropy and reports the GEMM work."""
    import json

    from scripts import load_script

    mod = load_script("benchmarks/bench_fsq_entropy.py")
    out = tmp_path / "f.json"
    assert mod.main(["--levels", "4,3", "--levels", "8,5,5", "--tokens", "7,64", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["codes"], r["tokens"]) for r in rows] == [(12, 7), (12, 64), (200, 7), (200, 64)]
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["reps"] == 2 and r["grad_finite"]
        assert r["gflop"] == pytest.approx(6 * r["tokens"] * r["codes"] / 1e9)
    assert "8,5,5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--levels", "1,4"])


def test_tables_first_built_under_inference_mode_serve_training():
    """The cached per-levels tables are plain tensors even when inference mode built them first."""
    import importlib

    mod = importlib.import_module("vqtok.ops.fsq_entropy")
    levels = [7, 3, 3]  # levels no other test uses: the cache is cold here
    mod._tables_cached.cache_clear()
    mod._digit_onehot_cached.cache_clear()
    with torch.inference_mode():
        ps, cb = fsq_entropy(torch.randn(20, 3), levels)
    assert not any(t.is_inference() for t in mod._tables(levels, torch.float32, torch.device("cpu")))
    h = torch.randn(20, 3, requires_grad=True)
    ps2, cb2 = fsq_entropy(h, levels)
    (ps2 - cb2).backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
