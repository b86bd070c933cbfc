"""Finite scalar quantisation (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of d = len(levels) channels is bounded by tanh and rounded to one of L_i levels; the implicit
codebook has prod(levels) codes and nothing to learn, so it cannot collapse in the VQ sense (the
health tracker still reports usage). When ``dim != len(levels)`` z is projected by Linear(dim, d)
before and Linear(d, dim) after. The rounding goes through ``vqtok.ops.fsq_quantize`` (fp32,
straight-through gradient). Shapes: z [B, dim, *spatial] or [N, dim]; indices [B, *spatial] / [N].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqtok.ops import _checks, fsq_indices_to_codes, fsq_quantize

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .health import make_health, track


class FSQ(Quantizer):
    """Args: levels (e.g. [8, 5, 5, 5]); dim (default len(levels)); backend; health (tracker kwargs)."""

    def __init__(self, levels, dim: int | None = None, *, backend: str = "auto", health: dict | None = None):
        super().__init__()
        self.levels = _checks.check_levels(levels)
        d = len(self.levels)
        self.dim = C.check_positive_int("dim", dim if dim is not None else d)
        self.codebook_size = math.prod(self.levels)
        self.backend = backend
        self.in_proj = nn.Linear(self.dim, d) if self.dim != d else nn.Identity()
        self.out_proj = nn.Linear(d, self.dim) if self.dim != d else nn.Identity()
        self.health = make_health(self.codebook_size, health)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            codes, idx = fsq_quantize(self.in_proj(x.to(torch.float32)), self.levels, backend=self.backend)
            out = self.out_proj(codes)
        idx = idx.to(torch.int64)
        stats = track(self.health, idx, self.codebook_size, self.training)
        loss = out.new_zeros(())
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            _, idx = fsq_quantize(self.in_proj(x.to(torch.float32)), self.levels, backend=self.backend)
        return layout.indices(idx.to(torch.int64))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        layout = C.layout_of_indices(indices)
        flat = indices.reshape(-1)
        C.check_indices(flat, self.codebook_size)
        with C.fp32_region(indices.device):
            out = self.out_proj(fsq_indices_to_codes(flat, self.levels, backend=self.backend))
        return layout.unflatten(out)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}"
