"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One
Linear Layer").

The codebook is C W: a frozen random basis C [K, D] behind one learnable linear map W [D, D].
Every gradient step on W moves all codes at once, so no code is left behind and the codebook
does not collapse. Loss: |sg(z) - q|^2 (trains W) + beta |z - sg(q)|^2 (commitment).
Search goes through ``vqtok.ops.nearest_code`` against C W (no N x K matrix).
Shapes: z [B, D, *spatial] or [N, D]; indices [B, *spatial] / [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.ops import nearest_code

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .health import make_health, track


class SimVQ(Quantizer):
    """Args: dim (D), codebook_size (K), beta (commitment weight), estimator ("ste"|"rotation"),
    backend (nearest_code backend), search_precision (nearest_code's: "exact", the default, or
    "fast"; the same indices, see VectorQuantizer), health (CodebookHealth kwargs), seed (of the frozen basis),
    init_std (std of the frozen basis entries; default D^-0.5, unit-norm codes as in the paper;
    1.0 matches latents standardised per channel)."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        estimator: str = "ste",
        backend: str = "auto",
        search_precision: str = "exact",
        health: dict | None = None,
        seed: int = 0,
        init_std: float | None = None,
    ):
        super().__init__()
        self.dim = C.check_positive_int("dim", dim)
        self.codebook_size = C.check_positive_int("codebook_size", codebook_size)
        C.check_choice("estimator", estimator, C.ESTIMATORS)
        C.check_choice("search_precision", search_precision, C.SEARCH_PRECISIONS)
        self.beta, self.estimator, self.backend = float(beta), estimator, backend
        self.search_precision = search_precision
        std = dim**-0.5 if init_std is None else float(init_std)
        if not std > 0 or std == float("inf"):
            raise ValueError(f"init_std must be a positive finite number, got {init_std!r}")
        g = torch.Generator().manual_seed(int(seed))  # same basis on every rank without a broadcast
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim, generator=g) * std)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.proj.weight)  # starts at C itself; learned from there
        self.health = make_health(codebook_size, health)

    def codes(self) -> torch.Tensor:
        """The effective codebook C W^T [K, D] (differentiable w.r.t. W)."""
        return self.proj(self.frozen_codebook.to(torch.float32))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            h = x.to(torch.float32)
            cb = self.codes()
            idx, _ = nearest_code(h.detach(), cb.detach(), backend=self.backend, precision=self.search_precision)
            q = F.embedding(idx, cb)
            if h.numel():
                loss = F.mse_loss(q, h.detach()) + self.beta * F.mse_loss(h, q.detach())
            else:
                loss = h.sum() * 0
            out = C.estimate(h, q, self.estimator)
        stats = track(self.health, idx, self.codebook_size, self.training)
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            idx, _ = nearest_code(x.to(torch.float32), self.codes(), backend=self.backend,
                                  precision=self.search_precision)
        return layout.indices(idx)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        layout = C.layout_of_indices(indices)
        flat = indices.reshape(-1).to(torch.int64)
        C.check_indices(flat, self.codebook_size)
        with C.fp32_region(indices.device):
            out = F.embedding(flat, self.codes())
        return layout.unflatten(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}"
