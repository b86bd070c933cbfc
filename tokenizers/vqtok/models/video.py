"""Causal 3-D convolutional encoder/decoder in the style of MAGVIT-v2 (Yu et al., "Language Model
Beats Diffusion — Tokenizer is Key to Visual Generation", 2024).

Every convolution is causal in time (padded only on the past side) and normalisation is per frame,
so output frame t depends only on input frames <= t. The first frame is therefore encoded alone:
a clip of T = 1 + k * time_downsample frames becomes 1 + k latent frames, and latent frame 0 is
exactly the encoding of frame 0 as a single-frame clip (an image).

Shapes: encoder [B, C, T, H, W] -> [B, D, 1 + (T-1)/ft, H/f, W/f]; decoder the reverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, ResBlock, group_norm


class CausalConv3d(nn.Module):
    """3-D convolution padded (k-1) frames on the past side in time and k//2 in space.

    With stride s_t in time, T = 1 + s_t*m input frames give 1 + m output frames and output frame 0
    sees only input frame 0.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.space_pad = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        return self.conv(F.pad(x, (p, p, p, p, self.time_pad, 0)))


class FrameNorm(nn.Module):
    """GroupNorm applied to each frame separately (keeps the model causal). [B, C, T, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class FrameAttn(nn.Module):
    """Spatial self-attention within each frame (causal by construction). [B, C, T, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.attn = AttnBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.attn(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def _conv3d(cin: int, cout: int, kernel: int) -> nn.Module:
    return CausalConv3d(cin, cout, kernel)


def _res(cin: int, cout: int) -> ResBlock:
    return ResBlock(cin, cout, _conv3d, FrameNorm)


class CausalUpsample3d(nn.Module):
    """x2 in space (nearest), optionally x2 in time: every latent frame becomes two and the first
    copy of frame 0 is dropped, so 1 + m frames -> 1 + 2m. Then a causal 3x3x3 convolution."""

    def __init__(self, channels: int, time: bool):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(2.0 if self.time else 1.0, 2.0, 2.0), mode="nearest")
        if self.time:
            x = x[:, :, 1:]
        return self.conv(x)


def _time_levels(time_downsample: int, levels: int) -> int:
    n = int(math.log2(time_downsample)) if time_downsample >= 1 else -1
    if n < 0 or 2**n != time_downsample:
        raise ValueError(f"model.time_downsample must be a power of two, got {time_downsample}")
    if n > levels - 1:
        raise ValueError(f"model.time_downsample={time_downsample} needs at least {n + 1} levels in model.channel_mult")
    return n


class Encoder3d(nn.Module):
    """Causal video encoder; the first log2(time_downsample) down-sampling steps also halve time."""

    def __init__(self, in_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_dim: int, time_downsample: int = 4, attention: bool = False):
        super().__init__()
        n_time = _time_levels(time_downsample, len(channel_mult))
        cin = channels * channel_mult[0]
        self.conv_in = CausalConv3d(in_channels, cin, 3)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(channel_mult):
            cout = channels * mult
            for _ in range(num_res_blocks):
                blocks.append(_res(cin, cout))
                cin = cout
            if level < len(channel_mult) - 1:
                blocks.append(CausalConv3d(cin, cin, 3, stride=(2 if level < n_time else 1, 2, 2)))
        self.down = nn.Sequential(*blocks)
        mid = [_res(cin, cin)] + ([FrameAttn(cin)] if attention else []) + [_res(cin, cin)]
        self.mid = nn.Sequential(*mid)
        self.norm_out = FrameNorm(cin)
        self.conv_out = CausalConv3d(cin, latent_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3d(nn.Module):
    """Causal video decoder, the mirror of :class:`Encoder3d`."""

    def __init__(self, out_channels: int, channels: int, channel_mult: list[int], num_res_blocks: int,
                 latent_dim: int, time_downsample: int = 4, attention: bool = False):
        super().__init__()
        n_time = _time_levels(time_downsample, len(channel_mult))
        cin = channels * channel_mult[-1]
        self.conv_in = CausalConv3d(latent_dim, cin, 3)
        mid = [_res(cin, cin)] + ([FrameAttn(cin)] if attention else []) + [_res(cin, cin)]
        self.mid = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(channel_mult))):
            cout = channels * channel_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(_res(cin, cout))
                cin = cout
            if level > 0:
                blocks.append(CausalUpsample3d(cin, time=(level - 1) < n_time))
        self.up = nn.Sequential(*blocks)
        self.norm_out = FrameNorm(cin)
        self.conv_out = CausalConv3d(cin, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def video_token_grid(input_shape: tuple[int, ...], downsample: int, time_downsample: int) -> tuple[int, int, int]:
    """Token grid of a clip [C, T, H, W]: (1 + (T-1)/ft, H/f, W/f)."""
    t, h, w = input_shape[-3:]
    if (t - 1) % time_downsample:
        raise ValueError(f"clip length {t} must be 1 + a multiple of model.time_downsample={time_downsample}")
    if h % downsample or w % downsample:
        raise ValueError(f"frame size {h}x{w} is not a multiple of the down-sampling factor {downsample}")
    return 1 + (t - 1) // time_downsample, h // downsample, w // downsample
