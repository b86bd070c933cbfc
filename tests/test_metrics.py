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
