"""The interface every vqtok quantizer implements (DESIGN.md "Modules contract")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._common import keep_fp32


@dataclass
class QuantizerOutput:
    """What ``Quantizer.forward`` returns.

    quantized: same shape and dtype as the input z; straight-through (or rotation-trick) gradient.
    indices:   int64 code ids, z's shape without the channel dim (residual quantizers append a
               depth axis of size num_quantizers).
    loss:      scalar, the quantizer's own auxiliary loss, already weighted (commitment, codebook,
               entropy); add it to the reconstruction loss.
    stats:     detached scalars/tensors for logging: "usage" (fraction of codes used in the batch),
               "perplexity", "dead_codes", "collapse" (0/1), and "histogram" (running usage counts).
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(nn.Module):
    """Base class. Subclasses implement ``forward``, ``encode``, ``decode`` and ``codebook_size``.

    Inputs are channel-first feature maps ``[B, D, *spatial]`` (1-D, 2-D or 3-D data) or flat
    tokens ``[N, D]``; ``encode`` returns indices ``[B, *spatial]`` and ``decode(indices)`` returns
    the quantized map in the same layout, so ``decode(encode(z)) == forward(z).quantized``.

    A quantizer's fp32 parameters and buffers stay fp32 when a model around it is cast to fp16 /
    bf16 (``model.to(torch.bfloat16)``); device moves and ``.double()`` apply as usual. It takes
    inputs of any float dtype, computes in fp32 and returns ``quantized`` in the input's dtype.
    """

    codebook_size: int
    dim: int

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_fp32(fn), recurse)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, indices: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
