"""Quantizer modules: the shared interface, estimators, EMA maths, k-means, AMP, compile, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from vqtok.quantizers import (
    BSQ,
    FSQ,
    LFQ,
    QuantizerOutput,
    ResidualVQ,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
    kmeans,
)
from vqtok.quantizers._common import rotation_grad
from vqtok.quantizers.lfq import _entropy_op

HAS_ENTROPY = _entropy_op() is not None

# name -> (config, a tolerance-free equality is expected between decode(encode(z)) and forward)
CONFIGS = {
    "vq-ema": ("vq", dict(dim=12, codebook_size=37)),
    "vq-grad-cos-lowdim": ("vq", dict(dim=12, codebook_size=37, codebook_dim=5, metric="cosine", learning="grad",
                                      estimator="rotation")),
    "vq-kmeans-restart": ("vq", dict(dim=12, codebook_size=37, kmeans_init=True, kmeans_iters=3,
                                     dead_code_threshold=0.5)),
    "rvq": ("rvq", dict(dim=12, codebook_size=19, num_quantizers=3)),
    "rvq-shared": ("rvq", dict(dim=12, codebook_size=19, num_quantizers=2, shared_codebook=True, learning="grad")),
    "fsq": ("fsq", dict(levels=[5, 4, 3], dim=12)),
    "fsq-nodim": ("fsq", dict(levels=[8, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])),
    "lfq": ("lfq", dict(dim=12, bits=9, entropy_weight=0.1 if HAS_ENTROPY else 0.0)),
    "bsq": ("bsq", dict(dim=12, entropy_weight=0.1 if HAS_ENTROPY else 0.0)),
    "simvq": ("simvq", dict(dim=12, codebook_size=37)),
}
SHAPES = [(50, 12), (2, 12, 9), (2, 12, 5, 3), (1, 12, 2, 3, 4)]


def _build(key):
    name, cfg = CONFIGS[key]
    return build_quantizer(name, **cfg)


def _depth(m):
    return m.num_quantizers if isinstance(m, ResidualVQ) else None


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_interface_invariants(key, shape):
    m = _build(key)
    z = torch.randn(*shape, requires_grad=True)
    out = m(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    lead = (shape[0],) + tuple(shape[2:])
    expect = lead + ((m.num_quantizers,) if _depth(m) else ())
    assert out.indices.shape == expect and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < m.codebook_size
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    tracked = getattr(m, "health", None) is not None or isinstance(m, ResidualVQ)
    keys = ("usage", "perplexity", "dead_codes", "collapse", "histogram") if tracked else ("usage", "perplexity")
    for k in keys:
        assert k in out.stats, k
    assert 0 < float(out.stats["usage"]) <= 1 and float(out.stats["perplexity"]) >= 1
    # gradients reach the encoder through the estimator
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # eval mode: decode(encode(z)) == forward(z).quantized, bit for bit
    m.eval()
    with torch.no_grad():
        q = m(z).quantized
        idx = m.encode(z)
        assert torch.equal(idx, m(z).indices)
        assert torch.equal(m.decode(idx), q)


def test_build_quantizer_errors():
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        build_quantizer("nope", dim=4)
    with pytest.raises(TypeError, match="build_quantizer\\('vq'\\)"):
        build_quantizer("vq", dim=4, codebook_size=8, not_an_option=1)
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(4, 8, metric="dot")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(4, 0)
    m = VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match="4 channels in dim 1"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="indices must lie in"):
        m.decode(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="depth axis of size 2"):
        ResidualVQ(4, 8, 2).decode(torch.zeros(3, 3, dtype=torch.int64))


def test_codebook_sizes():
    assert FSQ([8, 5, 5, 5]).codebook_size == 1000
    with pytest.warns(UserWarning, match="at least 18 channels"):
        assert LFQ(4, bits=18).codebook_size == 2**18
    assert BSQ(16).codebook_size == 2**16
    assert ResidualVQ(4, 8, 3).codebook_size == 8
    assert SimVQ(4, 8).codebook_size == 8


@pytest.mark.parametrize("cls", [LFQ, BSQ])
def test_lfq_with_fewer_channels_than_bits_warns_and_cannot_use_its_codes(cls, recwarn):
    """The warning's claim: 8 bits from 6 Gaussian channels leave codes unused at 100 tokens per
    code, where 8 channels use all 256."""
    torch.manual_seed(0)
    narrow = cls(6, bits=8, entropy_weight=0.0)
    assert len(recwarn) == 1 and "give the encoder at least 8 channels" in str(recwarn.pop().message)
    full = cls(8, bits=8, entropy_weight=0.0)
    assert len(recwarn) == 0

    def usage(m, d):
        return torch.bincount(m.encode(torch.randn(25600, d)), minlength=256).gt(0).float().mean().item()

    assert usage(full, 8) == 1.0
    assert usage(narrow, 6) < 0.9


def test_lfq_projection_usage_script(capsys):
    from scripts import load_script

    mod = load_script("benchmarks/lfq_projection_usage.py")
    narrow, full = mod.usage(6, 8, 50), mod.usage(8, 8, 50)
    assert full[0] == 1.0 and narrow[0] < 0.9 and narrow[1] < full[1]
    assert mod.main(["--bits", "6", "--dims", "5,6", "--tokens-per-code", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].split()[:4] == ["6", "6", "20", "1.000"]


# --------------------------------------------------------------------------------------------
# EMA, estimators, gradients
# --------------------------------------------------------------------------------------------
def test_ema_update_matches_hand_computed_step():
    m = VectorQuantizer(2, 3, decay=0.9, eps=0.1, beta=0.0)
    cb = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    cs = torch.tensor([2.0, 1.0, 1.0])
    m.codebook.copy_(cb)
    m.cluster_size.copy_(cs)
    m.embed_sum.copy_(cb * cs[:, None])
    x = torch.tensor([[1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [-1.0, 0.0]])  # -> codes 0, 1, 1, 0
    out = m(x)
    assert out.indices.tolist() == [0, 1, 1, 0]
    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.tensor([[0.0, 1.0], [20.0, 0.0], [0.0, 0.0]])
    new_cs = 0.9 * cs + 0.1 * counts
    new_es = 0.9 * cb * cs[:, None] + 0.1 * sums
    n = new_cs.sum()
    smoothed = (new_cs + 0.1) / (n + 3 * 0.1) * n
    assert torch.allclose(m.cluster_size, new_cs)
    assert torch.allclose(m.embed_sum, new_es)
    assert torch.allclose(m.codebook, new_es / smoothed[:, None], atol=1e-6)
    # the output used the codebook before the update
    assert torch.equal(out.quantized, cb[[0, 1, 1, 0]])


def test_rotation_trick_forward_equal_gradient_differs():
    torch.manual_seed(1)
    z = torch.randn(64, 8)
    a = VectorQuantizer(8, 16, estimator="ste")
    b = VectorQuantizer(8, 16, estimator="rotation")
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    target = torch.randn(64, 8)
    qa, qb = a(za).quantized, b(zb).quantized
    assert torch.equal(qa, qb)
    ((qa - target) ** 2).sum().backward()
    ((qb - target) ** 2).sum().backward()
    g = 2 * (qa.detach() - target)
    assert torch.equal(za.grad, g)  # STE: the identity
    assert not torch.allclose(za.grad, zb.grad, atol=1e-3)
    # rotation trick gradient = autograd of lam * R x with lam and R held constant
    x, q = z.double(), qa.detach().double()
    xh, qh = x / x.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    r = (xh + qh) / (xh + qh).norm(dim=1, keepdim=True)
    lam = q.norm(dim=1, keepdim=True) / x.norm(dim=1, keepdim=True)
    xr = x.clone().requires_grad_()
    rot = lam * (xr - 2 * r * (r * xr).sum(1, keepdim=True) + 2 * qh * (xh * xr).sum(1, keepdim=True))
    assert torch.allclose(rot, q, atol=1e-9)  # R x / |x| * |q| is q
    rot.backward(g.double())
    assert torch.allclose(zb.grad.double(), xr.grad, atol=1e-5)
    assert torch.allclose(rotation_grad(x, q, g.double()), xr.grad, atol=1e-10)


def test_grad_codebook_and_projections_receive_gradients():
    m = VectorQuantizer(6, 10, codebook_dim=3, learning="grad")
    z = torch.randn(4, 6, 5, requires_grad=True)
    out = m(z)
    (out.quantized.square().sum() + out.loss).backward()
    assert m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0
    for p in (*m.in_proj.parameters(), *m.out_proj.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    s = SimVQ(6, 10)
    out = s(torch.randn(30, 6))
    out.loss.backward()
    assert s.proj.weight.grad.abs().sum() > 0 and s.frozen_codebook.requires_grad is False


def test_ema_codebook_is_not_a_parameter_and_commitment_only():
    m = VectorQuantizer(4, 8, beta=0.5)
    assert [n for n, _ in m.named_parameters()] == []
    z = torch.randn(20, 4, requires_grad=True)
    out = m(z)
    q = out.quantized.detach()
    assert torch.allclose(out.loss, 0.5 * F.mse_loss(z, q))


@pytest.mark.skipif(not HAS_ENTROPY, reason="vqtok.ops.lfq_entropy missing")
@pytest.mark.parametrize("cls", [LFQ, BSQ])
def test_lfq_bsq_entropy_loss(cls):
    from vqtok.ops.lfq_entropy import lfq_entropy

    m = cls(8, entropy_weight=0.3, per_sample_weight=1.0, codebook_weight=0.7, commitment_weight=0.25)
    z = torch.randn(64, 8, requires_grad=True)
    out = m(z)
    h = F.normalize(z, dim=1) if cls is BSQ else z
    scale = 8**-0.5 if cls is BSQ else 1.0
    codes = torch.where(h > 0, scale, -scale)
    assert torch.equal(out.quantized, codes)
    ps, cb = lfq_entropy(h, temperature=1.0, scale=scale)
    expect = 0.25 * F.mse_loss(h, codes) + 0.3 * (ps - 0.7 * cb)
    assert torch.allclose(out.loss, expect, atol=1e-6)
    out.loss.backward()
    assert z.grad.abs().sum() > 0
    if cls is BSQ:
        assert torch.allclose(out.quantized.norm(dim=1), torch.ones(64))


def test_rvq_residuals_and_dropout():
    torch.manual_seed(0)
    z = torch.randn(200, 6)
    m = ResidualVQ(6, 16, 4, kmeans_init=True, kmeans_iters=2)
    m.train()
    m(z)
    m.eval()
    idx = m.encode(z)
    errs = [(z - m.decode(torch.where(torch.arange(4) < d, idx, -1))).square().mean() for d in range(5)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs  # each layer lowers the error
    d = ResidualVQ(6, 16, 4, quantizer_dropout=1.0, seed=3)
    depths = []
    for _ in range(8):
        out = d(z)
        used = (out.indices >= 0).all(0)
        n = int(used.sum())
        assert bool(used[:n].all()) and not bool(used[n:].any())  # a prefix of the layers
        assert bool((out.indices[:, n:] == -1).all())
        depths.append(n)
    assert len(set(depths)) > 1
    d2 = ResidualVQ(6, 16, 4, quantizer_dropout=1.0, seed=3)
    d2.load_state_dict(d.state_dict())  # the same step counter and seed: the same draw
    d.steps.zero_(), d2.steps.zero_()
    assert torch.equal((d(z).indices >= 0), (d2(z).indices >= 0))


# --------------------------------------------------------------------------------------------
# collapse vs k-means + restarts on real photo patches
# --------------------------------------------------------------------------------------------
def photo_patches(n: int, p: int = 4, seed: int = 0) -> torch.Tensor:
    """n random p x p x 3 patches (D = 3 p^2, values in [-1, 1]) from six scikit-image photos."""
    import numpy as np
    from skimage import data

    imgs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
            data.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    per = -(-n // len(imgs))
    off = torch.arange(p)
    out = []
    for im in imgs:
        im = torch.from_numpy(im).float() / 127.5 - 1
        ys = torch.from_numpy(rng.integers(0, im.shape[0] - p, per))
        xs = torch.from_numpy(rng.integers(0, im.shape[1] - p, per))
        rows = (ys[:, None] + off)[:, :, None].expand(per, p, p)
        cols = (xs[:, None] + off)[:, None, :].expand(per, p, p)
        out.append(im[rows, cols].reshape(per, -1))
    return torch.cat(out)[:n]


def _train(m, x, steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = None
    for _ in range(steps):
        out = m(x[torch.randperm(x.shape[0], generator=g)[:batch]])
    return out


def test_collapse_vs_kmeans_and_restarts_on_photo_patches():
    x = photo_patches(65536)  # [65536, 48]
    torch.manual_seed(0)
    plain = VectorQuantizer(48, 1024)  # random init, no restarts
    out = _train(plain, x, steps=4, batch=16384)
    plain.eval()
    used = torch.unique(plain.encode(x)).numel()
    assert used < 0.1 * 1024, used  # most codes dead
    assert float(out.stats["collapse"]) == 1.0 and int(out.stats["dead_codes"]) > 900

    torch.manual_seed(0)
    good = VectorQuantizer(48, 1024, kmeans_init=True, kmeans_iters=3, dead_code_threshold=1.0)
    out = _train(good, x, steps=4, batch=16384)
    good.eval()
    used = torch.unique(good.encode(x)).numel()
    assert used >= 0.99 * 1024, used
    assert float(out.stats["collapse"]) == 0.0 and float(out.stats["ema_usage"]) >= 0.99


def test_dead_code_restart_uses_recent_inputs():
    torch.manual_seed(0)
    m = VectorQuantizer(4, 16, dead_code_threshold=0.5, decay=0.5)
    m.codebook[8:] += 100.0  # codes 8.. are far away and never chosen
    m.embed_sum.copy_(m.codebook * m.cluster_size[:, None])
    x = torch.randn(256, 4)
    out = m(x)  # cluster sizes of codes 8.. decay to 0.5 -> not yet below the threshold
    assert float(out.stats["restarted"]) == 0
    out = m(x)
    assert float(out.stats["restarted"]) >= 8
    # every restarted code is one of the recent inputs
    for c in m.codebook[8:]:
        assert bool(((x - c).abs().amax(1) == 0).any())
    assert bool((m.cluster_size >= 0.5).all())


def test_nearest_restart_moves_dead_codes_to_their_nearest_recent_input():
    m = VectorQuantizer(2, 4, dead_code_threshold=0.5, decay=0.0, learning="grad", restart="nearest")
    with torch.no_grad():
        m.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.5, 10.5]]))
    x = torch.tensor([[0.1, 0.0], [2.0, 2.0], [-2.0, 2.0], [0.0, -0.1]])  # every token picks code 0
    out = m(x)
    assert float(out.stats["restarted"]) == 3
    cb = m.codebook.detach()
    assert torch.equal(cb[0], torch.zeros(2)) and torch.equal(cb[1], x[1]) and torch.equal(cb[2], x[2])
    # code 3's nearest input is code 1's: it takes a random recent input instead
    assert bool(((x - cb[3]).abs().amax(1) == 0).any())
    with pytest.raises(ValueError, match="restart must be one of"):
        VectorQuantizer(2, 4, restart="farthest")


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 5, generator=g) * 20
    x = (centres[:, None, :] + 0.1 * torch.randn(8, 300, 5, generator=g)).reshape(-1, 5)
    for init in ("kmeans++", "random"):
        found, counts = kmeans(x, 8, iters=10, init=init, generator=torch.Generator().manual_seed(1))
        if init == "kmeans++":  # D^2 seeding picks one seed per cluster here
            d = torch.cdist(centres, found)
            assert float(d.min(1).values.max()) < 0.1 and sorted(counts.tolist()) == [300.0] * 8
        assert found.shape == (8, 5) and counts.sum() == 2400
    with pytest.raises(ValueError, match="init must be"):
        kmeans(x, 8, init="bogus")


@pytest.mark.parametrize("seeding", ["kmeans++", "random"])
def test_vq_kmeans_seeding_is_the_kmeans_init(seeding):
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(2))
    m = VectorQuantizer(6, 32, learning="grad", kmeans_init=True, kmeans_iters=2, kmeans_seeding=seeding, seed=5)
    m.train()(x)  # the gradient codebook is left as k-means made it
    want, _ = kmeans(x, 32, iters=2, init=seeding, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m.codebook.detach(), want)
    other, _ = kmeans(x, 32, iters=2, init="random" if seeding == "kmeans++" else "kmeans++",
                      generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, want)


def test_vq_kmeans_seeding_is_checked():
    with pytest.raises(ValueError, match="kmeans_seeding must be one of"):
        VectorQuantizer(2, 4, kmeans_init=True, kmeans_seeding="farthest")


# sizes where the cpp backend's certified fast search engages (K * Dc^2 >= 2^19) on AMX CPUs
SEARCH_CASES = {
    "vq-kmeans-restart": ("vq", dict(dim=16, codebook_size=8192, kmeans_init=True, kmeans_iters=2,
                                     dead_code_threshold=0.5)),
    "vq-cos-lowdim-nearest": ("vq", dict(dim=24, codebook_size=4096, codebook_dim=16, metric="cosine",
                                         kmeans_init=True, kmeans_iters=1, dead_code_threshold=0.5,
                                         restart="nearest")),
    "vq-grad": ("vq", dict(dim=16, codebook_size=4096, learning="grad")),
    "rvq": ("rvq", dict(dim=16, codebook_size=4096, num_quantizers=2, kmeans_init=True, kmeans_iters=1)),
    "simvq": ("simvq", dict(dim=16, codebook_size=8192)),
}


@pytest.mark.parametrize("key", sorted(SEARCH_CASES))
def test_search_precision_reaches_every_search_and_trains_bit_for_bit(key, monkeypatch):
    """``search_precision`` goes to every nearest_code call (search, k-means, nearest restarts),
    and "fast" trains to the same bits as "exact": indices, outputs, losses and state."""
    import sys

    seen = []

    def spy(real):
        def wrapped(*args, precision="exact", **kw):
            seen.append(precision)
            return real(*args, precision=precision, **kw)
        return wrapped

    for name in ("vq", "kmeans", "simvq"):  # the modules (the package exports a function kmeans)
        mod = sys.modules[f"vqtok.quantizers.{name}"]
        monkeypatch.setattr(mod, "nearest_code", spy(mod.nearest_code))
    name, cfg = SEARCH_CASES[key]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2048, cfg["dim"], generator=g) * (1 + i) for i in range(4)]
    runs = {}
    for precision in ("exact", "fast"):
        torch.manual_seed(0)
        m = build_quantizer(name, search_precision=precision, **cfg).train()
        seen.clear()
        outs = []
        for z in batches:
            z = z.clone().requires_grad_()
            out = m(z)
            (out.quantized.square().sum() + out.loss).backward()
            outs.append((out.indices, out.quantized.detach(), out.loss.detach(), z.grad))
        outs.append(m.eval().encode(batches[0]))
        assert seen and set(seen) == {precision}, seen
        runs[precision] = outs, m.state_dict()
    (exact, exact_state), (fast, fast_state) = runs["exact"], runs["fast"]
    for a, b in zip(exact, fast):
        for x, y in zip(*((a, b) if isinstance(a, tuple) else ((a,), (b,)))):
            assert torch.equal(x, y)
    assert exact_state.keys() == fast_state.keys()
    for k in exact_state:
        assert torch.equal(exact_state[k], fast_state[k]), k
    with pytest.raises(ValueError, match="search_precision must be one of"):
        build_quantizer(name, search_precision="half", **cfg)


# --------------------------------------------------------------------------------------------
# AMP, torch.compile, state_dict
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["vq-ema", "vq-grad-cos-lowdim", "rvq", "fsq", "lfq", "bsq", "simvq"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_fp32(key, amp):
    m = _build(key).eval()
    z = torch.randn(2, 12, 6, 7)
    with torch.no_grad():
        ref = m(z)
        with torch.autocast("cpu", dtype=amp):
            out = m(z)
            low = m(z.to(amp))  # an encoder that ran in low precision hands over low-precision z
        assert torch.equal(out.indices, ref.indices)
        assert out.quantized.dtype == torch.float32 and torch.equal(out.quantized, ref.quantized)
        assert low.quantized.dtype == amp
        assert torch.equal(low.indices, m(z.to(amp).float()).indices)
        assert torch.equal(low.quantized, m(z.to(amp).float()).quantized.to(amp))


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_model_cast_to_low_precision_keeps_quantizer_state_fp32(key, low):
    """model.to(bf16 / fp16) around a quantizer: its state stays fp32 and equal to before (no
    rounding through the low dtype), it takes low-precision z, trains, and answers as the fp32
    module does on the same values; .double() and device moves still apply."""
    import copy

    torch.manual_seed(0)
    m = _build(key)
    for _ in range(2):  # k-means init, EMA counts, usage statistics: state worth keeping
        m(torch.randn(64, 12))
    ref = copy.deepcopy(m)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), m).to(low)
    assert model[0].weight.dtype == low
    state = m.state_dict()
    for name, t in ref.state_dict().items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    z = torch.randn(3, 12, 4, 5).to(low)
    m.eval(), ref.eval()
    with torch.no_grad():
        out, want = m(z), ref(z.float())
    assert torch.equal(out.indices, want.indices)
    assert out.quantized.dtype == low and torch.equal(out.quantized, want.quantized.to(low))
    m.train()
    zg = z.clone().requires_grad_()
    o = m(zg)
    (o.quantized.float().square().sum() + o.loss).backward()
    assert zg.grad.dtype == low and torch.isfinite(zg.grad.float()).all()
    assert all(t.dtype != low for t in m.state_dict().values())
    wide = copy.deepcopy(ref).double()
    assert all(t.dtype == torch.float64 for t in wide.state_dict().values() if t.is_floating_point())
    assert all(p.dtype == torch.float64 for p in wide.parameters())


# aot_eager (traces the backward too) for the most stateful module, dynamo-only "eager" for the rest
COMPILE_CASES = [("vq-kmeans-restart", "aot_eager"), ("vq-grad-cos-lowdim", "eager"), ("rvq", "eager"),
                 ("fsq", "eager"), ("lfq", "eager"), ("simvq", "eager")]


@pytest.mark.parametrize("key,compile_backend", COMPILE_CASES)
def test_torch_compile_forward(key, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _build(key)
    ref = _build(key)
    ref.load_state_dict(m.state_dict())
    z = torch.randn(4, 12, 8, 8, requires_grad=True)
    cm = torch.compile(m, backend=compile_backend)
    # training steps (the first runs the k-means init, the second restarts); one suffices elsewhere
    for _ in range(2 if compile_backend == "aot_eager" else 1):
        a, b = cm(z), ref(z)
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.quantized, b.quantized, atol=1e-6)
        (a.quantized.sum() + a.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    m.eval(), ref.eval()
    assert torch.equal(cm(z).quantized, ref(z).quantized)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_state_dict_round_trip(key):
    torch.manual_seed(0)
    m = _build(key)
    for _ in range(3):
        m(torch.randn(64, 12))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    m2 = _build(key)
    m2.load_state_dict(torch.load(buf))
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    if hasattr(m, "cluster_size"):
        assert "cluster_size" in sd and "health.histogram" in sd and "health.ema_probs" in sd
    m.eval(), m2.eval()
    z = torch.randn(3, 12, 5)
    assert torch.equal(m(z).quantized, m2(z).quantized)


def test_training_continues_identically_after_load():
    """Resume exactness: the restart FIFO travels with the state, so the next steps match."""
    torch.manual_seed(0)
    kw = dict(dim=12, codebook_size=64, kmeans_init=False, dead_code_threshold=0.995, restart_buffer=256)
    m = build_quantizer("vq", **kw)
    for _ in range(3):
        m(torch.randn(40, 12) * 3)
    m2 = build_quantizer("vq", **kw)
    m2.load_state_dict(m.state_dict())
    assert m2._fifo_len == m._fifo_len > 0 and m2._fifo_pos == m._fifo_pos
    batches = [torch.randn(40, 12) * 3 for _ in range(3)]
    restarted = 0.0
    for i, mod in enumerate((m, m2)):
        torch.rand(1 + 5 * i)  # restarts must not depend on the global RNG (a resumed loader moves it)
        for b in batches:
            out = mod(b)
            restarted += float(out.stats["restarted"])
    assert restarted > 0, "the test must exercise dead-code restarts"
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # a state saved before the FIFO was persisted still loads (with an empty FIFO)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("_fifo")}
    m3 = build_quantizer("vq", **kw)
    m3.load_state_dict(old)
    assert m3._fifo_len == 0


# --------------------------------------------------------------------------------------------
# the `vqtok bench` modules suite (one in-process case per impl; the suite itself spawns)
# --------------------------------------------------------------------------------------------
def test_bench_modules_case_and_skip_rule():
    from vqtok.bench import modules as bm

    for module in bm.MODULES:
        row = bm.run_case("vqtok", module, n=512, d=32, k=256 if module != "fsq" else 1024, reps=1)
        assert row["ms"] > 0 and row["peak_mib"] >= 0, module
    pytest.importorskip("vector_quantize_pytorch")
    assert bm.run_case("peer", "vq", n=512, d=32, k=256, reps=1)["ms"] > 0
    cfg = bm.ModulesBenchConfig()
    assert bm._peer_skip_reason(65536, 65536, cfg) == "needs 16.0 GiB (N x K fp32 matrix)"
    assert bm._peer_skip_reason(1024, 1024, cfg) is None


def test_simvq_init_std_scales_the_frozen_basis():
    default, unit = SimVQ(16, 4096, seed=3), SimVQ(16, 4096, seed=3, init_std=1.0)
    torch.testing.assert_close(unit.frozen_codebook, default.frozen_codebook * 4.0)  # D^-0.5 = 1/4
    assert abs(float(unit.frozen_codebook.std()) - 1.0) < 0.02
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="init_std"):
            SimVQ(4, 8, init_std=bad)


def test_fsq_dither_replaces_a_fraction_of_the_rounding():
    """FSQ(noise=p) in training: a p fraction of the values become bound + U(-1/2, 1/2) levels
    (divided by L // 2), the rest stay rounded; the gradient and the indices are those of the
    plain FSQ; evaluation rounds everything."""
    from vqtok.ops.reference import fsq_constants

    levels = [8, 5, 5, 5]
    half_l, offset, shift, half_width = (t.double() for t in fsq_constants(levels))
    plain = FSQ(levels).train()  # dim = len(levels): no projection, the output is the codes
    for p in (1.0, 0.5):
        noisy = FSQ(levels, noise=p).train()
        z = torch.randn(4000, 4) * 1.5
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        a, b = plain(za), noisy(zb)
        assert torch.equal(a.indices, b.indices)
        g = torch.randn_like(a.quantized)
        (a.quantized * g).sum().backward()
        (b.quantized * g).sum().backward()
        assert torch.equal(za.grad, zb.grad)
        bound = torch.tanh(z.double() + shift) * half_l - offset
        err = b.quantized.double() * half_width - bound  # in level units: U(-1/2, 1/2) where dithered
        assert err.abs().max() <= 0.5 + 1e-5
        dithered = b.quantized != a.quantized  # a uniform draw lands on the rounded level with probability 0
        assert abs(float(dithered.double().mean()) - p) < 0.03
        assert torch.equal(noisy.eval()(z).quantized, plain.eval()(z).quantized)  # no dither in eval
        noisy.train()
    assert "noise=0.5" in repr(FSQ(levels, dim=16, noise=0.5))
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="noise"):
            FSQ(levels, noise=bad)


def test_fsq_in_projection_starts_orthogonal():
    torch.manual_seed(0)
    q = FSQ([8, 5, 5, 5], dim=16)
    w = q.in_proj.weight
    torch.testing.assert_close(w @ w.t(), torch.eye(4), atol=1e-5, rtol=0)  # orthonormal rows
    assert q.proj_init == "orthogonal" and torch.count_nonzero(q.in_proj.bias) == 0
    # a latent standardised per channel: every projected channel at unit variance (nn.Linear's
    # default init gives ~0.58), so the tanh bound spreads it over its levels from the start
    x = torch.randn(200_000, 16)
    assert torch.allclose(q.in_proj(x).std(0), torch.ones(4), atol=0.02)
    lin = FSQ([8, 5, 5, 5], dim=16, proj_init="linear")
    assert torch.count_nonzero(lin.in_proj.bias) == 4 and lin.in_proj(x).std(0).max() < 0.75
    assert lin.in_proj.weight.abs().max() <= 16**-0.5  # nn.Linear's kaiming-uniform bound
    assert isinstance(FSQ([8, 5, 5, 5]).in_proj, torch.nn.Identity)  # no projection, nothing to init
    with pytest.raises(ValueError, match="proj_init"):
        FSQ([8, 5, 5, 5], dim=16, proj_init="xavier")
