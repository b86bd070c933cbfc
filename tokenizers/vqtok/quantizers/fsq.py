"""Finite scalar quantisation (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of d = len(levels) channels is bounded by tanh and rounded to one of L_i levels; the implicit
codebook has prod(levels) codes and nothing to learn, so it cannot collapse in the VQ sense (the
health tracker still reports usage). When ``dim != len(levels)`` z is projected by Linear(dim, d)
before and Linear(d, dim) after; the first starts orthogonal with no bias (``proj_init``), so on
a latent standardised per channel each bounded channel starts at unit variance and spreads over
its levels (nn.Linear's default init gives about 0.58). The rounding goes through
``vqtok.ops.fsq_quantize`` (fp32, straight-through gradient). Shapes: z [B, dim, *spatial] or [N, dim]; indices [B, *spatial] / [N].

Optional entropy regulariser (off by default, as in LFQ): ``entropy_weight * (per_sample_weight *
H_sample - codebook_weight * H_codebook)`` on the soft assignment softmax(-(u - g)^2 / tau) of each
bounded value u to its level grid, from ``vqtok.ops.fsq_entropy`` (exact, never an N x K matrix,
global batch under DDP). It pushes the codebook towards uniform usage; training mode only.

Optional dither (``noise``, off by default; training mode only): each bounded value is, with
probability ``noise``, passed on as itself plus uniform noise of one level's width instead of its
rounded level (the noise substitution of Parker et al. 2024, "Scaling Transformers for Low-Bitrate
High-Quality Speech Coding", section 3.2), so the decoder trains on the rounding's error
distribution rather than on the levels alone. The gradient is the straight-through one either way
and the indices are always the rounded levels' (every index a valid code).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vqtok.ops import _checks, fsq_entropy, fsq_indices_to_codes, fsq_quantize
from vqtok.ops.lfq_entropy import MAX_TORCH_BITS
from vqtok.ops.reference import fsq_bound

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .health import make_health, track


PROJ_INITS = ("orthogonal", "linear")


class FSQ(Quantizer):
    """Finite scalar quantiser.

    Args:
        levels: levels per channel, e.g. [8, 5, 5, 5]; codebook_size = prod(levels).
        dim: channels of z (default len(levels)); projected to len(levels) channels and back.
        entropy_weight: overall weight of the entropy term (0, the default, disables it).
        per_sample_weight, codebook_weight: weights of the per-sample and codebook entropies.
        temperature: tau of each channel's soft assignment softmax(-(u - g)^2 / tau), level units.
        proj_init: init of the in-projection (when dim != len(levels)): "orthogonal" (default;
            orthonormal rows, zero bias) or "linear" (nn.Linear's own init, as the FSQ paper's
            reference and vector-quantize-pytorch have it).
        noise: probability that a bounded value in training is dithered (itself plus U(-1/2, 1/2)
            of a level) instead of rounded; 0 (the default) rounds every value.
        backend: backend of the quantise op.
        health: CodebookHealth kwargs.
    """

    def __init__(
        self,
        levels,
        dim: int | None = None,
        *,
        entropy_weight: float = 0.0,
        per_sample_weight: float = 1.0,
        codebook_weight: float = 1.0,
        temperature: float = 1.0,
        proj_init: str = "orthogonal",
        noise: float = 0.0,
        backend: str = "auto",
        health: dict | None = None,
    ):
        super().__init__()
        self.levels = _checks.check_levels(levels)
        d = len(self.levels)
        self.dim = C.check_positive_int("dim", dim if dim is not None else d)
        self.codebook_size = math.prod(self.levels)
        for name, w in (("entropy_weight", entropy_weight), ("per_sample_weight", per_sample_weight),
                        ("codebook_weight", codebook_weight)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a probability in [0, 1], got {noise!r}")
        if entropy_weight > 0 and self.codebook_size > 2**MAX_TORCH_BITS:  # fsq_entropy holds pbar (K floats)
            raise ValueError(f"entropy_weight > 0 needs codebook_size <= 2^{MAX_TORCH_BITS}, "
                             f"got {self.codebook_size} (levels {self.levels})")
        self.entropy_weight, self.per_sample_weight = float(entropy_weight), float(per_sample_weight)
        self.codebook_weight, self.temperature = float(codebook_weight), float(temperature)
        self.backend, self.noise = backend, float(noise)
        C.check_choice("proj_init", proj_init, PROJ_INITS)
        self.proj_init = proj_init
        self.in_proj = nn.Linear(self.dim, d) if self.dim != d else nn.Identity()
        self.out_proj = nn.Linear(d, self.dim) if self.dim != d else nn.Identity()
        if proj_init == "orthogonal" and isinstance(self.in_proj, nn.Linear):
            with torch.no_grad():
                nn.init.orthogonal_(self.in_proj.weight)
                self.in_proj.bias.zero_()
        self.health = make_health(self.codebook_size, health)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        entropies = None
        with C.fp32_region(z.device):
            h = self.in_proj(x.to(torch.float32))
            codes, idx = fsq_quantize(h, self.levels, backend=self.backend)
            if self.noise > 0 and self.training:
                codes = self.dither(h, codes)
            out = self.out_proj(codes)
            loss = out.new_zeros(())
            # under DDP a rank with no tokens still joins the entropy's all-reduces
            if self.entropy_weight > 0 and self.training and (h.shape[0] or C.is_distributed()):
                entropies = fsq_entropy(h, self.levels, temperature=self.temperature)
                loss = self.entropy_loss(*entropies)
        idx = idx.to(torch.int64)
        stats = track(self.health, idx, self.codebook_size, self.training)
        if entropies is not None:
            stats["entropy_sample"], stats["entropy_codebook"] = (e.detach() for e in entropies)
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    def dither(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` (rounded levels / (L // 2), straight-through) with a ``noise`` fraction of the
        entries replaced in value by (bound(h) + U(-1/2, 1/2)) / (L // 2), gradients unchanged."""
        with torch.no_grad():
            bound, half_width = fsq_bound(h, self.levels)  # the value the codes round
            dithered = (bound + torch.rand_like(bound) - 0.5) / half_width
            pick = torch.rand_like(bound) < self.noise
            delta = torch.where(pick, dithered - codes, 0.0)
        return codes + delta

    def entropy_loss(self, per_sample: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """entropy_weight * (per_sample_weight * H_sample - codebook_weight * H_codebook)."""
        return self.entropy_weight * (self.per_sample_weight * per_sample - self.codebook_weight * codebook)

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
        extra = f", entropy_weight={self.entropy_weight}" if self.entropy_weight > 0 else ""
        extra += f", noise={self.noise}" if self.noise > 0 else ""
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}{extra}"
