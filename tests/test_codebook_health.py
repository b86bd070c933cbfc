"""CodebookHealth: counts, perplexity, dead codes, collapse signal, state round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from vqtok.metrics.codebook import CodebookHealth, codebook_summary, per_depth_summary, perplexity_of


def test_batch_stats_hand_computed():
    h = CodebookHealth(8, decay=0.5, dead_ratio=0.5)
    idx = torch.tensor([0, 0, 1, 3])
    s = h.update(idx)
    assert torch.equal(h.histogram, torch.tensor([2, 1, 0, 1, 0, 0, 0, 0]))
    assert float(s["usage"]) == pytest.approx(3 / 8)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert float(s["perplexity"]) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    # bias-corrected EMA after one step is the batch distribution; dead: p < 0.5 / 8
    assert torch.allclose(h.corrected_probs(), torch.tensor([0.5, 0.25, 0, 0.25, 0, 0, 0, 0]))
    assert int(s["dead_codes"]) == 5
    # second step: ema = 0.5 * (0.5 * p1) + 0.5 * p2, corrected by 1 - 0.25
    s = h.update(torch.tensor([7, 7]))
    p1 = torch.tensor([0.5, 0.25, 0, 0.25, 0, 0, 0, 0])
    p2 = torch.zeros(8)
    p2[7] = 1
    assert torch.allclose(h.corrected_probs(), (0.25 * p1 + 0.5 * p2) / 0.75)
    assert int(h.histogram.sum()) == 6 and int(h.steps) == 2


def test_negative_ids_ignored_and_range_checked():
    h = CodebookHealth(4)
    h.update(torch.tensor([-1, 2, -1]))
    assert torch.equal(h.histogram, torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="< codebook_size=4"):
        h.update(torch.tensor([4]))
    with pytest.raises(ValueError, match="codebook_size must be a positive int"):
        CodebookHealth(0)
    with pytest.raises(ValueError, match="decay"):
        CodebookHealth(4, decay=1.0)


def test_collapse_signal():
    k = 256
    h = CodebookHealth(k, min_usage=0.1)
    for _ in range(5):
        s = h.update(torch.randint(0, 4, (1000,)))  # 4 of 256 codes
    assert float(s["collapse"]) == 1.0 and int(s["dead_codes"]) == k - 4
    h2 = CodebookHealth(k)
    for _ in range(5):
        s = h2.update(torch.randint(0, k, (20000,)))
    assert float(s["collapse"]) == 0.0 and int(s["dead_codes"]) == 0
    assert float(s["perplexity"]) > 0.95 * k


def test_summary_and_perplexity():
    counts = torch.tensor([10, 0, 10, 10, 10])
    assert float(perplexity_of(counts)) == pytest.approx(4.0)
    idx = torch.tensor([0, 1, 2, 3] * 5)
    s = codebook_summary(idx, 8)
    assert s["tokens"] == 20 and s["usage"] == 0.5 and s["unused_codes"] == 4
    assert s["perplexity"] == pytest.approx(4.0) and s["entropy_bits"] == pytest.approx(2.0)
    assert s["normalized_entropy"] == pytest.approx(2 / 3)
    per = per_depth_summary(torch.stack([idx, torch.zeros_like(idx)], -1), 8)
    assert per[0]["perplexity"] == pytest.approx(4.0) and per[1]["perplexity"] == pytest.approx(1.0)


def test_state_dict_round_trip_and_reset():
    h = CodebookHealth(16)
    for _ in range(3):
        h.update(torch.randint(0, 16, (100,)))
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    h2 = CodebookHealth(16)
    h2.load_state_dict(torch.load(buf))
    for k, v in h.state_dict().items():
        assert torch.equal(v, h2.state_dict()[k]), k
    assert h.summary() == h2.summary()
    h.reset()
    assert int(h.histogram.sum()) == 0 and int(h.steps) == 0


def test_perplexity_of_sparse_integer_counts():
    """Integer histograms skip their zero entries; the value is the float64 formula's."""
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    counts[torch.tensor([3, 70, 9000, 65535])] = torch.tensor([5, 1, 2, 9])
    p = counts.double() / counts.sum()
    expect = math.exp(-sum(float(x) * math.log(float(x)) for x in p[p > 0]))
    assert float(perplexity_of(counts)) == pytest.approx(expect, rel=1e-12)
    assert float(perplexity_of(counts.double())) == pytest.approx(expect, rel=1e-12)
    assert float(perplexity_of(torch.zeros(8, dtype=torch.int64))) == 1.0
    two = torch.tensor([[0, 0, 0, 5, 0, 0], [1, 1, 0, 0, 2, 0]])  # batched rows keep their zeros
    torch.testing.assert_close(perplexity_of(two), torch.tensor([1.0, 2.0 ** 1.5], dtype=torch.float64))


def test_sparse_and_dense_updates_agree():
    """A large codebook's batches are counted sparsely (update), a small one's and update_counts'
    densely: the same histogram, EMA and stats either way, against the float64 formulas."""
    k = 1 << 14
    g = torch.Generator().manual_seed(0)
    sparse, dense = CodebookHealth(k), CodebookHealth(k)
    ref = torch.zeros(k, dtype=torch.float64)
    for step in range(6):
        idx = torch.randint(0, k // 4, (700,), generator=g) * 3  # < K / 8 ids: the sparse path
        idx[:5] = -1  # dropped-layer ids are ignored
        s = sparse.update(idx)
        d = dense.update_counts(torch.bincount(idx[idx >= 0], minlength=k))
        counts = torch.bincount(idx[idx >= 0], minlength=k).double()
        ref = 0.99 * ref + 0.01 * counts / counts.sum()
        assert torch.equal(sparse.histogram, dense.histogram)
        torch.testing.assert_close(sparse.ema_probs, dense.ema_probs)
        torch.testing.assert_close(sparse.ema_probs.double(), ref, rtol=1e-5, atol=1e-9)
        for key in ("usage", "perplexity", "dead_codes", "ema_usage", "ema_perplexity", "collapse"):
            torch.testing.assert_close(s[key], d[key], msg=key)
        assert float(s["usage"]) == int((counts > 0).sum()) / k
        assert float(s["perplexity"]) == pytest.approx(float(perplexity_of(counts)), rel=1e-6)
        ema = ref / (1 - 0.99 ** (step + 1))
        assert float(s["ema_perplexity"]) == pytest.approx(float(perplexity_of(ema)), rel=1e-5)
        assert int(s["dead_codes"]) == int((ema < 0.03 / k).sum())


def test_ema_perplexity_carried_through_updates_matches_the_buffer():
    """The EMA's moments are carried through each update (no pass over K): its perplexity equals
    the buffer's over more than one re-summing period, and any other change to the buffer (a
    loaded state, a reset, an in-place edit) is seen at once."""
    from vqtok.quantizers import health as H

    k = 1 << 12
    g = torch.Generator().manual_seed(3)
    h = CodebookHealth(k, decay=0.9)
    ages = []
    for step in range(H.MOMENTS_RESUM_STEPS + 40):
        hot = int(torch.randint(1, k, (), generator=g))  # a moving hot spot: the distribution changes
        idx = (torch.randint(0, 64, (300,), generator=g) + hot) % k
        s = h.update(idx)  # 300 < K / 8: the sparse path; every 7th step the dense one (<= 64 ids: carried)
        if step % 7 == 0:
            s = h.update_counts(torch.bincount(idx, minlength=k))
        if step % 50 == 0 or step >= H.MOMENTS_RESUM_STEPS - 2:
            assert float(s["ema_perplexity"]) == pytest.approx(float(perplexity_of(h.ema_probs.double())), rel=1e-6)
        ages.append(h._moments_age)
    assert max(ages) >= H.MOMENTS_RESUM_STEPS - 1 and ages[-1] < 300  # carried, then re-summed once the period ran out
    dense = CodebookHealth(64)
    dense.update(torch.arange(64))
    assert dense._moments_age == 0  # a batch touching most codes: the buffer is summed instead

    def ema_ppl(tracker):
        return float(tracker.stats()["ema_perplexity"])

    other = CodebookHealth(k, decay=0.9)
    other.update(torch.arange(k))
    assert ema_ppl(other) == pytest.approx(k, rel=1e-6)
    other.load_state_dict(h.state_dict())
    assert ema_ppl(other) == pytest.approx(ema_ppl(h), rel=1e-6)
    h.ema_probs[: k // 2] = 0.0  # an in-place edit: the next stats see it
    assert ema_ppl(h) == pytest.approx(float(perplexity_of(h.ema_probs.double())), rel=1e-6)
    h.reset()
    h.update(torch.tensor([5, 5, 6, 7]))
    assert ema_ppl(h) == pytest.approx(2.0 ** 1.5, rel=1e-6)  # (1/2, 1/4, 1/4)


def test_dead_count_equals_the_mask_count():
    """dead_count (no mask) counts exactly the codes dead_mask marks, ties at the threshold included."""
    k = 1 << 12
    h = CodebookHealth(k)
    g = torch.Generator().manual_seed(5)
    for step in range(5):
        h.update(torch.randint(0, k // 2, (900,), generator=g))
        assert int(h.dead_count()) == int(h.dead_mask().sum())
    thr = h.dead_ratio / k * (1 - h.decay ** int(h.steps))
    ema = torch.rand(k, generator=g) * 2 * thr
    ema[::5] = torch.tensor(thr, dtype=torch.float32)  # exactly at the threshold: not dead
    ema[::7] = 0.0
    ema[1::11] = torch.finfo(torch.float32).tiny / 4  # denormal
    h.ema_probs.copy_(ema)
    assert h.dead_count().dtype == torch.int64
    assert int(h.dead_count()) == int(h.dead_mask().sum()) == int((ema < thr).sum())
    assert h.summary()["dead_codes"] == int(h.dead_mask().sum())


def test_ema_never_holds_denormals():
    """A code whose EMA decays below the smallest normal float becomes exactly 0 (denormals slow
    every later pass over the buffer 10-100x on x86); codes above it keep their value."""
    k = 64
    h = CodebookHealth(k, decay=0.5)
    h.update(torch.arange(k))
    tiny = torch.finfo(torch.float32).tiny
    h.ema_probs[:8] = tiny * 1.5  # decays to 0.75 tiny: denormal without the flush
    h.ema_probs[8:16] = tiny * 4  # stays normal (2 tiny)
    h.update(torch.tensor([40, 41]))
    ema = h.ema_probs
    assert ((ema == 0) | (ema >= tiny)).all()
    assert (ema[:8] == 0).all() and torch.allclose(ema[8:16], torch.full((8,), 2 * tiny))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cast_to_low_precision_keeps_the_ema_fp32(low):
    """A tracker in a model cast to bf16 / fp16 keeps its fp32 EMA (bit for bit) and keeps updating
    as an uncast one does; .double() still widens it."""
    ids = [torch.randint(100, (300,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    a, b = CodebookHealth(100), CodebookHealth(100)
    a.update(ids[0]), b.update(ids[0])
    b.to(low)
    assert b.ema_probs.dtype == torch.float32 and torch.equal(a.ema_probs, b.ema_probs)
    for x in ids[1:]:
        sa, sb = a.update(x), b.update(x)
        assert int(sa["dead_codes"]) == int(sb["dead_codes"])
        assert float(sa["ema_perplexity"]) == float(sb["ema_perplexity"])
    assert torch.equal(a.ema_probs, b.ema_probs) and torch.equal(a.histogram, b.histogram)
    assert b.double().ema_probs.dtype == torch.float64


def test_entropy_of_weights():
    from vqtok.quantizers.health import entropy_of_weights

    w = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0])
    assert float(entropy_of_weights(w)) == pytest.approx(1.5 * math.log(2), rel=1e-6)  # (1/2, 1/4, 1/4)
    assert float(entropy_of_weights(torch.zeros(4))) == 0.0
    w = torch.rand(1 << 18, generator=torch.Generator().manual_seed(1)) ** 4 * 1e-5
    assert float(entropy_of_weights(w)) == pytest.approx(math.log(float(perplexity_of(w.double()))), rel=1e-6)


def test_health_bench_script(tmp_path, capsys):
    """benchmarks/bench_codebook_health.py times CodebookHealth.update and reports its stats."""
    import json

    from scripts import load_script

    mod = load_script("benchmarks/bench_codebook_health.py")
    out = tmp_path / "h.json"
    assert mod.main(["--bits", "4,12", "--tokens", "64", "--steps", "3", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["codes"] for r in rows] == [16, 4096]
    for r in rows:
        assert 0 < r["min_us"] <= r["median_us"] <= r["max_us"] and r["reps"] == 2
        assert 1 <= r["ema_perplexity"] <= r["codes"] and 0 <= r["dead_codes"] <= r["codes"]
    assert rows[1]["dead_codes"] > 0  # 64 ids a step cannot keep 4096 codes alive
    assert "2^12" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--bits", "30"])


@pytest.mark.skipif(not __import__("vqtok.ops._native", fromlist=["x"]).health_available(),
                    reason="vqtok._C with the health kernel is not built")
@pytest.mark.parametrize("k,n", [(1, 5), (7, 40), (1000, 1536), (1 << 14, 700), (1 << 18, 1536)])
def test_native_update_matches_the_torch_path(k, n, monkeypatch):
    """On CPU an update is one call into the extension: the same histogram and EMA bits as the
    torch path (``native = False``), the same dead codes, batch usage and moment carrying, and
    the perplexities to fp32 rounding, through sparse and dense updates, empty batches and
    dropped-layer ids."""
    from vqtok.ops import _native

    calls = []
    real = _native.health_step
    monkeypatch.setattr(_native, "health_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(k)
    fast, ref = CodebookHealth(k, decay=0.9), CodebookHealth(k, decay=0.9)
    ref.native = False
    expected = 0
    for step in range(40):
        hot = int(torch.randint(0, k, (), generator=g))
        idx = (torch.randint(0, max(1, k // 16), (n,), generator=g) + hot) % k
        idx[: n // 10] = -1  # dropped-layer ids
        if step == 5:
            idx = idx[:0]
        expected += step % 3 == 2 or bool((idx >= 0).any())  # an empty batch's ids skip the call
        if step % 3 == 2:
            counts = torch.bincount(idx[idx >= 0], minlength=k)
            s, r = fast.update_counts(counts), ref.update_counts(counts)
        else:
            s, r = fast.update(idx), ref.update(idx)
        assert torch.equal(fast.histogram, ref.histogram) and int(fast.steps) == int(ref.steps)
        assert torch.equal(fast.ema_probs, ref.ema_probs), step
        assert fast._moments_age == ref._moments_age
        assert s.keys() == r.keys()
        for key in ("dead_codes", "ema_usage", "collapse", "usage"):
            assert torch.equal(s[key], r[key]), key
        for key in ("perplexity", "ema_perplexity"):
            torch.testing.assert_close(s[key], r[key], rtol=2e-6, atol=0, msg=key)
        assert s["dead_codes"].dtype == torch.int64
    assert len(calls) == expected  # every update but the empty id batch ran in the extension


@pytest.mark.skipif(not __import__("vqtok.ops._native", fromlist=["x"]).health_available(),
                    reason="vqtok._C with the health kernel is not built")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_native_decay_pass_at_every_isa_level(isa, monkeypatch):
    """The extension's pass over K (decay, flush below the smallest normal float, dead count) has
    one function per ISA level (``VQTOK_ISA`` picks a lower one; a level the CPU lacks falls back):
    each gives the torch path's EMA bits and dead codes, with entries at the flush and the dead
    threshold and a K that leaves a tail after every vector width."""
    monkeypatch.setenv("VQTOK_ISA", isa)
    k = (1 << 14) + 13
    g = torch.Generator().manual_seed(3)
    fast, ref = CodebookHealth(k, decay=0.5), CodebookHealth(k, decay=0.5)
    ref.native = False
    start = torch.rand(k, generator=g) * 4e-5
    start[::7] = torch.finfo(torch.float32).tiny * torch.rand(len(start[::7]), generator=g) * 4  # flushed in a step or two
    for h in (fast, ref):
        h.ema_probs.copy_(start)
        h.steps.fill_(3)
    for step in range(6):
        idx = torch.randint(0, k, (300,), generator=g)
        s, r = fast.update(idx), ref.update(idx)
        assert torch.equal(fast.ema_probs, ref.ema_probs), step
        assert int(s["dead_codes"]) == int(r["dead_codes"]) and 0 < int(s["dead_codes"]) < k, step
    assert int((fast.ema_probs == 0).sum()) >= len(start[::7]) - 300
