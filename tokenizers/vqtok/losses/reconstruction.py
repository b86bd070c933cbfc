"""Pixel/sample reconstruction losses and the multi-resolution STFT loss (Yamamoto et al.,
"Parallel WaveGAN", 2020; used by EnCodec/DAC)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean L1 or L2 error over all elements (computed in fp32). Any matching shapes."""
    r, t = recon.float(), target.float()
    if kind == "l1":
        return (r - t).abs().mean()
    if kind == "l2":
        return F.mse_loss(r, t)
    raise ValueError(f"loss.rec must be 'l1' or 'l2', got {kind!r}")


def multi_resolution_stft_loss(recon: torch.Tensor, target: torch.Tensor,
                               fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64),
                               eps: float = 1e-5) -> torch.Tensor:
    """Spectral convergence + log-magnitude L1, averaged over FFT sizes (hop = n/4, Hann window).

    recon, target: [B, C, T] or [B, T] waveforms; FFT sizes larger than T are skipped.
    """
    r = recon.float().reshape(-1, recon.shape[-1])
    t = target.float().reshape(-1, target.shape[-1])
    sizes = [n for n in fft_sizes if n <= r.shape[-1]]
    if not sizes:
        raise ValueError(f"no STFT size in {tuple(fft_sizes)} fits a waveform of length {r.shape[-1]}")
    total = r.new_zeros(())
    for n in sizes:
        win = torch.hann_window(n, device=r.device)
        mr = torch.stft(r, n, hop_length=n // 4, window=win, return_complex=True).abs()
        mt = torch.stft(t, n, hop_length=n // 4, window=win, return_complex=True).abs()
        sc = torch.linalg.vector_norm(mt - mr) / (torch.linalg.vector_norm(mt) + eps)
        mag = (torch.log(mr + eps) - torch.log(mt + eps)).abs().mean()
        total = total + sc + mag
    return total / len(sizes)
