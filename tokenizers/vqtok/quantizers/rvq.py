"""Residual vector quantisation (Zeghidour et al. 2021, "SoundStream"; Defossez et al. 2022, EnCodec).

Layer l quantises the residual left by layers 0..l-1; the output is the sum of the chosen codes.
Quantizer dropout (SoundStream) trains every prefix of the stack, so a decoder can run at variable
bitrate from the first n layers: with probability ``quantizer_dropout`` a training step uses only
the first n ~ U{1..num_quantizers} layers (n drawn from a generator every rank seeds identically,
so DDP ranks run the same layers and enter the same collectives); dropped layers' indices are -1.
With learning="grad" a dropped layer's codebook gets no gradient that step: wrap the model in
DDP with ``find_unused_parameters=True`` when using quantizer dropout.
Shapes: z [B, D, *spatial] or [N, D]; indices [B, *spatial, Q] / [N, Q] with Q = num_quantizers.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .vq import VectorQuantizer


class ResidualVQ(Quantizer):
    """Args:
    dim, codebook_size: of every layer.
    num_quantizers: Q, the depth.
    shared_codebook: one VectorQuantizer serves every depth (else Q separate ones).
    quantizer_dropout: probability that a training step drops the layers after a random depth.
    estimator: gradient to z through the whole stack ("ste" or "rotation").
    seed: seeds the dropout draws (identical on every rank) and the layers' k-means/restarts.
    **vq_kwargs: VectorQuantizer options of every layer (learning, decay, kmeans_init, ...);
        codebook_dim and metric="cosine" are not supported for residuals.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        *,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        estimator: str = "ste",
        seed: int = 0,
        **vq_kwargs,
    ):
        super().__init__()
        self.dim = C.check_positive_int("dim", dim)
        self.codebook_size = C.check_positive_int("codebook_size", codebook_size)
        self.num_quantizers = C.check_positive_int("num_quantizers", num_quantizers)
        C.check_choice("estimator", estimator, C.ESTIMATORS)
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout!r}")
        if vq_kwargs.get("codebook_dim") not in (None, dim) or vq_kwargs.get("metric", "l2") != "l2":
            raise ValueError("ResidualVQ layers quantise residuals in z's space: codebook_dim and metric='cosine' "
                             "are not supported (project z before the quantizer instead)")
        vq_kwargs.pop("codebook_dim", None)
        self.shared_codebook, self.quantizer_dropout = bool(shared_codebook), float(quantizer_dropout)
        self.estimator, self.seed = estimator, int(seed)
        n_layers = 1 if shared_codebook else num_quantizers
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, seed=self.seed + i, **vq_kwargs) for i in range(n_layers)
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def layer(self, depth: int) -> VectorQuantizer:
        return self.layers[0 if self.shared_codebook else depth]

    def _active_depth(self) -> int:
        """Layers used this step: Q, or a prefix drawn identically on every rank."""
        if not self.training or self.quantizer_dropout == 0.0:
            return self.num_quantizers
        g = C.shared_generator(self.seed, int(self.steps), salt=2)
        if float(torch.rand((), generator=g)) >= self.quantizer_dropout:
            return self.num_quantizers
        return int(torch.randint(1, self.num_quantizers + 1, (), generator=g))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        depth = self._active_depth()
        with C.fp32_region(z.device):
            x = x.to(torch.float32)
            residual, total = x.detach(), torch.zeros_like(x)
            idx = torch.full((x.shape[0], self.num_quantizers), -1, dtype=torch.int64, device=x.device)
            loss = x.new_zeros(())
            stats: dict[str, torch.Tensor] = {}
            for d in range(depth):
                # commitment of layer d pulls z towards the sum of codes so far (SoundStream)
                h = residual + (x - x.detach())
                q, idx[:, d], layer_loss, layer_stats = self.layer(d).quantize_rows(h, update=self.training)
                loss = loss + layer_loss
                residual = residual - q.detach()
                total = total + q
                stats.update({f"layer{d}/{k}": v for k, v in layer_stats.items()})
            out = C.estimate(x, total, self.estimator)
        if self.training:
            self.steps += 1
        stats.update(self._summarise(stats, depth))
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    def _summarise(self, stats: dict, depth: int) -> dict[str, torch.Tensor]:
        """Contract keys over the active layers: mean usage/perplexity, summed dead codes, any collapse."""
        out = {}
        for key, reduce in (("usage", torch.mean), ("perplexity", torch.mean), ("dead_codes", torch.sum),
                            ("collapse", torch.amax)):
            vals = [stats[f"layer{d}/{key}"].to(torch.float32) for d in range(depth) if f"layer{d}/{key}" in stats]
            if vals:
                out[key] = reduce(torch.stack(vals))
        hists = [layer.health.histogram for layer in self.layers if layer.health is not None]
        if hists:
            out["histogram"] = torch.stack(hists)  # [Q, K] (or [1, K] with a shared codebook)
        return out

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            residual = x.to(torch.float32)
            idx = torch.empty((x.shape[0], self.num_quantizers), dtype=torch.int64, device=x.device)
            for d in range(self.num_quantizers):
                q, idx[:, d], _, _ = self.layer(d).quantize_rows(residual, update=False)
                residual = residual - q
        return layout.indices(idx)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [..., Q] -> quantized; -1 entries (dropped layers) contribute nothing."""
        layout = C.layout_of_indices(indices, depth=self.num_quantizers)
        flat = indices.reshape(-1, self.num_quantizers).to(torch.int64)
        with C.fp32_region(indices.device):
            total = torch.zeros(flat.shape[0], self.dim, device=indices.device)
            for d in range(self.num_quantizers):
                keep = flat[:, d] >= 0
                q = self.layer(d).lookup(flat[:, d].clamp_min(0))
                total = total + torch.where(keep[:, None], q, torch.zeros_like(q))
        return layout.unflatten(total)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, num_quantizers={self.num_quantizers}, "
                f"shared_codebook={self.shared_codebook}, quantizer_dropout={self.quantizer_dropout}")
