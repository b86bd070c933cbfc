"""Discriminators for the adversarial loss.

* :class:`PatchDiscriminator` — PatchGAN (Isola et al., "pix2pix", 2017; as used by VQGAN), 2-D for
  images and 3-D for video: strided 4x4 convolutions ending in a map of real/fake logits.
* :class:`STFTDiscriminator` — multi-scale STFT discriminator for audio (EnCodec, Défossez et al.
  2022): one 2-D conv stack per STFT resolution on the complex spectrogram.

Each ``forward(x)`` returns a list of logit tensors (one for PatchGAN, one per scale for STFT);
GroupNorm instead of BatchNorm so that training under DDP needs no synchronised batch statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import group_norm


class PatchDiscriminator(nn.Module):
    """PatchGAN over [B, C, H, W] (dims=2) or [B, C, T, H, W] (dims=3) -> [[B, 1, *patches]]."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, dims: int = 2):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")

        def conv(cin: int, cout: int, stride: int) -> nn.Module:
            if dims == 2:
                return nn.Conv2d(cin, cout, 4, stride=stride, padding=1)
            # video: 3-frame temporal kernel, no temporal stride (clips are short)
            return nn.Conv3d(cin, cout, (3, 4, 4), stride=(1, stride, stride), padding=1)

        seq: list[nn.Module] = [conv(in_channels, channels, 2), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            cout = channels * min(2**i, 8)
            seq += [conv(c, cout, 2 if i < layers else 1), group_norm(cout), nn.LeakyReLU(0.2)]
            c = cout
        seq.append(conv(c, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


class _SpecNet(nn.Module):
    """2-D conv stack on one spectrogram [B, 2, frames, bins] -> logits [B, 1, frames', bins']."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(2, c, (3, 9), padding=(1, 4)), nn.LeakyReLU(0.2),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4)), nn.LeakyReLU(0.2),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4)), nn.LeakyReLU(0.2),
            nn.Conv2d(c, c, (3, 3), padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 1, (3, 3), padding=1),
        )

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.net(spec)


class STFTDiscriminator(nn.Module):
    """Multi-scale STFT discriminator on waveforms [B, 1, T] -> one logit map per FFT size."""

    def __init__(self, channels: int = 32, fft_sizes: tuple[int, ...] = (2048, 1024, 512)):
        super().__init__()
        self.fft_sizes = tuple(fft_sizes)
        self.nets = nn.ModuleList(_SpecNet(channels) for _ in self.fft_sizes)
        for n in self.fft_sizes:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        wav = x.reshape(-1, x.shape[-1]).float()
        outs = []
        for n, net in zip(self.fft_sizes, self.nets):
            if n // 2 >= wav.shape[-1]:  # too long for this clip (reflect padding needs n/2 < T)
                continue
            spec = torch.stft(wav, n, hop_length=n // 4, window=getattr(self, f"window_{n}"), return_complex=True)
            spec = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, 2, frames, bins)
            outs.append(net(spec))
        return outs


def build_discriminator(modality: str, channels: int = 64, layers: int = 3) -> nn.Module:
    """The discriminator matching a modality: PatchGAN 2-D (image), 3-D (video), STFT (audio)."""
    if modality == "image":
        return PatchDiscriminator(3, channels, layers, dims=2)
    if modality == "video":
        return PatchDiscriminator(3, channels, layers, dims=3)
    if modality == "audio":
        return STFTDiscriminator(channels)
    raise ValueError(f"unknown modality {modality!r}; expected image, video or audio")
