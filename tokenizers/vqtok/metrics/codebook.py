"""Codebook health for training logs and evaluation reports.

``CodebookHealth`` (implemented in :mod:`vqtok.quantizers.health`, which every quantizer owns and
which sits below this package in the layer order) keeps running usage counts, EMA usage,
perplexity, dead codes and a collapse signal, all-reduced across ranks. This module re-exports it
and adds the evaluation-side helpers: accumulate the indices of a whole evaluation set, then read
usage, perplexity and entropy.

Typical evaluation use::

    tracker = CodebookHealth(model.quantizer.codebook_size, sync=True)
    for batch in loader:
        tracker.update(model.quantizer.encode(model.encoder(batch)))
    report = tracker.summary()   # tokens, usage, unused_codes, perplexity, entropy_bits, ...

For residual quantizers (indices [..., Q]) use :func:`per_depth_summary`.
"""

from __future__ import annotations

import torch

from vqtok.quantizers.health import MAX_TRACKED_CODES, CodebookHealth, perplexity_of

__all__ = ["CodebookHealth", "MAX_TRACKED_CODES", "perplexity_of", "codebook_summary", "per_depth_summary"]


@torch.no_grad()
def codebook_summary(indices: torch.Tensor, codebook_size: int, *, sync: bool = False) -> dict[str, float]:
    """Usage / perplexity / entropy of one set of indices (any shape) of a ``codebook_size`` codebook.

    sync=True sums the counts over ranks (every rank must call it).
    """
    tracker = CodebookHealth(codebook_size, sync=sync).to(indices.device)
    tracker.update(indices)
    return tracker.summary()


@torch.no_grad()
def per_depth_summary(indices: torch.Tensor, codebook_size: int, *, sync: bool = False) -> list[dict[str, float]]:
    """indices [..., Q] of a residual quantizer -> one summary per depth (-1 ids, dropped layers, ignored)."""
    if indices.dim() < 2:
        raise ValueError(f"indices must end with a depth axis, got shape {tuple(indices.shape)}")
    flat = indices.reshape(-1, indices.shape[-1])
    return [codebook_summary(flat[:, d], codebook_size, sync=sync) for d in range(flat.shape[1])]
