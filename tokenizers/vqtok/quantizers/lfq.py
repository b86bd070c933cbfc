"""Lookup-free and binary spherical quantisation.

* LFQ (Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is Key to Visual Generation",
  MAGVIT-v2): each of B channels is quantised to its sign, codes are {-1, +1}^B, 2^B implicit codes.
* BSQ (Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization"): z is
  first l2-normalised onto the unit sphere and codes are {-1, +1}^B / sqrt(B).

Loss: ``entropy_weight * (per_sample_weight * H_sample - codebook_weight * H_codebook)`` (sharp
per-token assignments, uniform codebook usage) + ``commitment_weight * |z - sg(q)|^2``. The entropy
terms come from ``vqtok.ops.lfq_entropy`` (exact, never an N x 2^B matrix, global batch under DDP).
Shapes: z [B, dim, *spatial] or [N, dim]; bits B = log2(codebook_size); indices int64, bit b of
the index is channel b > 0 (LSB first).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.ops import lfq_indices_to_codes, lfq_quantize

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .health import make_health, track


def _entropy_op():
    """vqtok.ops.lfq_entropy, or None where this build of vqtok does not ship it."""
    try:
        from vqtok.ops.lfq_entropy import lfq_entropy
    except ImportError:
        return None
    return lfq_entropy


class LFQ(Quantizer):
    """Lookup-free quantiser.

    Args:
        dim: channels of z; projected to ``bits`` channels (and back) when they differ. With fewer
            channels than bits the projected bits are linearly dependent and the codes cannot all be
            used (a warning says so): give LFQ / BSQ at least ``bits`` channels.
        bits: B (default dim); codebook_size = 2^B, at most 2^62.
        entropy_weight: overall weight of the entropy term (0 disables it).
        per_sample_weight, codebook_weight: weights of the two entropy terms.
        commitment_weight: weight of |z - sg(q)|^2.
        temperature: tau of the code distribution softmax(2 z.c / tau).
        eps_mode: lfq_entropy's entropy formula ("exact", "vqtorch", "magvit").
        estimator: "ste" or "rotation".
        backend: backend of the quantise op.
        health: CodebookHealth kwargs (no tracker past 2^24 codes).
    """

    spherical = False

    def __init__(
        self,
        dim: int,
        bits: int | None = None,
        *,
        entropy_weight: float = 0.1,
        per_sample_weight: float = 1.0,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        temperature: float = 1.0,
        eps_mode: str = "exact",
        estimator: str = "ste",
        backend: str = "auto",
        health: dict | None = None,
    ):
        super().__init__()
        self.dim = C.check_positive_int("dim", dim)
        self.bits = C.check_positive_int("bits", bits if bits is not None else dim)
        if self.bits > 62:
            raise ValueError(f"bits must be <= 62, got {self.bits}")
        C.check_choice("estimator", estimator, C.ESTIMATORS)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.codebook_size = 2**self.bits
        self.entropy_weight, self.per_sample_weight = float(entropy_weight), float(per_sample_weight)
        self.codebook_weight, self.commitment_weight = float(codebook_weight), float(commitment_weight)
        self.temperature, self.eps_mode, self.estimator, self.backend = float(temperature), eps_mode, estimator, backend
        if self.bits > self.dim:
            warnings.warn(
                f"{type(self).__name__}(dim={self.dim}, bits={self.bits}): in_proj maps {self.dim} channels to "
                f"{self.bits} bits, so the bits vary in a {self.dim}-dimensional subspace whose sign regions "
                f"cannot hold the 2^{self.bits} codes evenly (a Gaussian latent uses about half of them when 2 bits "
                f"short); give the encoder at least {self.bits} channels", UserWarning, stacklevel=2)
        self.in_proj = nn.Linear(self.dim, self.bits) if self.dim != self.bits else nn.Identity()
        self.out_proj = nn.Linear(self.bits, self.dim) if self.dim != self.bits else nn.Identity()
        self.health = make_health(self.codebook_size, health)

    @property
    def code_scale(self) -> float:
        return 1.0 / math.sqrt(self.bits) if self.spherical else 1.0

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x.to(torch.float32))
        return F.normalize(h, dim=1) if self.spherical else h

    def _quantize(self, h: torch.Tensor):
        """h [N, B] -> (codes [N, B] fp32 with values +-scale, idx int64 [N])."""
        signs, idx = lfq_quantize(h.detach(), backend=self.backend)
        return signs * self.code_scale, idx.to(torch.int64)

    def entropies(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample, codebook) entropy of h [N, B] (vqtok.ops.lfq_entropy)."""
        op = _entropy_op()
        if op is None:
            raise RuntimeError("entropy_weight > 0 needs vqtok.ops.lfq_entropy, which this build lacks; "
                               "set entropy_weight=0 or update vqtok")
        return op(h, temperature=self.temperature, scale=self.code_scale, eps_mode=self.eps_mode)

    def entropy_loss(self, per_sample: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """entropy_weight * (per_sample_weight * H_sample - codebook_weight * H_codebook)."""
        return self.entropy_weight * (self.per_sample_weight * per_sample - self.codebook_weight * codebook)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        entropies = None
        with C.fp32_region(z.device):
            h = self._prepare(x)
            q, idx = self._quantize(h)
            loss = self.commitment_weight * F.mse_loss(h, q) if h.numel() else h.sum() * 0
            # under DDP a rank with no tokens still joins the entropy's all-reduces
            if self.entropy_weight > 0 and self.training and (h.shape[0] or C.is_distributed()):
                entropies = self.entropies(h)
                loss = loss + self.entropy_loss(*entropies)
            out = self.out_proj(C.estimate(h, q, self.estimator))
        stats = track(self.health, idx, self.codebook_size, self.training)
        if entropies is not None:
            stats["entropy_sample"], stats["entropy_codebook"] = (e.detach() for e in entropies)
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            _, idx = self._quantize(self._prepare(x))
        return layout.indices(idx)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        layout = C.layout_of_indices(indices)
        flat = indices.reshape(-1).to(torch.int64)
        C.check_indices(flat, self.codebook_size, what=f"2^{self.bits}")
        with C.fp32_region(indices.device):
            out = self.out_proj(lfq_indices_to_codes(flat, self.bits) * self.code_scale)
        return layout.unflatten(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bits={self.bits}, spherical={self.spherical}, entropy_weight={self.entropy_weight}"


class BSQ(LFQ):
    """Binary spherical quantiser: LFQ on the unit sphere with codes +-1/sqrt(B); same arguments."""

    spherical = True
