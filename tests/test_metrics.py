"""Metrics against independent oracles: scikit-image SSIM/PSNR on real photos, numpy statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqtok.metrics import psnr, ssim


def _photo_pair(name: str, size: int = 96, noise: float = 0.1, seed: int = 0):
    """A real photo crop in [-1, 1] and a degraded copy (noise + blur), as [1, 3, H, W] float32."""
    img = getattr(skdata, name)()[:size, : size + 13, :3].astype(np.float32) / 127.5 - 1.0
    rng = np.random.default_rng(seed)
    deg = np.clip(0.8 * img + 0.2 * np.roll(img, 1, axis=1) + noise * rng.standard_normal(img.shape), -1, 1)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()  # noqa: E731
    return to_t(img), to_t(deg.astype(np.float32))


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return structural_similarity(
        a.double().numpy(), b.double().numpy(), data_range=2.0, channel_axis=0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_ssim_matches_skimage_on_photos(name):
    x, y = _photo_pair(name)
    ours = ssim(x, y).item()
    assert ours == pytest.approx(_sk_ssim(x[0], y[0]), abs=1e-3)
    assert 0.0 < ours < 0.99  # the degradation is visible


def test_ssim_per_sample_batch_and_identity():
    pairs = [_photo_pair(n, noise=s) for n, s in (("astronaut", 0.05), ("chelsea", 0.3), ("coffee", 0.15))]
    x = torch.cat([p[0] for p in pairs])
    y = torch.cat([p[1] for p in pairs])
    ours = ssim(x, y)
    assert ours.shape == (3,)
    for i in range(3):
        assert ours[i].item() == pytest.approx(_sk_ssim(x[i], y[i]), abs=1e-3)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # chunking does not change the answer
    assert torch.allclose(ssim(x, y, chunk=1), ours)


def test_ssim_video_is_mean_over_frames():
    a, b = _photo_pair("astronaut", size=48)
    c, d = _photo_pair("rocket", size=48, noise=0.3)
    video_x = torch.stack([a[0], c[0]], 1)[None]  # [1, 3, T=2, H, W]
    video_y = torch.stack([b[0], d[0]], 1)[None]
    expect = (_sk_ssim(a[0], b[0]) + _sk_ssim(c[0], d[0])) / 2
    assert ssim(video_x, video_y).item() == pytest.approx(expect, abs=1e-3)


def test_psnr_matches_skimage_and_caps_exact():
    x, y = _photo_pair("coffee")
    expect = peak_signal_noise_ratio(x.double().numpy(), y.double().numpy(), data_range=2.0)
    assert psnr(x, y).item() == pytest.approx(expect, abs=1e-6)
    assert psnr(x, x).item() == pytest.approx(100.0)
    audio = torch.zeros(2, 1, 100)
    assert torch.allclose(psnr(audio, audio + 0.02), torch.full((2,), 10 * np.log10(4 / 0.0004), dtype=torch.float64))


def test_metric_argument_errors():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="H and W >= 11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))
    with pytest.raises(TypeError, match="floating-point"):
        psnr(torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)


# --------------------------------------------------------------------------------------------
# streaming accumulators
# --------------------------------------------------------------------------------------------
from vqtok.metrics.accumulate import CountAccumulator, GaussianAccumulator, MeanAccumulator  # noqa: E402
from vqtok.metrics.fid import FIDAccumulator, frechet_distance  # noqa: E402


def test_mean_and_count_accumulators_stream():
    vals = torch.randn(1000, dtype=torch.float64)
    acc = MeanAccumulator()
    for chunk in vals.split(77):
        acc.update(chunk)
    assert acc.count == 1000
    assert acc.compute() == pytest.approx(vals.mean().item(), abs=1e-12)
    assert np.isnan(MeanAccumulator().compute())
    with pytest.raises(ValueError, match="non-finite"):
        acc.update(torch.tensor([float("inf")]))
    ids = torch.randint(0, 10, (500,))
    cnt = CountAccumulator(10)
    for chunk in ids.split(33):
        cnt.update(chunk)
    assert torch.equal(cnt.counts, torch.bincount(ids, minlength=10))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cnt.update(torch.tensor([10]))


def test_gaussian_accumulator_matches_numpy():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 7)) @ rng.standard_normal((7, 7)) + 3.0
    acc = GaussianAccumulator(7)
    for s in range(0, 300, 64):
        acc.update(torch.from_numpy(feats[s : s + 64]))
    mean, cov = acc.compute()
    np.testing.assert_allclose(mean.numpy(), feats.mean(0), atol=1e-10)
    np.testing.assert_allclose(cov.numpy(), np.cov(feats, rowvar=False), atol=1e-9)
    with pytest.raises(ValueError, match=r"\[B, 7\]"):
        acc.update(torch.zeros(2, 6))


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((200, 6)), rng.standard_normal((200, 6)) * 1.5 + 0.3
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(c1 @ c2).real
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
    t = torch.from_numpy
    assert frechet_distance(t(mu1), t(c1), t(mu2), t(c2)) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(t(mu1), t(c1), t(mu1), t(c1)) == pytest.approx(0.0, abs=1e-9)


def test_fid_accumulator_streams_features():
    """FIDAccumulator with a fixed linear feature map: equals the distance of the full-set statistics."""
    torch.manual_seed(3)
    proj = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 5))
    real = torch.rand(40, 3, 12, 12) * 2 - 1
    recon = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1)
    acc = FIDAccumulator(proj, dim=5, chunk=7)
    for s in range(0, 40, 16):
        acc.update(real[s : s + 16], recon[s : s + 16])
    with torch.no_grad():
        fr, ff = proj(real).double().numpy(), proj(recon).double().numpy()
    t = torch.from_numpy
    expect = frechet_distance(t(fr.mean(0)), t(np.cov(fr, rowvar=False)), t(ff.mean(0)), t(np.cov(ff, rowvar=False)))
    assert acc.count == 40
    assert acc.compute() == pytest.approx(expect, rel=1e-6)


# --------------------------------------------------------------------------------------------
# LPIPS / FID: real weights only; random backbones exercise the code path and are kept apart
# --------------------------------------------------------------------------------------------
from vqtok.metrics.fid import FID_WEIGHTS_FILE, FIDInceptionV3, load_fid_extractor  # noqa: E402
from vqtok.metrics.perceptual import LPIPS_BACKBONE_FILES, LPIPSMetric, Unavailable, load_lpips  # noqa: E402


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with no checkpoints: what this offline machine has."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_lpips_and_fid_unavailable_without_weights(empty_hub):
    lp = load_lpips("alex")
    assert isinstance(lp, Unavailable)
    assert lp.path == str(empty_hub / LPIPS_BACKBONE_FILES["alex"])
    assert "alexnet-owt-7be5be79.pth" in str(lp)
    fid = load_fid_extractor()
    assert isinstance(fid, Unavailable) and fid.path == str(empty_hub / FID_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="net must be one of"):
        load_lpips("resnet")


def test_lpips_code_path_with_random_backbone():
    """Code path only (random AlexNet backbone, real linear layers): shapes, identity, frames, monotonicity."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = LPIPSMetric(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False), real_weights=False, chunk=2)
    x, y = _photo_pair("astronaut", size=64, noise=0.05)
    _, y2 = _photo_pair("astronaut", size=64, noise=0.5)
    batch_x, batch_y = torch.cat([x, x, x]), torch.cat([x, y, y2])
    d = metric(batch_x, batch_y)
    assert d.shape == (3,) and d[0].item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < d[1] < d[2]
    video = metric(torch.stack([x[0], x[0]], 1)[None], torch.stack([y[0], y2[0]], 1)[None])
    assert video.item() == pytest.approx((d[1] + d[2]).item() / 2, rel=1e-5)


def test_fid_inception_loads_from_hub_cache(empty_hub):
    """The loader finds the file in the hub cache and loads it strictly (random weights written here)."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    assert "fc.weight" in model.state_dict() and model.state_dict()["fc.weight"].shape == (1008, 2048)
    empty_hub.mkdir(parents=True)
    torch.save(model.state_dict(), empty_hub / FID_WEIGHTS_FILE)
    loaded = load_fid_extractor()
    assert isinstance(loaded, FIDInceptionV3)
    x = torch.rand(2, 3, 40, 52) * 2 - 1
    f = loaded(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    assert torch.allclose(f, model(x))


def _ddp_worker(rank: int, world: int, port: int, vals, feats, ids, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mean, gauss, cnt = MeanAccumulator(), GaussianAccumulator(feats.shape[1]), CountAccumulator(8)
        mean.update(vals[rank::world])
        gauss.update(feats[rank::world])
        cnt.update(ids[rank::world])
        for acc in (mean, gauss, cnt):
            acc.all_reduce()
        if rank == 0:
            torch.save({"mean": mean.compute(), "gauss": gauss.compute(), "counts": cnt.counts}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_accumulators_all_reduce_under_ddp(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vals, feats = torch.randn(101, dtype=torch.float64), torch.randn(90, 4, dtype=torch.float64)
    ids = torch.randint(0, 8, (77,))
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, vals, feats, ids, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["mean"] == pytest.approx(vals.mean().item(), abs=1e-12)
    ref = GaussianAccumulator(4)
    ref.update(feats)
    for a, b in zip(got["gauss"], ref.compute()):
        assert torch.allclose(a, b, atol=1e-10)
    assert torch.equal(got["counts"], torch.bincount(ids, minlength=8))


@pytest.mark.parametrize("h,w", [(11, 11), (64, 64), (40, 400), (385, 30), (520, 384)])
def test_gaussian_filter_matches_float64_convolution(h, w):
    """Both filter strategies (banded product up to _BANDED_MAX px an axis, shifted sums beyond)
    equal the separable float64 convolution they replace (both, on the axes here)."""
    import torch.nn.functional as F

    from vqtok.metrics.reconstruction import _filter2d, gaussian_window

    t = torch.randn(3, 2, h, w, generator=torch.Generator().manual_seed(h * w), dtype=torch.float64)
    g = gaussian_window()
    k = g.numel()
    ref = F.conv2d(F.conv2d(t.reshape(6, 1, h, w), g.view(1, 1, k, 1)), g.view(1, 1, 1, k)).reshape(3, 2, h - k + 1, w - k + 1)
    out = _filter2d(t, g)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


def test_ssim_matches_skimage_past_the_banded_size():
    x, y = _photo_pair("astronaut", size=512)  # 512 x 512: the shifted-sum path on both axes
    assert x.shape[-2:] == (512, 512)
    assert ssim(x, y).item() == pytest.approx(_sk_ssim(x[0], y[0]), abs=1e-3)
