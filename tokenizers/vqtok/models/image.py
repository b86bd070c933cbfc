"""2-D convolutional encoder/decoder in the style of VQGAN (Esser et al., "Taming Transformers",
2021): ResNet blocks per resolution, strided down-sampling, nearest up-sampling, optional mid
attention. Down-sampling factor f = 2^(len(channel_mult) - 1): 4, 8 or 16 in the presets.

Shapes: encoder [B, in_ch, H, W] -> [B, latent_dim, H/f, W/f]; decoder the reverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, ResBlock, conv_nd, group_norm


def _conv2d(cin: int, cout: int, kernel: int) -> nn.Module:
    return conv_nd(2, cin, cout, kernel)


class Downsample2d(nn.Module):
    """Stride-2 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2] (H, W even)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2d(nn.Module):
    """Nearest x2 then 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, attention: bool) -> nn.Sequential:
    layers = [ResBlock(channels, channels, _conv2d)]
    if attention:
        layers.append(AttnBlock(channels))
    layers.append(ResBlock(channels, channels, _conv2d))
    return nn.Sequential(*layers)


class Encoder2d(nn.Module):
    """VQGAN encoder. ``channel_mult[i] * channels`` features at resolution level i."""

    def __init__(self, in_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_dim: int, attention: bool = False):
        super().__init__()
        self.downsample = 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, channels * channel_mult[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = channels * channel_mult[0]
        for level, mult in enumerate(channel_mult):
            cout = channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout, _conv2d))
                cin = cout
            if level < len(channel_mult) - 1:
                blocks.append(Downsample2d(cin))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(cin, attention)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, latent_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder2d(nn.Module):
    """VQGAN decoder, the mirror of :class:`Encoder2d`. ``conv_out.weight`` is the last layer used
    by the adaptive adversarial weight."""

    def __init__(self, out_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_dim: int, attention: bool = False):
        super().__init__()
        cin = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(latent_dim, cin, 3, padding=1)
        self.mid = _mid(cin, attention)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            cout = channels * channel_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout, _conv2d))
                cin = cout
            if level > 0:
                blocks.append(Upsample2d(cin))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def image_token_grid(input_shape: tuple[int, ...], downsample: int) -> tuple[int, int]:
    """Token grid of an image [C, H, W]: (H/f, W/f); H and W must be multiples of f."""
    h, w = input_shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} is not a multiple of the down-sampling factor {downsample}")
    return h // downsample, w // downsample


def check_downsample(downsample: int, channel_mult: list[int]) -> None:
    if downsample < 1 or 2 ** int(math.log2(downsample)) != downsample:
        raise ValueError(f"model.downsample must be a power of two, got {downsample}")
    if 2 ** (len(channel_mult) - 1) != downsample:
        raise ValueError(f"model.channel_mult has {len(channel_mult)} levels, which gives down-sampling "
                         f"{2 ** (len(channel_mult) - 1)}, not model.downsample={downsample}")
