"""The quantizer study script: rows, data split, skip logic and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from scripts import load_script


@pytest.fixture(scope="module")
def qs():
    return load_script("benchmarks/quantizer_study.py")


def test_rows_cover_every_family_and_size(qs):
    rows = qs.vqtok_rows(qs.FULL)
    seen = {(r.family, r.log2_codes) for r in rows}
    for fam in ("vq-plain", "vq-ema-kmeans-restart-rot", "vq-l2norm-dim3", "rvq-2x", "fsq", "fsq-entropy", "lfq",
                "bsq", "simvq"):
        assert {(fam, 10), (fam, 14)} <= seen, fam
    assert {("fsq", 18), ("fsq-entropy", 18), ("lfq", 18)} <= seen
    for r in rows:  # every row records how it was built, and builds a module with that codebook size
        assert r.setup["quantizer"] in ("vq", "rvq", "fsq", "lfq", "bsq", "simvq")
        if r.log2_codes == 10:
            q = r.build(qs.FULL)
            assert abs(math.log2(q.codebook_size ** (2 if r.family == "rvq-2x" else 1)) - 10) < 0.3
    assert [r for r in rows if r.family == "fsq-entropy"][0].setup["entropy_weight"] > 0
    for b, levels in qs.FSQ_LEVELS.items():  # ~2^b codes
        assert abs(torch.tensor(float(torch.tensor(levels).prod())).log2() - b) < 0.3
    peers = qs.peer_rows(qs.FULL)
    assert {r.family for r in peers} == {"vq-ema-kmeans-restart-rot", "fsq", "lfq-entropy"}
    lfq18 = [r for r in peers if r.family == "lfq-entropy" and r.log2_codes == 18]
    assert lfq18 and "GiB" in lfq18[0].skip  # the N x 2^18 probability matrix is refused, with the estimate
    assert all(r.skip is None for r in peers if r.log2_codes <= 14)


def test_rows_of_one_seed_start_from_the_same_autoencoder(qs):
    """The encoder and decoder weights depend on the seed only: a VQ row (whose codebook init
    draws from torch's generator) and an FSQ row (which draws nothing) get the same ones, so the
    study's rows compare in pairs; another seed gives other weights, and so does no fork."""
    cfg = dataclasses.replace(qs.QUICK, sizes=(10,), big_sizes=())
    rows = {r.family: r for r in qs.vqtok_rows(cfg)}

    def weights(model):
        return {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}

    vq, fsq = (weights(qs.build_model(rows[f], cfg)) for f in ("vq-ema-kmeans-restart-rot", "fsq"))
    assert vq.keys() == fsq.keys() and len(vq) > 4
    assert all(torch.equal(vq[k], fsq[k]) for k in vq)
    other = weights(qs.build_model(rows["fsq"], dataclasses.replace(cfg, seed=1)))
    assert not torch.equal(other["encoder.0.weight"], vq["encoder.0.weight"])
    torch.manual_seed(cfg.seed)  # without the fork, the VQ codebook's draws would shift the weights
    rows["vq-ema-kmeans-restart-rot"].build(cfg)
    unforked = qs.StudyAE(torch.nn.Identity(), cfg.latent_dim, cfg.width, cfg.latent_norm)
    assert not torch.equal(unforked.encoder[0].weight, vq["encoder.0.weight"])


def test_lfq_rows_get_a_latent_channel_per_bit(qs, monkeypatch):
    """LFQ at 2^18 trains on an 18-channel latent (no 16 -> 18 projection); every other row on
    ``latent_dim`` channels, in the row's model and in its reference step alike."""
    import warnings

    cfg = dataclasses.replace(qs.QUICK, steps=2, probe_steps=1, sizes=(10,), big_sizes=(18,))
    rows = {(r.family, r.log2_codes): r for r in qs.vqtok_rows(cfg)}
    lfq18 = rows["lfq", 18]
    assert lfq18.latent_dim(cfg) == 18 and lfq18.setup["latent_dim"] == 18
    assert all(r.latent_dim(cfg) == cfg.latent_dim and "latent_dim" not in r.setup
               for key, r in rows.items() if key != ("lfq", 18))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fewer channels than bits" warning: no projection at all
        q = lfq18.build(cfg)
    assert q.dim == q.bits == 18 and isinstance(q.in_proj, torch.nn.Identity)
    peer18 = [r for r in qs.peer_rows(cfg) if r.family == "lfq-entropy" and r.log2_codes == 18]
    assert not peer18 or peer18[0].latent_dim(cfg) == 18
    dims = []
    real = qs.StudyAE

    def spy(quantizer, latent_dim, *args):
        dims.append(latent_dim)
        return real(quantizer, latent_dim, *args)

    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    monkeypatch.setattr(qs, "StudyAE", spy)
    r = qs.run_row(lfq18, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:2], held)
    assert dims == [18, 18] and r["setup"]["latent_dim"] == 18  # the reference step, then the row


def test_held_out_photos_are_disjoint_and_tiles_in_range(qs):
    assert not set(qs.TRAIN_PHOTOS) & set(qs.EVAL_PHOTOS)
    photo = qs.photo_tensor("retina", 0.05)
    assert min(photo.shape[1:]) == round(1411 * 0.05) and photo.min() >= -1 and photo.max() <= 1
    crops = qs.Crops([photo], 32, seed=0)
    b = crops.batch(5)
    assert b.shape == (5, 3, 32, 32)
    # every crop is a window of one of the photos, plain or mirrored; every position and both
    # flips occur; the same seed gives the same crops
    small = [torch.arange(3 * 5 * 6, dtype=torch.float32).reshape(3, 5, 6), -torch.ones(3, 4, 4)]
    crops = qs.Crops(small, 4, seed=1)
    seen = set()
    for c in crops.batch(400):
        if float(c[0, 0, 0]) < 0:
            assert torch.equal(c, small[1])
            seen.add("second")
            continue
        flip = bool(c[0, 0, 0] > c[0, 0, -1])
        w = c.flip(-1) if flip else c
        y, x = divmod(int(w[0, 0, 0]), 6)
        assert torch.equal(w, small[0][:, y : y + 4, x : x + 4])
        seen.add((y, x, flip))
    assert seen == {"second"} | {(y, x, f) for y in range(2) for x in range(3) for f in (False, True)}
    assert torch.equal(qs.Crops(small, 4, seed=1).batch(7), qs.Crops(small, 4, seed=1).batch(7))
    t = qs.tiles([photo, photo[:, :40, :]], 32)
    assert t.shape[0] == (photo.shape[1] // 32) * (photo.shape[2] // 32) + photo.shape[2] // 32
    with pytest.raises(ValueError, match="crop=128"):
        qs.Crops([photo], 128, seed=0)
    with pytest.raises(ValueError, match="scale"):
        qs.photo_tensor("retina", 1.5)


def test_full_study_has_many_held_out_tokens_per_code(qs):
    """Usage near 1 at 2^18 codes needs many held-out tokens per code: the dense views give > 16."""
    cfg = qs.FULL
    photos = qs.photo_set(qs.EVAL_PHOTOS, cfg.scales)
    assert qs.dense_token_count(photos, cfg.eval_tile) >= 16 * 2 ** max(cfg.big_sizes)


def test_dense_views_cover_every_phase_and_the_mirror(qs):
    photo = torch.arange(3 * 70 * 75, dtype=torch.float32).reshape(3, 70, 75)
    views = list(qs.dense_views([photo], 64))
    assert len(views) == 2 * 16 and all(v.shape == (1, 3, 64, 64) for v in views)
    assert sum(v.shape[0] for v in views) * 16 ** 2 == qs.dense_token_count([photo], 64)
    assert torch.equal(views[1][0], photo[:, 0:64, 1:65]) and torch.equal(views[4][0], photo[:, 1:65, 0:64])
    assert torch.equal(views[16][0], photo.flip(-1)[:, 0:64, 0:64])
    assert len({v.sum().item() for v in views}) == 32  # all different pixels
    small = photo[:, :66, :]  # phases whose view is smaller than a tile are left out
    assert sum(v.shape[0] for v in qs.dense_views([small], 64)) * 256 == qs.dense_token_count([small], 64)


def test_held_out_health_counts_every_layer(qs):
    from vqtok.quantizers import build_quantizer

    torch.manual_seed(0)
    photos = [torch.rand(3, 40, 44) * 2 - 1]
    model = qs.StudyAE(build_quantizer("rvq", dim=4, codebook_size=8, num_quantizers=2), 4, 8)
    h = qs.held_out_codebook_health(model, photos, 32, layers=2)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        idx = torch.cat([model.quantizer(model.encoder(v)).indices.reshape(-1, 2)
                         for v in qs.dense_views(photos, 32)])
    assert h["tokens"] == idx.shape[0] == qs.dense_token_count(photos, 32)
    for layer, s in enumerate(h["layers"]):
        assert s["usage"] == pytest.approx(len(idx[:, layer].unique()) / 8)
        assert torch.equal(h["counts"][layer], torch.bincount(idx[:, layer], minlength=8))
    assert h["usage"] == pytest.approx(sum(s["usage"] for s in h["layers"]) / 2)


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
    assert data["held_out"]["usage_tokens"] == data["results"][0]["tokens"] == 32 * data["held_out"]["tokens"]
    rows = {r["family"]: r for r in data["results"]}
    assert set(rows) == {"vq-plain", "fsq"}
    for r in rows.values():
        assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= r["codebook_size"]
        assert r["codebook_size"] * (1 - r["usage"]) - 1e-6 <= r["dead_codes"] <= r["codebook_size"]  # unused => dead
        assert r["psnr"] > 5 and -1 < r["ssim"] < 1 and r["train_s"] > 0 and r["usage_ceiling"] == 1.0
        assert r["steps"] == 4 and r["setup"]["quantizer"] in ("vq", "fsq")
    assert rows["vq-plain"]["collapse"]  # randomly initialised gradient VQ uses a handful of codes
    table = capsys.readouterr().out
    assert "vq-plain" in table and "YES" in table and "fsq" in table


def test_seeds_run_each_row_per_seed_and_summarise(qs, tmp_path, capsys):
    out = tmp_path / "seeds.json"
    assert qs.main(["--quick", "--steps", "3", "--rows", "fsq/vqtok", "--seeds", "0,5,0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["seeds"] == [0, 5]  # duplicates dropped
    assert [r["seed"] for r in data["results"]] == [0, 5]
    a, b = data["results"]
    assert (a["usage"], a["psnr"]) != (b["usage"], b["psnr"])  # another seed: other crops, other init
    (summary,) = data["seed_summary"]
    assert (summary["family"], summary["seeds"]) == ("fsq", [0, 5])
    assert summary["collapse_seeds"] == bool(a["collapse"]) + bool(b["collapse"])
    for key in ("usage", "psnr", "ssim", "train_s"):
        lo, hi = sorted((a[key], b[key]))
        assert summary[key]["min"] == lo and summary[key]["max"] == hi
        assert summary[key]["mean"] == pytest.approx((a[key] + b[key]) / 2)
    printed = capsys.readouterr().out
    assert "over seeds 0, 5:" in printed and f"{summary['usage']['mean']:7.3f} [" in printed
    # one seed: no summary; a skipped row has no spread
    assert qs.seed_summary([{**a, "seed": 0}, {"family": "x", "impl": "vqtok", "log2_codes": 10, "skipped": "s"}]) == []
    with pytest.raises(SystemExit):
        qs.main(["--quick", "--seeds", "0,one"])


def test_slow_row_trains_for_the_time_cap(qs):
    cfg = dataclasses.replace(qs.QUICK, steps=50, probe_steps=2, max_train_s=1e-6)  # cut after 2 x 2 steps
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "fsq"][0]
    r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
    assert r["steps"] == 4 and r["tokens"] == qs.dense_token_count(held, cfg.eval_tile)


def test_budget_is_relative_to_the_autoencoders_own_step(qs):
    cfg = dataclasses.replace(qs.FULL, steps=3000, budget=4.0, probe_steps=10, max_train_s=900.0)
    assert qs.budget_steps(cfg, step_s=0.030, base_s=0.010) == 3000  # 3x the autoencoder: every step
    assert qs.budget_steps(cfg, step_s=0.080, base_s=0.010) == 1500  # 8x: the steps 4x pays for
    assert qs.budget_steps(cfg, step_s=0.160, base_s=0.040) == 3000  # a slower machine: the same steps
    assert qs.budget_steps(cfg, step_s=0.6, base_s=0.3) == 1500  # but never past max_train_s (900 s)
    assert qs.budget_steps(cfg, step_s=100.0, base_s=0.01) == 20  # at least the probe's steps, already run

    # the plan: cut at the probe only when far over the budget; re-planned from the mean every 100 steps
    assert qs.plan_steps(cfg, 20, step_s=0.045, base_s=0.010, steps=3000) == 3000  # 4.5x: wait for the mean
    assert qs.plan_steps(cfg, 20, step_s=0.600, base_s=0.010, steps=3000) == 200  # 60x: cut at once
    assert qs.plan_steps(cfg, 150, step_s=0.045, base_s=0.010, steps=3000) == 3000  # not a re-planning step
    assert qs.plan_steps(cfg, 200, step_s=0.045, base_s=0.010, steps=3000) == 2666  # 4.5x by the mean: cut
    assert qs.plan_steps(cfg, 300, step_s=0.016, base_s=0.010, steps=2666) == 3000  # the burst passed: all steps
    assert qs.plan_steps(cfg, 2700, step_s=0.2, base_s=0.010, steps=2800) == 2700  # never before the steps run

    # in a row: a budget no row fits in stops it after its probe, and the cost it measured is reported
    cfg = dataclasses.replace(qs.QUICK, steps=50, probe_steps=2, budget=1e-6)
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "lfq"][0]
    r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
    assert r["steps"] == 4 and r["base_step_ms"] > 0 and r["cost"] > 0.5


def test_pass_through_baseline_leaves_the_rows_seeds_alone(qs, monkeypatch):
    cfg = dataclasses.replace(qs.QUICK, steps=6, probe_steps=1)
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    assert qs.base_step_s(cfg, qs.Crops(photos, cfg.crop, 0)) > 0
    z = torch.randn(2, cfg.latent_dim, 3, 3)
    q = qs.PassThrough()(z)
    assert q.quantized is z and float(q.loss) == 0.0
    # the reference model's weights and crops come before the row's seeds: the row trains the same
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "vq-ema-kmeans-restart-rot"][0]

    def run():
        r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
        return r["usage"], r["psnr"], r["final_loss"]

    measured = run()
    monkeypatch.setattr(qs, "base_step_s", lambda cfg, train, latent_dim=None: 1.0)  # no reference steps at all
    assert run() == measured


def test_jobs_run_rows_in_worker_processes(qs, tmp_path):
    """--jobs 2: the same rows and numbers as one process with as many threads per row, in table order."""
    argv = ["--quick", "--steps", "3", "--rows", "fsq/,vq-plain/vqtok", "--no-progress"]
    both = tmp_path / "jobs.json"
    assert qs.main([*argv, "--jobs", "2", "--threads", "2", "--json", str(both)]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = qs.run_study(dataclasses.replace(qs.QUICK, steps=3), ["fsq/", "vq-plain/vqtok"],
                           progress=False)
    finally:
        torch.set_num_threads(threads)
    par = json.loads(both.read_text())
    assert par["jobs"] == 2
    key = ("family", "impl", "log2_codes")
    assert [tuple(r[k] for k in key) for r in par["results"]] == [tuple(r[k] for k in key) for r in one["results"]]
    assert [tuple(r[k] for k in key) for r in par["results"]] == [
        ("vq-plain", "vqtok", 10), ("fsq", "vqtok", 10), ("fsq", "vector-quantize-pytorch", 10)][:len(par["results"])]
    for a, b in zip(par["results"], one["results"]):
        assert (a["usage"], a["psnr"], a["dead_codes"]) == (b["usage"], b["psnr"], b["dead_codes"])
    # a row that fails in its worker stops the study with the worker's traceback
    with pytest.raises(RuntimeError, match="failed in its worker(.|\n)*norm must be"):
        qs.main([*argv, "--jobs", "2", "--set", "latent_norm=bogus"])
    with pytest.raises(SystemExit):
        qs.main([*argv, "--jobs", "0"])


def test_workers_take_each_pair_back_to_back(qs):
    """run_order: sizes from the largest; at a size each runnable peer row, then its vqtok
    counterpart at the same seed, then the vqtok rows without one; skipped rows left out."""
    rows = qs.study_rows(qs.FULL)
    runs = [(i, seed) for i in range(len(rows)) for seed in (0, 1)]
    order = qs.run_order(rows, runs)
    assert sorted(order) == sorted(run for run in runs if not rows[run[0]].skip)
    sizes = [rows[i].log2_codes for i, _ in order]
    assert sizes == sorted(sizes, reverse=True)
    peers = [k for k, (i, _) in enumerate(order) if rows[i].impl != "vqtok"]
    assert peers, "vector-quantize-pytorch is a dev dependency"
    for k in peers:
        (i, seed), (j, seed2) = order[k], order[k + 1]
        assert rows[j].impl == "vqtok" and qs.PEER_FAMILY[rows[j].family] == rows[i].family
        assert rows[j].log2_codes == rows[i].log2_codes and seed2 == seed
    # the first vqtok row of a size without a counterpart comes after every pair of that size
    for b in (10, 14, 18):
        at = [(k, rows[i]) for k, (i, _) in enumerate(order) if rows[i].log2_codes == b]
        last_pair = max((k + 1 for k, r in at if r.impl != "vqtok"), default=-1)
        lone = [k for k, r in at if r.impl == "vqtok" and (qs.PEER_FAMILY.get(r.family), b) not in
                {(p.family, p.log2_codes) for _, p in at if p.impl != "vqtok"}]
        assert all(k > last_pair for k in lone)


def test_restarts_stop_after_their_share_of_steps(qs, monkeypatch):
    from vqtok.quantizers import build_quantizer
    from vqtok.quantizers.vq import VectorQuantizer

    vq = build_quantizer("vq", dim=4, codebook_size=16, kmeans_init=True, dead_code_threshold=0.5)
    rvq = build_quantizer("rvq", dim=4, codebook_size=8, num_quantizers=3, dead_code_threshold=0.5)
    plain = build_quantizer("vq", dim=4, codebook_size=16)
    assert (qs.stop_restarts(vq), qs.stop_restarts(rvq), qs.stop_restarts(plain)) == (1, 3, 0)
    assert vq.dead_code_threshold == 0 and all(m.dead_code_threshold == 0 for m in rvq.modules()
                                               if hasattr(m, "dead_code_threshold"))
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        pass
    else:
        peer = vqp.VectorQuantize(dim=4, codebook_size=16, threshold_ema_dead_code=2)
        assert qs.stop_restarts(peer) == 1 and peer._codebook.threshold_ema_dead_code == 0

    # in a row: restarts after the k-means init pass and in the first half of the steps only
    seen = []
    real = VectorQuantizer._restart_dead

    def spy(self):
        seen.append(int(self.steps))
        return real(self)

    monkeypatch.setattr(VectorQuantizer, "_restart_dead", spy)
    cfg = dataclasses.replace(qs.QUICK, steps=8, probe_steps=1, restart_stop=0.5)
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "vq-ema-kmeans-restart-rot"][0]
    r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
    assert r["steps"] == 8 and seen == [1, 2, 3, 4, 5]  # update counter: 1 = the init pass, then steps 0-3
    assert r["restarts_last_tenth"] == 0 and r["restarts"] is not None and r["restarts"] >= 0
    assert qs.restarts_in({"layer0/restarted": torch.tensor(2.0), "layer1/restarted": torch.tensor(3.0)}) == 5
    assert qs.restarts_in({"usage": torch.tensor(0.5)}) is None


def test_simvq_map_trains_at_its_multiple_of_the_learning_rate(qs, monkeypatch):
    """SimVQ's linear map W (``proj``) gets its own optimiser group at ``simvq_proj_lr`` times the
    schedule's rate, recorded in the row's setup; every other parameter trains at the rate itself,
    and rows without ``lr_scales`` keep one group."""
    cfg = dataclasses.replace(qs.QUICK, sizes=(10,), big_sizes=(), steps=3, probe_steps=1)
    rows = {r.family: r for r in qs.vqtok_rows(cfg)}
    simvq = rows["simvq"]
    assert simvq.lr_scales == {"proj": 3.0} and simvq.setup["lr_scales"] == {"proj": 3.0}
    model = qs.build_model(simvq, cfg)
    groups = qs.param_groups(model, simvq)
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0]
    assert groups[1]["params"] == [model.quantizer.proj.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    fsq = rows["fsq"]
    assert fsq.lr_scales == {} and "lr_scales" not in fsq.setup
    assert [g["lr_scale"] for g in qs.param_groups(qs.build_model(fsq, cfg), fsq)] == [1.0]
    off = {r.family: r for r in qs.vqtok_rows(dataclasses.replace(cfg, simvq_proj_lr=1.0))}["simvq"]
    assert off.lr_scales == {} and "lr_scales" not in off.setup

    # in a row: the schedule's rate for the autoencoder, three times it for W at every step
    seen = []
    real = qs.train_step

    def spy(model, opt, x):
        seen.append([g["lr"] for g in opt.param_groups])
        return real(model, opt, x)

    monkeypatch.setattr(qs, "train_step", spy)
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    qs.run_row(simvq, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
    row_steps = [lrs for lrs in seen if len(lrs) == 2]  # the autoencoder-only baseline's steps have one group
    assert len(row_steps) == 3 and len(seen) == 3 + 3 * cfg.probe_steps
    for step, (base, w) in enumerate(row_steps):
        assert base == pytest.approx(qs.learning_rate(cfg, step, 3)) and w == pytest.approx(3 * base)


def test_held_in_usage_column(qs, tmp_path, capsys):
    out = tmp_path / "study.json"
    assert qs.main(["--quick", "--steps", "3", "--rows", "fsq/vqtok", "--held-in-usage", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    photos = qs.photo_set(qs.TRAIN_PHOTOS, qs.QUICK.scales)
    assert 0 < r["held_in_usage"] <= 1 and r["held_in_tokens"] == qs.dense_token_count(photos, qs.QUICK.eval_tile)
    assert "held-in" in capsys.readouterr().out


def test_set_overrides_config_fields(qs):
    cfg = qs.override(qs.QUICK, ["seed=3", "scales=0.5,1", "big_sizes=18", "lr_decay=constant",
                                 "held_in_usage=true", "lfq_entropy=0.2,0.4,0.5"])
    assert (cfg.seed, cfg.scales, cfg.big_sizes, cfg.lr_decay, cfg.held_in_usage) == (3, (0.5, 1.0), (18,), "constant", True)
    assert qs.lfq_entropy(cfg, 10) == dict(entropy_weight=0.2, temperature=0.4, per_sample_weight=0.5)
    # the big sizes (here 2^18, not in sizes) take lfq_entropy_big, which --set reaches alike
    assert qs.lfq_entropy(cfg, 18) == dict(entropy_weight=5.0, temperature=0.3, per_sample_weight=1.0)
    big = qs.override(cfg, ["lfq_entropy_big=0.5,0.2,2"])
    assert qs.lfq_entropy(big, 18) == dict(entropy_weight=0.5, temperature=0.2, per_sample_weight=2.0)
    assert qs.lfq_entropy(big, 10) == qs.lfq_entropy(cfg, 10)
    rows = {r.log2_codes: r.setup for r in qs.vqtok_rows(big) if r.family == "lfq"}
    assert rows[10]["entropy_weight"] == 0.2 and rows[18]["entropy_weight"] == 0.5
    assert cfg.steps == qs.QUICK.steps
    # FSQ's entropy rows alike: fsq_entropy at sizes, fsq_entropy_big at the big sizes
    fsq = qs.override(cfg, ["fsq_entropy=0.02,0.4", "fsq_entropy_big=0.2,0.6"])
    assert qs.fsq_entropy(fsq, 10) == dict(entropy_weight=0.02, temperature=0.4)
    assert qs.fsq_entropy(fsq, 18) == dict(entropy_weight=0.2, temperature=0.6)
    rows = {r.log2_codes: r.setup for r in qs.vqtok_rows(fsq) if r.family == "fsq-entropy"}
    assert rows[10]["entropy_weight"] == 0.02 and rows[18]["temperature"] == 0.6
    with pytest.raises(ValueError, match="fsq_entropy_big is"):
        qs.fsq_entropy(qs.override(qs.FULL, ["fsq_entropy_big=0.2"]), 18)
    with pytest.raises(ValueError, match="per_sample_weight"):
        qs.lfq_entropy(qs.override(qs.FULL, ["lfq_entropy=0.2,0.4"]), 10)
    with pytest.raises(ValueError, match="lfq_entropy_big"):
        qs.lfq_entropy(qs.override(qs.FULL, ["lfq_entropy_big=0.2"]), 18)
    assert qs.override(qs.FULL, ["big_sizes="]).big_sizes == ()
    # the search precision of the nearest-code rows (a speed knob): recorded and built only where set
    fast = {(r.family, r.log2_codes): r for r in qs.vqtok_rows(qs.override(qs.QUICK, ["vq_search=fast"]))}
    for fam in ("vq-plain", "vq-ema-kmeans-restart-rot", "vq-l2norm-dim3", "rvq-2x", "simvq"):
        assert fast[fam, 10].setup["search_precision"] == "fast", fam
        q = fast[fam, 10].build(qs.QUICK)
        assert all(m.search_precision == "fast" for m in q.modules() if hasattr(m, "search_precision"))
    assert all("search_precision" not in r.setup for r in qs.vqtok_rows(qs.QUICK))
    # the EMA decay of the VQ / RVQ rows: recorded and built only where set (SimVQ has no EMA)
    slow = {(r.family, r.log2_codes): r for r in qs.vqtok_rows(qs.override(qs.QUICK, ["vq_decay=0.9"]))}
    for fam in ("vq-ema-kmeans-restart-rot", "vq-l2norm-dim3", "rvq-2x"):
        assert slow[fam, 10].setup["decay"] == 0.9, fam
        decays = {m.decay for m in slow[fam, 10].build(qs.QUICK).modules() if hasattr(m, "cluster_size")}
        assert decays == {0.9}, fam
    assert "decay" not in slow["vq-plain", 10].setup and "decay" not in slow["simvq", 10].setup
    assert all("decay" not in r.setup for r in qs.vqtok_rows(qs.QUICK))
    # the EMA + k-means + restart row's estimator: the rotation trick (as its peer row), "-rot" in
    # its name; "ste" drops both; the other VQ / RVQ rows follow vq_estimator
    ema = {r.family: r for r in qs.vqtok_rows(qs.QUICK) if r.log2_codes == 10}
    assert ema["vq-ema-kmeans-restart-rot"].setup["estimator"] == "rotation"
    assert ema["vq-ema-kmeans-restart-rot"].build(qs.QUICK).estimator == "rotation"
    assert ema["rvq-2x"].setup["estimator"] == ema["vq-l2norm-dim3"].setup["estimator"] == "ste"
    ste = {r.family: r for r in qs.vqtok_rows(qs.override(qs.QUICK, ["vq_ema_estimator=ste"]))}
    assert ste["vq-ema-kmeans-restart"].setup["estimator"] == "ste" and "vq-ema-kmeans-restart-rot" not in ste
    # the FSQ rows' in-projection: orthogonal (vqtok's default), or nn.Linear's init (the peer's)
    # and the fsq-entropy rows' (nn.Linear's by default)
    default = {r.family: r for r in qs.vqtok_rows(qs.QUICK) if r.log2_codes == 10}
    assert default["fsq"].setup["proj_init"] == "orthogonal" and default["fsq-entropy"].setup["proj_init"] == "linear"
    for how in ("orthogonal", "linear"):
        fsq = {r.family: r for r in qs.vqtok_rows(qs.override(qs.QUICK, [f"fsq_proj_init={how}",
                                                                           f"fsq_entropy_proj_init={how}"]))
               if r.log2_codes == 10}
        for fam in ("fsq", "fsq-entropy"):
            assert fsq[fam].setup["proj_init"] == how and fsq[fam].build(qs.QUICK).proj_init == how
    # the FSQ rows' dither: off by default, FSQ(noise=...) and "dither p" in the setup with fsq_noise
    assert "noise" not in default["fsq"].setup and default["fsq"].build(qs.QUICK).noise == 0
    dith = {r.family: r for r in qs.vqtok_rows(qs.override(qs.QUICK, ["fsq_noise=0.5"])) if r.log2_codes == 10}
    assert dith["fsq"].setup["noise"] == 0.5 and dith["fsq"].build(qs.QUICK).noise == 0.5
    assert "noise" not in dith["fsq-entropy"].setup
    # the l2-normalised rows' code dimension: in the family's name, built with it
    d8 = {(r.family, r.log2_codes): r for r in qs.vqtok_rows(qs.override(qs.QUICK, ["l2norm_dim=8"]))}
    assert d8["vq-l2norm-dim8", 10].setup["codebook_dim"] == 8 and ("vq-l2norm-dim3", 10) not in d8
    assert d8["vq-l2norm-dim8", 10].build(qs.QUICK).codebook_dim == 8
    for bad, match in (("nope=1", "KEY=VALUE"), ("seed", "KEY=VALUE"), ("steps=many", "int"),
                       ("held_in_usage=maybe", "bool")):
        with pytest.raises(ValueError, match=match):
            qs.override(qs.FULL, [bad])


def test_learning_rate_schedules(qs):
    cfg = dataclasses.replace(qs.FULL, lr_decay="constant")
    assert {qs.learning_rate(cfg, s, 100) for s in (0, 50, 99)} == {cfg.lr}
    cos = dataclasses.replace(cfg, lr_decay="cosine", lr_final=0.1)
    assert (qs.FULL.lr_decay, qs.FULL.lr_final) == ("cosine", 0.1)  # the study's schedule
    lrs = [qs.learning_rate(cos, s, 101) for s in range(101)]
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[50] == pytest.approx(0.55 * cfg.lr)
    assert lrs[-1] == pytest.approx(0.1 * cfg.lr) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="lr_decay"):
        qs.learning_rate(dataclasses.replace(cfg, lr_decay="step"), 0, 10)


def test_peer_vq_held_out_indices_are_its_nearest_codes(qs):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    peer = qs.PeerAdapter(vqp.VectorQuantize(dim=4, codebook_size=64, kmeans_init=True, rotation_trick=True), 64, True)
    peer.train()
    peer(torch.randn(8, 4, 6, 6))  # k-means init and an EMA step
    peer.eval()
    z = torch.randn(70, 4, 5, 5)
    assert peer._codebook() is not None
    idx = peer.encode(z)
    assert peer.encode_checked and idx.shape == (70, 5, 5)
    with torch.no_grad():
        own, fast = peer._module_forward(z), peer(z)  # eval forward: nearest_code + code vectors
        assert torch.equal(idx, own.indices) and torch.equal(fast.indices, own.indices)
        torch.testing.assert_close(fast.quantized, own.quantized)
        assert float(fast.loss) == 0
    shifted = peer.module._codebook.embed.data[0] - torch.tensor([2.0, 0, 0, 0])
    peer.encode_checked = False  # the check refuses indices the module's own forward disagrees with
    peer._codebook = lambda: shifted
    with pytest.raises(RuntimeError, match="agrees"):
        peer.encode(z)
    del peer._codebook
    fsq = qs.PeerAdapter(vqp.FSQ(levels=[5, 5], dim=4), 25, False).eval()
    assert fsq._codebook() is None and torch.equal(fsq.encode(z), fsq(z).indices)  # its own forward


def test_running_standardize_is_the_same_in_training_and_evaluation(qs):
    torch.manual_seed(0)
    norm = qs.RunningStandardize(3, momentum=0.25)
    a = torch.randn(6, 3, 4, 5) * torch.tensor([2.0, 0.5, 1.0])[:, None, None] + 3
    y = norm(a)  # the first batch sets the statistics: exactly standardised
    var, mean = torch.var_mean(a, dim=(0, 2, 3))
    torch.testing.assert_close(norm.mean, mean)
    torch.testing.assert_close(norm.var, var)
    torch.testing.assert_close(y, (a - mean[:, None, None]) / (var[:, None, None] + 1e-5).sqrt())
    b = torch.randn(6, 3, 4, 5)
    y_train = norm(b)  # later batches move the statistics by momentum, then apply them
    var_b, mean_b = torch.var_mean(b, dim=(0, 2, 3))
    torch.testing.assert_close(norm.mean, 0.75 * mean + 0.25 * mean_b)
    torch.testing.assert_close(norm.var, 0.75 * var + 0.25 * var_b)
    norm.eval()
    torch.testing.assert_close(norm(b), y_train)  # evaluation applies the same statistics
    assert int(norm.num_batches_tracked) == 2
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    g = torch.randn(2, 3, 4, 4)
    norm.train()
    norm(x).backward(g)  # the gradient is BatchNorm's times r = sigma_batch / sigma
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.batch_norm(x2, None, None, training=True, eps=1e-5).backward(g)
    r = (x.detach().var(dim=(0, 2, 3), correction=0) + 1e-5).sqrt() / (norm.var + 1e-5).sqrt()
    torch.testing.assert_close(x.grad, x2.grad * r[None, :, None, None])
    x.grad = None
    norm(x).sum().backward()  # no gradient along the batch mean
    assert x.grad.abs().max() < 1e-5
    with pytest.raises(ValueError, match="norm"):
        qs.StudyAE(torch.nn.Identity(), 4, 8, norm="layer")


@pytest.mark.parametrize("norm", ["running", "batch"])
def test_latent_momentum_reaches_the_standardisation(qs, norm):
    """--set latent_momentum=M: a row's latent standardisation moves its running statistics by M
    towards each batch; 0.1 by default."""
    row = [r for r in qs.vqtok_rows(qs.QUICK) if r.family == "fsq"][0]
    for m in (None, 0.01):
        cfg = qs.override(dataclasses.replace(qs.QUICK, latent_norm=norm), [] if m is None else [f"latent_momentum={m}"])
        assert qs.build_model(row, cfg).latent_norm.momentum == (0.1 if m is None else m)
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="momentum"):
            qs.StudyAE(torch.nn.Identity(), 4, 8, norm=norm, momentum=bad)


def test_latent_momentum_can_follow_the_learning_rate(qs):
    """latent_momentum_decay="lr": the standardisation's momentum is latent_momentum x lr_t / lr at each
    step, so with the cosine it ends at latent_momentum x lr_final."""
    cfg = qs.override(dataclasses.replace(qs.QUICK, steps=3), ["latent_momentum_decay=lr"])
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "fsq"][0]
    r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held, keep=True)
    assert r["model"].latent_norm.momentum == pytest.approx(cfg.latent_momentum * cfg.lr_final)
    constant = dataclasses.replace(cfg, latent_momentum_decay="constant")
    r = qs.run_row(row, constant, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held, keep=True)
    assert r["model"].latent_norm.momentum == cfg.latent_momentum
    with pytest.raises(ValueError, match="latent_momentum_decay"):
        qs.run_row(row, dataclasses.replace(cfg, latent_momentum_decay="cosine"), qs.Crops(photos, cfg.crop, 0),
                   qs.tiles(held, cfg.eval_tile)[:4], held)


@pytest.mark.parametrize("norm", ["running", "batch"])
def test_latent_norm_choice(qs, norm):
    cfg = dataclasses.replace(qs.QUICK, steps=3, latent_norm=norm)
    photos = qs.photo_set(qs.TRAIN_PHOTOS[:1], cfg.scales)
    held = qs.photo_set(qs.EVAL_PHOTOS[:1], cfg.scales)
    row = [r for r in qs.vqtok_rows(cfg) if r.family == "fsq"][0]
    r = qs.run_row(row, cfg, qs.Crops(photos, cfg.crop, 0), qs.tiles(held, cfg.eval_tile)[:4], held)
    assert r["steps"] == 3 and r["latent_stats_batches"] == 3


@pytest.fixture(scope="module")
def unused():
    return load_script("benchmarks/study_unused_codes.py")


def test_unused_codes_restart_record_and_nearest_code(unused):
    from vqtok.quantizers import build_quantizer

    torch.manual_seed(0)
    for threshold, expect in ((1e9, [1, 2]), (1e-30, [-1, -1])):  # every code dead each step / never
        q = build_quantizer("vq", dim=4, codebook_size=16, learning="ema", dead_code_threshold=threshold)
        last = unused.record_restarts(q)
        q.train()
        for step in expect:
            q(torch.randn(32, 4))
            assert (last == step).all()
    with pytest.raises(ValueError, match="single-codebook"):
        unused.record_restarts(build_quantizer("rvq", dim=4, codebook_size=8, num_quantizers=2))
    codes = torch.randn(300, 5)
    dist, idx = unused.nearest_other(codes, block=64)
    full = torch.cdist(codes, codes).fill_diagonal_(torch.inf)
    assert torch.equal(idx, full.argmin(1)) and torch.allclose(dist, full.min(1).values)


def test_unused_codes_report_partitions_the_codebook(unused, tmp_path, capsys):
    out = tmp_path / "unused.json"
    row = "vq-ema-kmeans-restart-rot/vqtok/2^10"
    assert unused.main(["--row", row, "--quick", "--set", "steps=6", "--set", "probe_steps=1", "--crops", "40",
                        "--json", str(out)]) == 0
    assert row in capsys.readouterr().out
    res = json.loads(out.read_text())
    r, groups = res["row"], {g["codes"]: g for g in res["groups"]}
    k = 2**10
    assert sum(g["n"] for g in groups.values()) == k
    assert groups["unused held-in"]["n"] == round((1 - r["held_in_usage"]) * k)
    assert groups["used on both"]["n"] <= round(r["usage"] * k)
    assert r["fresh_crop_tokens"] == 40 * 64 and r["steps"] == 6 and r["restarts"] > 0
    assert 0 < r["fresh_crop_usage_train_latent"] <= 1
    assert all(0 <= g["train_mode_hits"] <= g["n"] for g in groups.values() if g["n"])
    restarted = [g for g in groups.values() if g["n"] and g["last_restart_median"] is not None]
    assert restarted and all(1 <= g["last_restart_median"] <= 6 for g in restarted)
    assert sum(g["n"] - g["never_restarted"] for g in groups.values() if g["n"]) > 0
    for bad in ("fsq/vqtok/2^10", "no-such-row/vqtok/2^10"):
        with pytest.raises(SystemExit):
            unused.main(["--row", bad, "--quick"])


def test_unused_codes_train_mode_latent_on_a_copy(unused):
    """fresh_crop_counts(train_latent=True) standardises the latent as in training (running statistics
    moving towards each batch: here from their init, so the codes picked differ from eval mode's) on a
    copy: the model's own statistics do not move."""
    from vqtok.quantizers import build_quantizer

    qs = unused.qs
    torch.manual_seed(0)
    model = qs.StudyAE(build_quantizer("vq", dim=16, codebook_size=64), 16, 8)
    photos = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {k: v.clone() for k, v in model.latent_norm.state_dict().items()}
    counts = {mode: unused.fresh_crop_counts(model, qs.Crops(photos, 32, 5), 30, 8, train_latent=mode)
              for mode in (False, True)}
    assert all(int(c.sum()) == 30 * 64 for c in counts.values())
    assert not torch.equal(counts[False], counts[True])
    assert all(torch.equal(v, before[k]) for k, v in model.latent_norm.state_dict().items())
    assert not model.latent_norm.training
