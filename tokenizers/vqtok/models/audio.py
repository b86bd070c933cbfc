"""1-D convolutional waveform encoder/decoder in the style of SoundStream (Zeghidour et al., 2021)
and DAC (Kumar et al., "High-Fidelity Audio Compression with Improved RVQGAN", 2023): a stack of
residual units with dilations 1, 3, 9 followed by a strided convolution per stage; the decoder
mirrors it with transposed convolutions. The hop (samples per token) is prod(strides).

Shapes: encoder [B, 1, T] -> [B, D, T/hop]; decoder the reverse. T must be a multiple of hop.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualUnit(nn.Module):
    """ELU -> dilated conv k7 -> ELU -> conv k1, plus the input. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(), nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            nn.ELU(), nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _down(cin: int, cout: int, stride: int) -> nn.Module:
    """[B, cin, T] -> [B, cout, T/stride] (T a multiple of stride)."""
    return nn.Conv1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2))


def _up(cin: int, cout: int, stride: int) -> nn.Module:
    """[B, cin, L] -> [B, cout, L*stride]."""
    return nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2),
                              output_padding=stride % 2)


class Encoder1d(nn.Module):
    """Channels double at every stage: channels * 2^i after stage i."""

    def __init__(self, in_channels: int, channels: int, strides: list[int], latent_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, channels, 7, padding=3)]
        c = channels
        for s in strides:
            layers += [ResidualUnit(c, 1), ResidualUnit(c, 3), ResidualUnit(c, 9), nn.ELU(), _down(c, 2 * c, s)]
            c *= 2
        layers += [nn.ELU(), nn.Conv1d(c, latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder1d(nn.Module):
    """Mirror of :class:`Encoder1d`; ``conv_out.weight`` is the adversarial last layer."""

    def __init__(self, out_channels: int, channels: int, strides: list[int], latent_dim: int):
        super().__init__()
        c = channels * 2 ** len(strides)
        layers: list[nn.Module] = [nn.Conv1d(latent_dim, c, 7, padding=3)]
        for s in reversed(strides):
            layers += [nn.ELU(), _up(c, c // 2, s)]
            c //= 2
            layers += [ResidualUnit(c, 1), ResidualUnit(c, 3), ResidualUnit(c, 9)]
        layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv1d(c, out_channels, 7, padding=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))


def audio_token_grid(input_shape: tuple[int, ...], strides: list[int]) -> tuple[int]:
    """Token grid of a waveform [C, T]: (T / prod(strides),)."""
    hop = math.prod(strides)
    t = input_shape[-1]
    if t % hop:
        raise ValueError(f"audio length {t} is not a multiple of the hop prod(model.strides)={hop}")
    return (t // hop,)
