"""Quantizer study: one small image autoencoder, every quantizer family, the same budget.

Question: at ~2^10 and ~2^14 codes (FSQ/LFQ also 2^18), which quantizers keep their codebook
alive on held-out photos, and what reconstruction do they buy? Plain VQ (gradient codebook,
random init) is the classic collapse case and must be flagged by the collapse signal.

Setup (frozen in ``StudyConfig``): every photo is used at several ``scales`` of its full size (as
vqtok.data's multi-scale sets). Training draws random ``crop``x``crop`` crops (with flips) from the
training photos; evaluation cuts the held-out photos (retina, the stereo motorcycle pair, flower;
the same split as vqtok.data) into a non-overlapping grid of ``eval_tile`` px tiles: 895 tiles,
229k tokens, 14x the 2^14 codes. For 2^18 codes the held-out set cannot show full usage; each row
reports ``usage_ceiling`` = min(K, tokens) / K next to the (unchanged) usage. The autoencoder
downsamples by 4, so a 32x32 crop is an 8x8 token grid. Every row trains the same architecture
from the same seed with AdamW on MSE + the quantizer's own loss for ``steps`` steps; k-means rows
first initialise from ``init_tokens_per_code`` x K tokens (EMA counts put back on the per-step
scale) and restart codes whose EMA count falls below half a uniform code's per-step share.
Held-out metrics come from ``vqtok.evaluate`` (usage, perplexity, dead codes, collapse, PSNR, SSIM).

Peers: vector-quantize-pytorch's VectorQuantize (EMA, kmeans_init, threshold_ema_dead_code,
rotation_trick), FSQ and LFQ (entropy loss on) under the same model and budget. Peer LFQ
materialises an N x 2^B probability matrix; rows whose estimate exceeds ``peer_lfq_max_gib`` are
reported as skipped with the estimate.

    python benchmarks/quantizer_study.py            # full study (< 30 min on 2 CPU cores)
    python benchmarks/quantizer_study.py --quick    # CI smoke run (< 60 s)
    python benchmarks/quantizer_study.py --json out.json --rows fsq,lfq
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "china")
EVAL_PHOTOS = ("retina", "motorcycle_left", "motorcycle_right", "flower")


@dataclass(frozen=True)
class StudyConfig:
    steps: int = 300          # optimiser steps per row
    batch: int = 24           # crops per step (x 64 tokens = 1536 tokens per step)
    crop: int = 32            # training crop side in px (an 8x8 token grid)
    scales: tuple = (0.25, 0.5, 1.0)  # photo scales (of full size) for training and held-out tiles
    eval_tile: int = 64       # held-out tiles: a non-overlapping grid of eval_tile px squares (16x16 tokens)
    latent_dim: int = 16      # channels at the quantizer
    width: int = 48           # autoencoder channels
    lr: float = 2e-3
    init_tokens_per_code: int = 2  # k-means rows: the first (init) batch has this many tokens per code
    sizes: tuple = (10, 14)   # log2 codebook sizes for every family
    big_sizes: tuple = (18,)  # extra log2 sizes for FSQ and LFQ
    peer_lfq_max_gib: float = 2.0
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * (self.crop // 4) ** 2


FULL = StudyConfig()
QUICK = StudyConfig(steps=10, batch=16, scales=(0.25,), sizes=(10,), big_sizes=())


# --------------------------------------------------------------------------------------------
# data: bundled photos, whole images held out
# --------------------------------------------------------------------------------------------
def load_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] from scikit-image / scikit-learn (offline)."""
    import skimage.data as skd

    if name.startswith("motorcycle_"):
        left, right, _ = skd.stereo_motorcycle()
        return left if name.endswith("left") else right
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[0 if name == "china" else 1]
    return getattr(skd, name)()[..., :3]


@functools.lru_cache(maxsize=64)
def photo_tensor(name: str, scale: float) -> torch.Tensor:
    """[3, h, w] in [-1, 1]: the photo resized by ``scale`` of its full size (antialiased)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    img = torch.from_numpy(np.array(load_photo(name), dtype=np.uint8)).permute(2, 0, 1).float()[None] / 127.5 - 1
    if scale == 1:
        return img[0]
    size = (round(img.shape[-2] * scale), round(img.shape[-1] * scale))
    return F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(-1, 1)


def photo_set(names: tuple, scales: tuple) -> list[torch.Tensor]:
    """Every photo at every scale (a multi-scale set, as vqtok.data's ``scales``)."""
    return [photo_tensor(n, s) for n in names for s in scales]


class Crops:
    """Random training crops (with flips) from a list of photos; fixed held-out tile grids."""

    def __init__(self, photos: list[torch.Tensor], crop: int, seed: int):
        small = [tuple(p.shape[1:]) for p in photos if min(p.shape[1:]) < crop]
        if small:
            raise ValueError(f"crop={crop} is larger than photos of size {small}")
        self.photos, self.crop = photos, crop
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> torch.Tensor:
        """[n, 3, crop, crop]: a photo uniformly, then a position uniformly, then a coin flip."""
        out = []
        for _ in range(n):
            p = self.photos[int(torch.randint(len(self.photos), (1,), generator=self.g))]
            y = int(torch.randint(p.shape[1] - self.crop + 1, (1,), generator=self.g))
            x = int(torch.randint(p.shape[2] - self.crop + 1, (1,), generator=self.g))
            c = p[:, y : y + self.crop, x : x + self.crop]
            out.append(c.flip(-1) if torch.rand((), generator=self.g) < 0.5 else c)
        return torch.stack(out)


def tiles(photos: list[torch.Tensor], tile: int) -> torch.Tensor:
    """[N, 3, tile, tile]: every photo cut into a non-overlapping grid (ragged borders dropped)."""
    out = [p[:, y : y + tile, x : x + tile] for p in photos
           for y in range(0, p.shape[1] - tile + 1, tile) for x in range(0, p.shape[2] - tile + 1, tile)]
    if not out:
        raise ValueError(f"tile={tile} is larger than every photo")
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# the autoencoder (same for every row) and quantizer adapters
# --------------------------------------------------------------------------------------------
class StudyAE(nn.Module):
    """x [B, 3, H, W] -> z [B, D, H/4, W/4] -> quantizer -> recon [B, 3, H, W].

    A 4x4 patch embedding, two 3x3 convs at token resolution, and the mirror image with a 4x4
    transposed-conv "unpatchify": small enough that the quantizer's cost shows in the wall time.
    """

    modality = "image"

    def __init__(self, quantizer: nn.Module, latent_dim: int, width: int):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 4, 4), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU(), nn.Conv2d(w, latent_dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, w, 3, 1, 1), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(w, 3, 4, 4))
        self.quantizer = quantizer

    def forward(self, x):
        q = self.quantizer(self.encoder(x))
        return SimpleNamespace(recon=self.decoder(q.quantized), quant=q)


class PeerAdapter(nn.Module):
    """A vector-quantize-pytorch module behind vqtok's channel-first interface.

    z [B, D, h, w] -> tokens [B, h*w, D] (the peers' layout) -> (quantized, indices, loss).
    """

    def __init__(self, module: nn.Module, codebook_size: int, returns_loss: bool):
        super().__init__()
        self.module, self.codebook_size, self.returns_loss = module, codebook_size, returns_loss

    def forward(self, z):
        b, d, h, w = z.shape
        out = self.module(z.flatten(2).transpose(1, 2))
        q, idx = out[0], out[1]
        loss = out[2].sum() if self.returns_loss else z.new_zeros(())
        return SimpleNamespace(quantized=q.transpose(1, 2).reshape(b, d, h, w),
                               indices=idx.reshape(b, h, w).long(), loss=loss)


FSQ_LEVELS = {10: [8, 5, 5, 5], 14: [8, 8, 8, 6, 5], 18: [8, 8, 8, 8, 8, 8]}  # Mentzer et al. table 1 style


@dataclass
class Row:
    family: str
    impl: str           # "vqtok" or "vector-quantize-pytorch"
    log2_codes: int
    build: Callable[[StudyConfig], nn.Module] | None
    skip: str | None = None
    init_codes: int = 0  # k-means rows: codes per layer to initialise from one large first batch


def _restart_threshold(cfg: StudyConfig, k: int) -> float:
    """Dead-code threshold (EMA count per step): half of a uniform code's share T / K, at most 2."""
    return min(2.0, 0.5 * cfg.tokens_per_step / k)


def vqtok_rows(cfg: StudyConfig) -> list[Row]:
    from vqtok.quantizers import build_quantizer

    d = cfg.latent_dim
    rows = []
    for b in cfg.sizes:
        k = 2**b
        rows += [
            Row("vq-plain", "vqtok", b, lambda c, k=k: build_quantizer("vq", dim=d, codebook_size=k, learning="grad")),
            Row("vq-ema-kmeans-restart", "vqtok", b, lambda c, k=k: build_quantizer(
                "vq", dim=d, codebook_size=k, learning="ema", kmeans_init=True,
                dead_code_threshold=_restart_threshold(c, k)), init_codes=k),
            Row("vq-l2norm-dim8", "vqtok", b, lambda c, k=k: build_quantizer(
                "vq", dim=d, codebook_size=k, codebook_dim=8, metric="cosine", learning="grad")),
            Row("rvq-2x", "vqtok", b, lambda c, b=b: build_quantizer(
                "rvq", dim=d, codebook_size=2 ** (b // 2), num_quantizers=2, learning="ema", kmeans_init=True,
                dead_code_threshold=_restart_threshold(c, 2 ** (b // 2))), init_codes=2 ** (b // 2)),
            Row("fsq", "vqtok", b, lambda c, b=b: build_quantizer("fsq", levels=FSQ_LEVELS[b], dim=d)),
            Row("lfq", "vqtok", b, lambda c, b=b: build_quantizer("lfq", dim=d, bits=b)),
            Row("bsq", "vqtok", b, lambda c, b=b: build_quantizer("bsq", dim=d, bits=b)),
            Row("simvq", "vqtok", b, lambda c, k=k: build_quantizer("simvq", dim=d, codebook_size=k)),
        ]
    for b in cfg.big_sizes:
        rows += [Row("fsq", "vqtok", b, lambda c, b=b: build_quantizer("fsq", levels=FSQ_LEVELS[b], dim=d)),
                 Row("lfq", "vqtok", b, lambda c, b=b: build_quantizer("lfq", dim=d, bits=b))]
    return rows


def peer_rows(cfg: StudyConfig) -> list[Row]:
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as e:
        return [Row("peer", "vector-quantize-pytorch", 0, None, skip=f"not installed: {e}")]
    d, impl = cfg.latent_dim, "vector-quantize-pytorch"
    tokens = cfg.tokens_per_step
    rows = []
    for b in cfg.sizes:
        k = 2**b
        rows.append(Row("vq-ema-kmeans-restart-rot", impl, b, lambda c, k=k: PeerAdapter(vqp.VectorQuantize(
            dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25, kmeans_init=True,
            threshold_ema_dead_code=_restart_threshold(c, k), rotation_trick=True), k, True), init_codes=k))
    for b in (*cfg.sizes, *cfg.big_sizes):
        rows.append(Row("fsq", impl, b, lambda c, b=b: PeerAdapter(
            vqp.FSQ(levels=FSQ_LEVELS[b], dim=d), math.prod(FSQ_LEVELS[b]), False)))
    for b in (*cfg.sizes, *cfg.big_sizes):
        gib = 3 * tokens * 2**b * 4 / 2**30  # logits, probabilities and their gradient, fp32
        skip = f"needs ~{gib:.1f} GiB for its {tokens}x2^{b} probabilities" if gib > cfg.peer_lfq_max_gib else None
        rows.append(Row("lfq-entropy", impl, b, lambda c, b=b: PeerAdapter(
            vqp.LFQ(dim=d, codebook_size=2**b, entropy_loss_weight=0.1), 2**b, True), skip=skip))
    return rows


def _rescale_ema_counts(quantizer: nn.Module, ratio: float) -> None:
    """Put k-means-initialised EMA counts on the per-step scale (vqtok and peer modules alike).

    Both libraries set the EMA cluster sizes to the k-means counts of the init batch; after an
    init batch of n tokens those are n / T times the steady per-step counts of T-token steps, so
    no code would fall below the dead-code threshold (a fraction of T / K) for ~100 ln(n / T)
    steps. Scaling counts and sums together leaves every code vector unchanged.
    """
    for mod in quantizer.modules():
        counts = getattr(mod, "cluster_size", None)
        sums = getattr(mod, "embed_sum", getattr(mod, "embed_avg", None))
        if isinstance(counts, torch.Tensor) and isinstance(sums, torch.Tensor):
            counts.mul_(ratio)
            sums.mul_(ratio)


# --------------------------------------------------------------------------------------------
# one row: train, then evaluate on the held-out crops
# --------------------------------------------------------------------------------------------
def run_row(row: Row, cfg: StudyConfig, train: Crops, held_out: torch.Tensor) -> dict:
    from vqtok.evaluate import evaluate

    base = {"family": row.family, "impl": row.impl, "log2_codes": row.log2_codes}
    if row.skip:
        return {**base, "skipped": row.skip}
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer = row.build(cfg)
    model = StudyAE(quantizer, cfg.latent_dim, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    train.g.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    if row.init_codes:  # k-means sees init_tokens_per_code x K tokens, not just one small batch
        n = max(cfg.batch, -(-cfg.init_tokens_per_code * row.init_codes // (cfg.crop // 4) ** 2))
        with torch.no_grad():
            model.quantizer(model.encoder(train.batch(n)))
            _rescale_ema_counts(model.quantizer, cfg.tokens_per_step / (n * (cfg.crop // 4) ** 2))
    for _ in range(cfg.steps):
        x = train.batch(cfg.batch)
        out = model(x)
        loss = F.mse_loss(out.recon, x) + out.quant.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    m = evaluate(model, torch.utils.data.TensorDataset(held_out), batch_size=64, lpips=False, fid=False,
                 progress=False)
    k = int(quantizer.codebook_size)  # per layer for RVQ, whose usage is the mean over layers
    return {**base, "codebook_size": k ** (2 if row.family.startswith("rvq") else 1),
            "usage_ceiling": min(k, int(m["tokens"])) / k,  # the most usage these held-out tokens allow
            "usage": m["usage"], "perplexity": m["perplexity"], "dead_codes": m["dead_codes"],
            "collapse": m["collapse"], "psnr": m["psnr"], "ssim": m["ssim"], "tokens": m["tokens"],
            "train_s": train_s, "eval_s": m["seconds"], "final_loss": float(loss.detach()),
            "layers": [{k: v for k, v in s.items() if k in ("usage", "perplexity", "dead_codes")}
                       for s in m.get("layers", [])]}


def format_table(results: list[dict]) -> str:
    head = (f"{'family':27s} {'impl':9s} {'codes':>7s} {'usage':>6s} {'perplex':>8s} {'dead':>7s} "
            f"{'collapse':>8s} {'PSNR':>6s} {'SSIM':>6s} {'train_s':>7s} {'ceiling':>7s}")
    lines = [head, "-" * len(head)]
    for r in results:
        impl = "vqtok" if r["impl"] == "vqtok" else "vqp"
        codes = f"2^{r['log2_codes']}"
        if "skipped" in r:
            lines.append(f"{r['family']:27s} {impl:9s} {codes:>7s}  skipped: {r['skipped']}")
            continue
        lines.append(f"{r['family']:27s} {impl:9s} {codes:>7s} {r['usage']:6.3f} {r['perplexity']:8.1f} "
                     f"{r['dead_codes']:7d} {'YES' if r['collapse'] else 'no':>8s} {r['psnr']:6.2f} "
                     f"{r['ssim']:6.3f} {r['train_s']:7.1f} {r['usage_ceiling']:7.3f}")
    return "\n".join(lines)


def run_study(cfg: StudyConfig, rows_filter: list[str] | None = None, progress: bool = True) -> dict:
    """Train and evaluate every row; returns {"config", "held_out", "results", "seconds"}."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    train = Crops(photo_set(TRAIN_PHOTOS, cfg.scales), cfg.crop, cfg.seed)
    held_out = tiles(photo_set(EVAL_PHOTOS, cfg.scales), cfg.eval_tile)
    rows = vqtok_rows(cfg) + peer_rows(cfg)
    if rows_filter:
        rows = [r for r in rows if any(f in f"{r.family}/{r.impl}/2^{r.log2_codes}" for f in rows_filter)]
    results = []
    bar = tqdm(rows, desc="quantizer study", disable=not progress)
    for row in bar:
        bar.set_postfix_str(f"{row.family} {row.impl} 2^{row.log2_codes}")
        results.append(run_row(row, cfg, train, held_out))
        if progress:  # each row as it finishes (the full table is printed at the end)
            bar.write(format_table(results[-1:]).splitlines()[-1])
    return {"config": dataclasses.asdict(cfg), "held_out": {"photos": EVAL_PHOTOS, "scales": cfg.scales, "tiles": len(held_out),
                                                       "tokens": len(held_out) * (cfg.eval_tile // 4) ** 2},
            "results": results, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 2^10 only, 10 steps (< 60 s)")
    ap.add_argument("--steps", type=int, default=None, help="override the optimiser steps per row")
    ap.add_argument("--rows", default="", help="comma-separated substrings of 'family/impl/2^b' to run")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path ('-': stdout)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (it goes to stderr)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_study(cfg, [s for s in args.rows.split(",") if s], progress=not args.no_progress)
    print(format_table(res["results"]))
    print(f"held-out: {res['held_out']['tiles']} tiles ({res['held_out']['tokens']} tokens) of "
          f"{', '.join(EVAL_PHOTOS)} at scales {cfg.scales}; {cfg.steps} steps x {cfg.batch} crops "
          f"({cfg.tokens_per_step} tokens) per row; total {res['seconds']:.0f} s\n"
          f"ceiling = min(K, held-out tokens) / K: the highest usage the held-out set can show")
    if args.json == "-":
        print(json.dumps(res, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
