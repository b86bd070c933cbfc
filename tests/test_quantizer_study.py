"""The quantizer study script: rows, data split, skip logic and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quantizer_study.py"


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quantizer_study", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_rows_cover_every_family_and_size(qs):
    rows = qs.vqtok_rows(qs.FULL)
    seen = {(r.family, r.log2_codes) for r in rows}
    for fam in ("vq-plain", "vq-ema-kmeans-restart", "vq-l2norm-dim8", "rvq-2x", "fsq", "lfq", "bsq", "simvq"):
        assert {(fam, 10), (fam, 14)} <= seen, fam
    assert {("fsq", 18), ("lfq", 18)} <= seen
    for b, levels in qs.FSQ_LEVELS.items():  # ~2^b codes
        assert abs(torch.tensor(float(torch.tensor(levels).prod())).log2() - b) < 0.3
    peers = qs.peer_rows(qs.FULL)
    assert {r.family for r in peers} == {"vq-ema-kmeans-restart-rot", "fsq", "lfq-entropy"}
    lfq18 = [r for r in peers if r.family == "lfq-entropy" and r.log2_codes == 18]
    assert lfq18 and "GiB" in lfq18[0].skip  # the N x 2^18 probability matrix is refused, with the estimate
    assert all(r.skip is None for r in peers if r.log2_codes <= 14)


def test_held_out_photos_are_disjoint_and_tiles_in_range(qs):
    assert not set(qs.TRAIN_PHOTOS) & set(qs.EVAL_PHOTOS)
    photo = qs.photo_tensor("retina", 0.05)
    assert min(photo.shape[1:]) == round(1411 * 0.05) and photo.min() >= -1 and photo.max() <= 1
    crops = qs.Crops([photo], 32, seed=0)
    b = crops.batch(5)
    assert b.shape == (5, 3, 32, 32)
    t = qs.tiles([photo, photo[:, :40, :]], 32)
    assert t.shape[0] == (photo.shape[1] // 32) * (photo.shape[2] // 32) + photo.shape[2] // 32
    with pytest.raises(ValueError, match="crop=128"):
        qs.Crops([photo], 128, seed=0)
    with pytest.raises(ValueError, match="scale"):
        qs.photo_tensor("retina", 1.5)


def test_full_study_has_more_held_out_tokens_than_codes(qs):
    """>= 99 % usage at 2^14 needs well over 2^14 held-out tokens (2^18 rows report their ceiling)."""
    cfg = qs.FULL
    held_out = qs.tiles(qs.photo_set(qs.EVAL_PHOTOS, cfg.scales), cfg.eval_tile)
    tokens = held_out.shape[0] * (cfg.eval_tile // 4) ** 2
    assert tokens >= 8 * 2 ** max(cfg.sizes)


def test_kmeans_counts_rescaled_to_step_scale(qs):
    from vqtok.quantizers import build_quantizer

    q = build_quantizer("vq", dim=4, codebook_size=16, kmeans_init=True, dead_code_threshold=0.1)
    q.train()
    q(torch.randn(2, 4, 8, 8))
    codes, total = q.codebook.clone(), float(q.cluster_size.sum())
    qs._rescale_ema_counts(q, 0.25)
    assert float(q.cluster_size.sum()) == pytest.approx(total * 0.25)
    q._refresh_codebook()
    torch.testing.assert_close(q.codebook, codes, rtol=1e-3, atol=1e-4)  # same codes (up to Laplace eps)


def test_tiny_study_run_prints_table_and_json(qs, tmp_path, capsys):
    out = tmp_path / "study.json"
    assert qs.main(["--quick", "--steps", "4", "--rows", "vq-plain/vqtok,fsq/vqtok", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["steps"] == 4
    assert data["held_out"]["tokens"] == data["results"][0]["tokens"] > 1024
    rows = {r["family"]: r for r in data["results"]}
    assert set(rows) == {"vq-plain", "fsq"}
    for r in rows.values():
        assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= r["codebook_size"]
        assert r["codebook_size"] * (1 - r["usage"]) - 1e-6 <= r["dead_codes"] <= r["codebook_size"]  # unused => dead
        assert r["psnr"] > 5 and -1 < r["ssim"] < 1 and r["train_s"] > 0 and r["usage_ceiling"] == 1.0
    assert rows["vq-plain"]["collapse"]  # randomly initialised gradient VQ uses a handful of codes
    table = capsys.readouterr().out
    assert "vq-plain" in table and "YES" in table and "fsq" in table
