"""Vector quantisation (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Options, each from the paper that introduced it:

* codebook learned by EMA with Laplace smoothing (Razavi et al. 2019, VQ-VAE-2) or by gradients
  (codebook loss + beta * commitment loss);
* a low-dimensional code space with l2-normalised codes (``codebook_dim < dim``,
  ``metric="cosine"``; Yu et al. 2022 "ViT-VQGAN", LlamaGen 2024);
* k-means initialisation on the first training batch (gathered from all ranks under DDP);
* dead-code restarts from a FIFO of recent encoder outputs (Dhariwal et al. 2020, Jukebox);
* straight-through or rotation-trick gradients (Fifty et al. 2024).

Search goes through ``vqtok.ops.nearest_code``: no N x K distance matrix, whatever K.
Shapes: z [B, D, *spatial] or [N, D]; codes live in a [K, Dc] codebook, Dc = codebook_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.ops import nearest_code

from . import _common as C
from .base import Quantizer, QuantizerOutput
from .health import make_health
from .kmeans import SEEDINGS, kmeans


RESTARTS = ("random", "nearest")


class VectorQuantizer(Quantizer):
    """Nearest-code quantiser with an EMA- or gradient-learned codebook.

    Args:
        dim: channels of z (D).
        codebook_size: K.
        codebook_dim: Dc; when != dim, z is projected by Linear(D, Dc) before the search and
            codes by Linear(Dc, D) after it.
        metric: "l2" or "cosine" (both sides l2-normalised; codes live on the unit sphere).
        learning: "ema" (codebook is a buffer updated by EMA) or "grad" (a Parameter).
        decay: EMA decay of cluster sizes and sums (also the usage EMA used for restarts).
        eps: Laplace smoothing of the EMA cluster sizes.
        beta: weight of the commitment loss |z - sg(q)|^2.
        codebook_weight: weight of the codebook loss |sg(z) - q|^2 (learning="grad" only).
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        kmeans_seeding: how that k-means picks its first centres: "kmeans++" (D^2 sampling, which
            favours outlying tokens) or "random" (distinct tokens drawn uniformly, so the centres
            start where the tokens are dense).
        dead_code_threshold: restart codes whose EMA count per step falls below this (0: never).
        restart_buffer: rows of recent encoder outputs kept for restarts (default max(4096, K)).
        restart: where a dead code restarts: "random" (a random recent encoder output, Jukebox) or
            "nearest" (the recent output nearest to it, as the anchors of Zheng & Vedaldi 2023,
            CVQ-VAE; codes that pick the same output share it with one, the others go random).
            A code in a sparse region then moves to the data nearest to it instead of into the
            dense regions that random draws favour.
        estimator: "ste" (straight-through) or "rotation" (rotation trick).
        backend: nearest_code backend ("auto", "torch", "cpp", "cuda", "triton").
        search_precision: nearest_code's precision, "exact" (the default) or "fast": the same
            indices and distances either way. "fast" scores on AMX-BF16 tiles where the CPU has
            them; it halves the search time when the codes are far apart next to bf16 rounding
            (2^14 random 16-d codes), but where many codes score within that rounding of a row's
            best (clustered or low-rank latents, as trained codebooks often are) those rows are
            searched again exactly and a call can take twice as long.
        health: keyword arguments of CodebookHealth (decay, dead_ratio, min_usage, ...).
        seed: seeds k-means and the restart choices, identically on every rank.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        metric: str = "l2",
        learning: str = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        codebook_weight: float = 1.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_seeding: str = "kmeans++",
        dead_code_threshold: float = 0.0,
        restart_buffer: int | None = None,
        restart: str = "random",
        estimator: str = "ste",
        backend: str = "auto",
        search_precision: str = "exact",
        health: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.dim = C.check_positive_int("dim", dim)
        self.codebook_size = C.check_positive_int("codebook_size", codebook_size)
        self.codebook_dim = C.check_positive_int("codebook_dim", codebook_dim if codebook_dim is not None else dim)
        C.check_choice("metric", metric, ("l2", "cosine"))
        C.check_choice("learning", learning, ("ema", "grad"))
        C.check_choice("estimator", estimator, C.ESTIMATORS)
        C.check_choice("restart", restart, RESTARTS)
        C.check_choice("kmeans_seeding", kmeans_seeding, SEEDINGS)
        C.check_choice("search_precision", search_precision, C.SEARCH_PRECISIONS)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        self.metric, self.learning, self.estimator, self.backend = metric, learning, estimator, backend
        self.search_precision = search_precision
        self.decay, self.eps = float(decay), float(eps)
        self.beta, self.codebook_weight = float(beta), float(codebook_weight)
        self.kmeans_init, self.kmeans_iters, self.seed = bool(kmeans_init), int(kmeans_iters), int(seed)
        self.kmeans_seeding = kmeans_seeding
        self.dead_code_threshold, self.restart = float(dead_code_threshold), restart

        k, dc = self.codebook_size, self.codebook_dim
        self.in_proj = nn.Linear(dim, dc) if dc != dim else nn.Identity()
        self.out_proj = nn.Linear(dc, dim) if dc != dim else nn.Identity()
        init = torch.randn(k, dc)
        if learning == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        size = restart_buffer if restart_buffer is not None else max(4096, k)
        # recent encoder outputs for dead-code restarts; saved with the state so a resumed run
        # restarts codes exactly as an uninterrupted one ([len, pos] mirrors the Python ints)
        self.register_buffer("_fifo", torch.zeros(C.check_positive_int("restart_buffer", size), dc))
        self.register_buffer("_fifo_meta", torch.zeros(2, dtype=torch.int64))
        self._fifo_len, self._fifo_pos = 0, 0
        self.health = make_health(k, health)

    # ----------------------------------------------------------------------------------------
    # codes
    # ----------------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The searchable codebook [K, Dc] in fp32 (unit rows when metric='cosine')."""
        cb = self.codebook.to(torch.float32)
        return F.normalize(cb, dim=1) if self.metric == "cosine" else cb

    def search(self, h: torch.Tensor, codes: torch.Tensor):
        """(indices, distances) of the nearest of ``codes`` to every row of ``h`` (nearest_code)."""
        return nearest_code(h, codes, backend=self.backend, precision=self.search_precision)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] fp32 -> h [N, Dc] in code space."""
        h = self.in_proj(x)
        return F.normalize(h, dim=1) if self.metric == "cosine" else h

    # ----------------------------------------------------------------------------------------
    # interface
    # ----------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            h = self.project_in(x.to(torch.float32))
            q, idx, loss, stats = self.quantize_rows(h, update=self.training)
            out = self.out_proj(C.estimate(h, q, self.estimator))
        return QuantizerOutput(layout.unflatten(out).to(z.dtype), layout.indices(idx), loss, stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        x, layout = C.flatten_tokens(z, self.dim)
        with C.fp32_region(z.device):
            idx, _ = self.search(self.project_in(x.to(torch.float32)), self.codes())
        return layout.indices(idx)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        layout = C.layout_of_indices(indices)
        with C.fp32_region(indices.device):
            out = self.out_proj(self.lookup(indices.reshape(-1)))
        return layout.unflatten(out)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes of ids idx [N] -> [N, Dc] fp32 (code space, before out_proj)."""
        idx = idx.to(torch.int64)
        C.check_indices(idx, self.codebook_size)
        return F.embedding(idx, self.codes())

    # ----------------------------------------------------------------------------------------
    # the quantisation step on rows in code space (also used by ResidualVQ)
    # ----------------------------------------------------------------------------------------
    def quantize_rows(self, h: torch.Tensor, *, update: bool):
        """h [N, Dc] fp32 -> (q [N, Dc], idx int64 [N], loss scalar, stats).

        q carries the codebook gradient (learning="grad") but none towards h; callers apply an
        estimator. With update=True the codebook, usage EMA, health and restart FIFO advance.
        """
        if update and not bool(self.initted):
            self._kmeans_init(h.detach())
        cb = self.codes()
        idx, _ = self.search(h.detach(), cb.detach())
        q = F.embedding(idx, cb)
        loss = self.beta * F.mse_loss(h, q.detach()) if h.numel() else h.sum() * 0
        if self.learning == "grad" and h.numel():
            loss = loss + self.codebook_weight * F.mse_loss(q, h.detach())
        if update:
            stats = self._update(h.detach(), idx)
        else:
            stats = self.health.stats(self.health.counts_of(idx)) if self.health is not None else {}
        return q, idx, loss, stats

    @torch.no_grad()
    def _update(self, h: torch.Tensor, idx: torch.Tensor) -> dict:
        """One collective: counts (and EMA sums) summed over ranks; then EMA, health, restarts."""
        k = self.codebook_size
        counts = torch.bincount(idx, minlength=k).to(torch.float32)
        if self.learning == "ema":
            packed = torch.cat([counts[:, None], torch.zeros(k, h.shape[1], device=h.device).index_add_(0, idx, h)], 1)
            C.all_reduce_sum_(packed)
            counts, sums = packed[:, 0], packed[:, 1:]
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        else:
            C.all_reduce_sum_(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.learning == "ema":
            self._refresh_codebook()
        stats = self.health.update_counts(counts, reduced=True) if self.health is not None else {}
        self.steps += 1
        self._push_fifo(h)
        if self.dead_code_threshold > 0:
            stats["restarted"] = torch.tensor(float(self._restart_dead()))
        return stats

    def _refresh_codebook(self) -> None:
        """codebook = embed_sum / Laplace-smoothed cluster sizes."""
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

    def _push_fifo(self, h: torch.Tensor) -> None:
        size = self._fifo.shape[0]
        if h.shape[0] > size:
            g = C.shared_generator(self.seed, int(self.steps), salt=3)
            h = h[torch.randperm(h.shape[0], generator=g)[:size].to(h.device)]
        n = h.shape[0]
        pos = (self._fifo_pos + torch.arange(n, device=h.device)) % size
        self._fifo[pos] = h.to(self._fifo.dtype)
        self._fifo_pos = (self._fifo_pos + n) % size
        self._fifo_len = min(size, self._fifo_len + n)
        self._fifo_meta[0], self._fifo_meta[1] = self._fifo_len, self._fifo_pos

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "_fifo_meta" not in state_dict:  # saved before the FIFO was persisted: start empty
            state_dict[prefix + "_fifo"] = torch.zeros_like(self._fifo)
            state_dict[prefix + "_fifo_meta"] = torch.zeros_like(self._fifo_meta)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fifo_len, self._fifo_pos = (int(v) for v in self._fifo_meta.tolist())

    def _restart_dead(self) -> int:
        """Replace codes whose EMA count < threshold by recent encoder outputs, identically on all ranks."""
        dead = self.cluster_size < self.dead_code_threshold  # identical on every rank
        nd = int(dead.sum())
        if nd == 0:
            return 0
        # each rank proposes nd candidates from its own FIFO; a shared generator picks the owner rank.
        # Draws come from generators keyed on (seed, step), never the global RNG, so a resumed run
        # restarts exactly the codes an uninterrupted one does.
        gl = C.shared_generator(self.seed, int(self.steps), salt=2)
        pick = torch.randint(max(self._fifo_len, 1), (nd,), generator=gl).to(self._fifo.device)
        nearest = self.restart == "nearest"  # the same on every rank (a FIFO's fill may not be)
        if nearest:
            dist = torch.full((nd,), torch.inf, device=self._fifo.device)
            if self._fifo_len > 0:
                pick, dist = self._nearest_unshared(self.codes()[dead], pick)
        local = self._fifo[pick]
        if self._fifo_len == 0:
            local = local + torch.randn(local.shape, generator=gl).to(local)
        gathered = C.all_gather_rows(local).reshape(C.world_size(), nd, -1)
        if nearest:  # the rank holding the nearest output (rank 0 where no rank has an unshared one)
            owner = C.all_gather_rows(dist[:, None]).reshape(C.world_size(), nd).argmin(0)
        else:
            g = C.shared_generator(self.seed, int(self.steps), salt=1)
            owner = torch.randint(C.world_size(), (nd,), generator=g).to(gathered.device)
        cand = gathered[owner, torch.arange(nd, device=gathered.device)]
        self.codebook.data[dead] = cand.to(self.codebook.dtype)
        fresh = self.cluster_size.sum() / self.codebook_size  # a grace period: the mean usage
        self.cluster_size[dead] = fresh
        if self.learning == "ema":
            self.embed_sum[dead] = cand * fresh
        return nd

    def _nearest_unshared(self, codes: torch.Tensor, fallback: torch.Tensor):
        """FIFO rows nearest to each of ``codes`` [nd, Dc] and their squared distances; where codes
        share a row, the first keeps it and the rest take ``fallback``'s random rows (distance inf,
        so under DDP another rank's unshared row wins)."""
        fifo = self._fifo[: self._fifo_len]
        pick, dist = self.search(codes, fifo)
        first = torch.full((self._fifo_len,), codes.shape[0], dtype=torch.int64, device=pick.device)
        first.scatter_reduce_(0, pick, torch.arange(codes.shape[0], device=pick.device), "amin")
        shared = first[pick] != torch.arange(codes.shape[0], device=pick.device)
        pick = torch.where(shared, fallback, pick)
        return pick, torch.where(shared, torch.inf, dist.to(torch.float32))

    def _kmeans_init(self, h: torch.Tensor) -> None:
        """k-means on every rank's first batch (gathered, so every rank computes the same result)."""
        data = C.all_gather_rows(h)
        g = torch.Generator().manual_seed(self.seed)
        centres, counts = kmeans(data, self.codebook_size, iters=self.kmeans_iters, init=self.kmeans_seeding,
                                 generator=g, backend=self.backend, metric=self.metric,
                                 precision=self.search_precision)
        C.broadcast_(centres)
        C.broadcast_(counts)
        self.codebook.data.copy_(centres)
        self.cluster_size.copy_(counts)
        if self.learning == "ema":
            self.embed_sum.copy_(centres * counts[:, None])
        self.initted.fill_(True)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"metric={self.metric!r}, learning={self.learning!r}, estimator={self.estimator!r}")
