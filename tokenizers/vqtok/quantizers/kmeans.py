"""k-means for codebook initialisation, built on ``vqtok.ops.nearest_code`` (no N x K matrix).

Seeding is k-means++ (Arthur & Vassilvitskii 2007) done in rounds: each round draws a block of
new centres by D^2 sampling and refreshes every point's distance to its nearest centre with one
``nearest_code`` call against the new block only. With ``rounds >= K`` it is exact k-means++;
with fewer rounds it is the batched variant (close to k-means||) and costs O(N K D) in total.
Lloyd iterations follow; empty clusters are re-seeded with the points farthest from their centre.
Everything is deterministic given ``generator``, so every rank of a job computes the same result
from the same data.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vqtok.ops import nearest_code

SEEDINGS = ("kmeans++", "random")  # kmeans(init=...): D^2 sampling, or distinct rows drawn uniformly


def _sample_rows(n: int, k: int, generator: torch.Generator, replacement: bool | None = None) -> torch.Tensor:
    rep = n < k if replacement is None else replacement
    if rep:
        return torch.randint(n, (k,), generator=generator)
    return torch.randperm(n, generator=generator)[:k]


@torch.no_grad()
def kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    *,
    rounds: int = 32,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    metric: str = "l2",
    precision: str = "exact",
) -> torch.Tensor:
    """D^2 seeding in ``rounds`` blocks. x [N, D] float32 -> centres [k, D]. ``precision`` is
    ``nearest_code``'s (the same answer either way)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = x.shape[0]
    if n <= k:  # every point is a centre; the rest are sampled with replacement
        extra = _sample_rows(n, k - n, g, replacement=True)
        return torch.cat([x, x[extra.to(x.device)]], 0)
    rounds = max(1, min(rounds, k))
    first = _sample_rows(n, 1, g).to(x.device)
    centres = [x[first]]
    dist = nearest_code(x, centres[0], metric=metric, backend=backend, precision=precision)[1]
    chosen = 1
    per_round = -(-(k - 1) // rounds)
    while chosen < k:
        m = min(per_round, k - chosen)
        w = dist.double().cpu().clamp_min(0)
        if float(w.sum()) <= 0:  # all points coincide with centres: fall back to uniform draws
            w = torch.ones_like(w)
        pick = torch.multinomial(w, m, replacement=False, generator=g).to(x.device)
        block = x[pick]
        centres.append(block)
        chosen += m
        _, d_new = nearest_code(x, block, metric=metric, backend=backend, precision=precision)
        dist = torch.minimum(dist, d_new.to(dist.dtype))
    return torch.cat(centres, 0)


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    init: str = "kmeans++",
    rounds: int = 32,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    metric: str = "l2",
    progress: bool = False,
    precision: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means. x [N, D] -> (centres float32 [k, D], counts float32 [k] of the last assignment).

    init: "kmeans++" (batched D^2 seeding) or "random" (k distinct rows, with replacement if N < k).
    metric: "l2", or "cosine" (spherical k-means: centres are renormalised means).
    precision: ``nearest_code``'s, "exact" or "fast" (the same assignments; a speed knob).
    """
    if init not in SEEDINGS:
        raise ValueError(f"init must be one of {SEEDINGS}, got {init!r}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = x.detach().to(torch.float32)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    if init == "kmeans++":
        centres = kmeans_plusplus(x, k, rounds=rounds, generator=g, backend=backend, metric=metric,
                                  precision=precision)
    else:
        centres = x[_sample_rows(x.shape[0], k, g).to(x.device)].clone()
    counts = torch.zeros(k, dtype=torch.float32, device=x.device)
    for _ in tqdm(range(iters), desc="k-means", disable=not progress, leave=False):
        idx, dist = nearest_code(x, centres, metric=metric, backend=backend, precision=precision)
        counts = torch.bincount(idx, minlength=k).to(torch.float32)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        n_empty = int(empty.sum())
        if n_empty:  # re-seed with the worst-served points
            far = torch.sort(dist, descending=True, stable=True).indices[:n_empty]
            far = far[torch.arange(n_empty, device=far.device) % far.numel()]
            centres[empty] = x[far]
        if metric == "cosine":
            centres = torch.nn.functional.normalize(centres, dim=1)
    if iters == 0:
        idx, _ = nearest_code(x, centres, metric=metric, backend=backend, precision=precision)
        counts = torch.bincount(idx, minlength=k).to(torch.float32)
    return centres, counts
