"""Pixel-level reconstruction metrics: PSNR and SSIM, one value per sample (for streaming means).

Inputs are batches in [-1, 1] (the range every vqtok dataset produces), so the default
``data_range`` is 2.0. Layouts: images ``[B, C, H, W]``, video ``[B, C, T, H, W]`` (SSIM is the
mean over frames), audio ``[B, C, T]`` (PSNR only; SSIM is an image metric).

SSIM follows Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural
Similarity", with the settings of ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``: an 11x11 Gaussian window (truncate 3.5), K1=0.01,
K2=0.03, population covariance, the map cropped by the window radius (here: a "valid"
convolution, which is the same thing), averaged per channel and then over channels.
"""

from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim", "mse", "gaussian_window"]

# PSNR of an exact reconstruction is +inf; cap it so per-sample means stay finite.
PSNR_MAX_DB = 100.0


def _check_pair(x: torch.Tensor, y: torch.Tensor, min_ndim: int = 2) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}"
                            + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if t.ndim < min_ndim:
            raise ValueError(f"{name} must be a batch [B, C, ...] with at least {min_ndim} dims, "
                             f"got shape {tuple(t.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error. x, y [B, ...] -> float64 [B]."""
    _check_pair(x, y, min_ndim=1)
    d = x.detach().to(torch.float64) - y.detach().to(torch.float64)
    return d.reshape(d.shape[0], -1).pow(2).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample peak signal-to-noise ratio in dB. x, y [B, ...] -> float64 [B].

    ``10 log10(data_range^2 / mse)``, capped at ``PSNR_MAX_DB`` for (near-)exact reconstructions.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    err = mse(x, y)
    floor = data_range**2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    return 10.0 * torch.log10(data_range**2 / err.clamp_min(floor))


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps as scipy.ndimage builds them: radius int(truncate*sigma+0.5)."""
    radius = int(truncate * sigma + 0.5)
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (xs / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


# Up to this many pixels along an axis, the filter runs as one product with a banded matrix
# (BLAS, ~L multiply-adds a pixel); longer axes take 11 shifted multiply-adds a pixel. (float64
# convolutions have no oneDNN path in torch, and its im2col fallback was slower than either;
# benchmarks/bench_ssim.py --against times the whole metric against a revision.)
_BANDED_MAX = 384
# ssim filters at most this many pixels of frames at a time (at least one frame; ``chunk`` caps
# the frames): ~8 MiB of float64 moment maps, where 64 frames of 256 px would take ~400 MiB.
_CHUNK_PIXELS = 2**18


def _banded(length: int, w: torch.Tensor) -> torch.Tensor:
    """[length - k + 1, length]: row i holds the taps w at columns i .. i + k - 1 ('valid')."""
    k = w.numel()
    rows = length - k + 1
    band = torch.zeros(rows, length, dtype=w.dtype, device=w.device)
    cols = torch.arange(rows, device=w.device)[:, None] + torch.arange(k, device=w.device)[None]
    return band.scatter_(1, cols, w.expand(rows, k).contiguous())


def _filter_axis(t: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """'valid' 1-D filter of t along dim (-2 or -1) with taps w."""
    k, length = w.numel(), t.shape[dim]
    if length <= _BANDED_MAX:
        band = _banded(length, w)
        return band @ t if dim == -2 else t @ band.T
    out_len = length - k + 1
    out = t.narrow(dim, 0, out_len) * w[0]
    for i in range(1, k):
        out.add_(t.narrow(dim, i, out_len), alpha=float(w[i]))
    return out


def _filter2d(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of t [..., H, W] -> [..., H-2r, W-2r]."""
    return _filter_axis(_filter_axis(t, w, -2), w, -1)


def _as_frames(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, C, H, W] or [B, C, T, H, W] -> ([B*T, C, H, W], T)."""
    if x.ndim == 4:
        return x, 1
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t
    raise ValueError(f"ssim needs images [B, C, H, W] or video [B, C, T, H, W], got shape {tuple(x.shape)}")


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    *,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    chunk: int = 64,
) -> torch.Tensor:
    """Per-sample structural similarity. x, y [B, C, H, W] (or [B, C, T, H, W]) -> float64 [B].

    Matches ``skimage.metrics.structural_similarity(xi, yi, data_range=data_range, channel_axis=0,
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False)`` per sample (to ~1e-6 in
    float64). H and W must be at least the window size (11 for sigma 1.5). Computed in float64,
    at most ``chunk`` frames (and ~2^18 pixels) at a time to bound memory.
    """
    _check_pair(x, y, min_ndim=4)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    fx, frames = _as_frames(x.detach())
    fy, _ = _as_frames(y.detach())
    w = gaussian_window(sigma, dtype=torch.float64, device=x.device)
    size = w.numel()
    if min(fx.shape[-2:]) < size:
        raise ValueError(
            f"ssim needs H and W >= {size} (the Gaussian window for sigma={sigma}), got {tuple(fx.shape[-2:])}"
        )
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    c, h, wd = fx.shape[1:]
    step = max(1, min(chunk, _CHUNK_PIXELS // (c * h * wd)))  # frames a pass: bounded, cache-sized
    out = []
    for s in range(0, fx.shape[0], step):
        a = fx[s : s + step].to(torch.float64)
        b = fy[s : s + step].to(torch.float64)
        n = a.shape[0]
        a, b = a.reshape(n * c, h, wd), b.reshape(n * c, h, wd)
        # one filter pass over the four stacked moment maps: E[x], E[y], E[x^2 + y^2], E[xy]
        ux, uy, uss, uxy = _filter2d(torch.stack([a, b, torch.addcmul(a * a, b, b), a * b]), w)
        p = ux * uy
        s2 = torch.addcmul(ux * ux, uy, uy)  # ux^2 + uy^2
        num = (2 * p + c1).mul_((uxy - p).mul_(2).add_(c2))  # (2 ux uy + c1)(2 cov + c2)
        den = (s2 + c1).mul_(uss.sub_(s2).add_(c2))  # (ux^2 + uy^2 + c1)(var x + var y + c2)
        per_channel = num.div_(den).reshape(n, c, -1).mean(-1)  # [n, C]
        out.append(per_channel.mean(1))
    per_frame = torch.cat(out)
    return per_frame.reshape(-1, frames).mean(1)


def psnr_from_mse(mse_value: float, data_range: float = 2.0) -> float:
    """PSNR (dB) of a given mean squared error (e.g. a dataset-level MSE), capped like ``psnr``."""
    floor = data_range**2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    return 10.0 * math.log10(data_range**2 / max(mse_value, floor))
