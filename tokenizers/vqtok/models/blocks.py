"""Building blocks shared by the 1-D, 2-D and 3-D autoencoders.

Everything is channel-first: 1-D ``[B, C, T]``, 2-D ``[B, C, H, W]``, 3-D ``[B, C, T, H, W]``.
``dims`` selects the convolution; the video model passes its own causal convolution and
per-frame normalisation through ``conv``/``norm`` factories.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None) -> nn.Module:
    """A plain ``dims``-D convolution with 'same' padding by default."""
    pad = kernel // 2 if padding is None else padding
    return _CONV[dims](cin, cout, kernel, stride=stride, padding=pad)


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` (GroupNorm needs one)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Pre-activation residual block (VQGAN): norm -> SiLU -> conv -> norm -> SiLU -> conv, + skip.

    ``conv(cin, cout, kernel)`` and ``norm(channels)`` are factories so the same block serves 1-D,
    2-D and causal 3-D models. Shape: [B, cin, *S] -> [B, cout, *S].
    """

    def __init__(self, cin: int, cout: int, conv: Callable[..., nn.Module], norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv(cin, cout, 3)
        self.norm2, self.conv2 = norm(cout), conv(cout, cout, 3)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a 2-D map (VQGAN's mid attention).

    Shape: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def default_channel_mult(levels: int) -> list[int]:
    """Channel multipliers for ``levels`` resolutions: 1, 1, 2, 2, 4, 4, ... (VQGAN f16: 1,1,2,2,4)."""
    return [1 << (i // 2) for i in range(levels)]
