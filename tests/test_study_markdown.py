"""benchmarks/study_markdown.py: the study's JSON as the README's tables."""

from __future__ import annotations

import dataclasses
import json

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def md():
    return load_script("benchmarks/study_markdown.py")


@pytest.fixture(scope="module")
def qs():
    return load_script("benchmarks/quantizer_study.py")


def _row(family, impl, b, setup, seed=0, **metrics):
    base = dict(usage=0.5, perplexity=12.4, dead_codes=3, collapse=False, psnr=25.0, ssim=0.8, steps=3000,
                train_s=100.0, cost=1.5)
    return {"family": family, "impl": impl, "log2_codes": b, "setup": setup, "seed": seed, **base, **metrics}


def test_every_study_setup_is_described_in_words(md, qs):
    """Every build argument of the study's own rows has words (no key=value fallback), with the
    config's restart stop and the study's threshold."""
    cfg = qs.FULL
    config = dataclasses.asdict(cfg)
    rows = qs.vqtok_rows(cfg) + [r for r in qs.peer_rows(cfg) if r.setup]
    for row in rows:
        text = md.describe_setup(row.setup, config)
        assert text and "=" not in text, (row.family, row.log2_codes, text)
    by = {(r.family, r.impl, r.log2_codes): md.describe_setup(r.setup, config) for r in rows}
    stop = f"to {cfg.restart_stop:.0%} of steps"
    assert by[("vq-ema-kmeans-restart-rot", "vqtok", 14)] == f"EMA, k-means, restart < 0.094/step {stop}, rotation trick"
    assert by[("vq-plain", "vqtok", 10)] == "gradient codebook"
    assert by[("vq-l2norm-dim3", "vqtok", 10)].startswith(
        "l2-normalised dim 3, EMA, k-means (random seeds), restart < 1.5/step")
    assert by[("rvq-2x", "vqtok", 14)] == f"2 x 128 codes, EMA, k-means, restart < 2/step {stop}"
    assert by[("fsq", "vqtok", 18)] == "levels 8^6, orthogonal in-projection"
    assert by[("fsq", "vqtok", 10)] == "levels 8,5,5,5, orthogonal in-projection"
    dithered = {r.log2_codes: r for r in qs.vqtok_rows(qs.override(cfg, ["fsq_noise=0.5"])) if r.family == "fsq"}
    assert md.describe_setup(dithered[10].setup, config) == "levels 8,5,5,5, orthogonal in-projection, dither 0.5"
    assert by[("fsq-entropy", "vqtok", 10)] == "8,5,5,5; entropy 0.01, τ 0.5"
    assert by[("lfq", "vqtok", 18)] == "entropy 5, τ 0.3, 18-channel latent"
    assert by[("simvq", "vqtok", 14)] == "basis std 1.0, W at 3x lr"
    if ("fsq", "vector-quantize-pytorch", 10) in by:  # the peer is installed
        assert by[("vq-ema-kmeans-restart-rot", "vector-quantize-pytorch", 10)] == \
            f"EMA, k-means, restart < 1.5/step {stop}, rotation trick"


def test_setup_words_follow_the_options(md):
    config = {"restart_stop": 1.0}
    setup = {"quantizer": "vq", "codebook_size": 64, "learning": "ema", "kmeans_init": True,
             "dead_code_threshold": 0.25, "restart": "nearest", "estimator": "rotation", "decay": 0.95,
             "search_precision": "fast", "newfangled": 3}
    assert md.describe_setup(setup, config) == \
        "EMA, decay 0.95, k-means, restart < 0.25/step to the end, nearest restarts, rotation trick, newfangled=3"
    setup.update(kmeans_seeding="random")
    assert md.describe_setup(setup, config).startswith(
        "EMA, decay 0.95, k-means (random seeds), restart < 0.25/step")
    assert md.describe_setup({"quantizer": "lfq", "bits": 10, "entropy_weight": 0.1, "temperature": 0.3,
                              "per_sample_weight": 0.5}, config) == "entropy 0.1, τ 0.3, per-sample 0.5"


def test_results_table_and_seed_table(md, tmp_path, capsys):
    config = {"restart_stop": 0.6}
    vq = {"quantizer": "vq", "codebook_size": 1024, "learning": "grad"}
    run = {"config": config, "results": [
        _row("vq-plain", "vqtok", 10, vq, collapse=True, usage=0.0234),
        {"family": "lfq-entropy", "impl": "vector-quantize-pytorch", "log2_codes": 18,
         "setup": {"quantizer": "LFQ", "entropy_loss_weight": 0.1}, "skipped": "needs ~4.5 GiB"}]}
    lines = md.results_table(run).splitlines()
    assert lines[2] == ("| vq-plain | vqtok | 2^10 | gradient codebook | 0.023 | 12 | 3 | **YES** | 25.00 | 0.800 "
                        "| 3000 | 100 | 1.50 |")
    assert lines[3].startswith("| lfq-entropy | vq-pytorch | 2^18 | entropy 0.1 (its defaults) | needs ~4.5 GiB |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)

    seeds = {"config": config, "results": [_row("vq-plain", "vqtok", 10, vq, seed=s, usage=u, psnr=p, collapse=c,
                                                 held_in_usage=h)
                                            for s, u, p, c, h in ((1, 0.2, 24.0, True, 0.3), (2, 0.4, 26.0, False, 0.5))]}
    one = {"config": config, "results": [_row("vq-plain", "vqtok", 10, vq, usage=0.3, psnr=25.0, held_in_usage=0.4),
                                         _row("fsq", "vqtok", 10, {"quantizer": "fsq", "levels": [8, 5, 5, 5]})]}
    table = md.seed_table([one, seeds]).splitlines()
    assert len(table) == 3  # the FSQ row ran at one seed only
    assert table[2] == ("| vq-plain | vqtok | 2^10 | 0,1,2 | 0.300 [0.200, 0.400] | 0.400 [0.300, 0.500] "
                        "| 25.00 [24.00, 26.00] | 0.800 | 100 | 1/3 |")

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(one)), b.write_text(json.dumps(seeds))
    assert md.main([str(a), str(b), "--seeds"]) == 0
    assert "0.300 [0.200, 0.400]" in capsys.readouterr().out
    assert md.main([str(a)]) == 0
    assert "| fsq | vqtok | 2^10 | levels 8,5,5,5 |" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(SystemExit):
        md.main([str(bad)])
    assert "not a quantizer_study.py JSON" in capsys.readouterr().err


def test_pair_table_reads_each_vqtok_row_against_its_peer_seed_by_seed(md, tmp_path, capsys):
    """--pairs: each vqtok row with its vector-quantize-pytorch counterpart (PEER_FAMILY: LFQ with
    lfq-entropy) at the same size and seed; seeds only one side ran, and rows with no peer, are left out."""
    fsq = {"quantizer": "fsq", "levels": [8, 5, 5, 5]}
    results = []
    for seed, (uv, pv, up, pp) in enumerate(((0.9, 28.0, 0.8, 27.0), (0.7, 26.0, 0.8, 27.5), (0.8, 29.0, 0.8, 28.0))):
        results += [_row("fsq", "vqtok", 10, fsq, seed=seed, usage=uv, psnr=pv, train_s=20.0),
                    _row("fsq", "vector-quantize-pytorch", 10, fsq, seed=seed, usage=up, psnr=pp, train_s=30.0)]
    results += [_row("fsq", "vqtok", 10, fsq, seed=3, usage=0.1, psnr=10.0),  # no peer row at seed 3
                _row("lfq", "vqtok", 14, {"quantizer": "lfq"}, usage=0.99, psnr=25.0),
                _row("lfq-entropy", "vector-quantize-pytorch", 14, {"quantizer": "LFQ"}, usage=0.4, psnr=20.0),
                _row("simvq", "vqtok", 10, {"quantizer": "simvq"})]
    lines = md.pair_table([{"config": {}, "results": results}]).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2] == ("| fsq | fsq | 2^10 | 0,1,2 | 0.800 / 0.800 | 2 of 3 | 27.67 / 27.50 | 2 of 3 "
                        "| +0.17 [-1.50, +1.00] | 20 / 30 |")
    assert lines[3].startswith("| lfq | lfq-entropy | 2^14 | 0 | 0.990 / 0.400 | 1 of 1 | 25.00 / 20.00 | 1 of 1 |")

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"config": {}, "results": results}))
    assert md.main([str(path), "--pairs"]) == 0
    assert "| fsq | fsq | 2^10 | 0,1,2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        md.main([str(path), "--pairs", "--seeds"])
    assert "two different tables" in capsys.readouterr().err
