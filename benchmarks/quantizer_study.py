"""Quantizer study: one small image autoencoder, every quantizer family, the same budget.

Question: at ~2^10 and ~2^14 codes (FSQ/LFQ also 2^18), which quantizers keep their codebook
alive on held-out photos, and what reconstruction do they buy? Plain VQ (gradient codebook,
random init) is the classic collapse case and must be flagged by the collapse signal.

Setup (frozen in ``StudyConfig``): every photo is used at several ``scales`` of its full size (as
vqtok.data's multi-scale sets). Training draws random ``crop``x``crop`` crops (with flips) from the
training photos; the held-out photos (retina, the stereo motorcycle pair, flower; the same split as
vqtok.data) are never trained on. The autoencoder downsamples by 4 (a 32x32 crop is an 8x8 token
grid) and standardises its latent per channel (``latent_norm``: ``RunningStandardize`` by
default, the same statistics in training and evaluation, or BatchNorm without affine parameters,
whose training latents are standardised by each batch's own statistics; either moves its running
statistics ``latent_momentum`` of the way towards each training batch, scaled down with the learning
rate by default: ``latent_momentum_decay``). The latent has
``latent_dim`` channels, or B for LFQ / BSQ with B bits when B is larger (``Row.min_latent``:
18 bits projected from 16 channels are linearly dependent, and a Gaussian latent then reaches
about half of the 2^18 sign patterns). Every row
trains the same architecture from the same seed (``--seeds``: at each of several seeds) with AdamW
on MSE + the quantizer's own loss for ``steps`` steps, the learning rate falling from ``lr`` to
``lr * lr_final`` on a cosine (``lr_decay``). The budget: a row whose steps (timed
after ``probe_steps`` warm-up steps) cost more than ``budget`` x the autoencoder's own without a
quantizer (``base_step_s``, timed just before in the same process, so the budget does not move
with the machine's speed) trains for the steps that budget pays for (the ``steps`` column; the
``cost`` column gives its step time over the autoencoder's), and no row's steps run past
``max_train_s``. ``--jobs N`` trains N rows at a time, each in its own process. k-means
rows first initialise from ``init_tokens_per_code`` x K tokens (EMA counts put back on the
per-step scale) and restart codes whose EMA count falls below ``restart_share`` of a uniform
code's per-step share (at most 2), until ``restart_stop`` of the row's steps (default 0.9; 1.0:
to the end; every row's codebooks, the peers' too); the peers' VectorQuantize uses the rotation
trick, and so does vqtok's VQ row that pairs with it (``vq_ema_estimator``, "rotation": family
``vq-ema-kmeans-restart-rot``, as the peer's), the other VQ / RVQ rows the estimator
``vq_estimator``; vqtok's VQ rows restart ``vq_restart`` and k-means
seeding ``vq_kmeans_seeding`` (the l2-normalised rows ``l2norm_kmeans_seeding``, their code
dimension ``l2norm_dim``), and
``vq_search`` is the search precision of the VQ / RVQ / SimVQ rows (a speed knob). vqtok's plain
FSQ rows start their in-projection orthogonal (``fsq_proj_init``, FSQ's default), the fsq-entropy
rows from nn.Linear's init (``fsq_entropy_proj_init``), as the peer's FSQ. Each vqtok
row's ``setup`` (the build_quantizer arguments: restarts, entropy terms) is in the JSON. ``--set
KEY=VALUE`` overrides any ``StudyConfig`` field.

Evaluation, two passes over the held-out photos:
- reconstruction (PSNR, SSIM via ``vqtok.evaluate``) on a non-overlapping grid of ``eval_tile`` px
  tiles: 895 tiles, 229k tokens;
- codebook health (usage, perplexity, dead codes, collapse via ``vqtok.evaluate.codebook_stats``)
  on the same grid at every phase of the 4 px token grid and mirrored (``dense_views``: 32 views,
  7.2M tokens, 27 per code at 2^18; ImageNet's 50k validation images at 16x16 tokens are 12.8M),
  encoder and quantizer only. Each row also prints ``ceiling`` = min(K, tokens) / K. The peers'
  VectorQuantize indices in both passes come from ``vqtok.ops.nearest_code`` on its own codebook
  (its forward builds the N x K distance matrix), checked against its forward on the first batch.

Peers: vector-quantize-pytorch's VectorQuantize (EMA, kmeans_init, threshold_ema_dead_code,
rotation_trick), FSQ and LFQ (entropy loss on) under the same model and budget. Peer LFQ
materialises an N x 2^B probability matrix; rows whose estimate exceeds ``peer_lfq_max_gib`` are
reported as skipped with the estimate.

    python benchmarks/quantizer_study.py --threads 2 --jobs 2    # the full study
    python benchmarks/quantizer_study.py --quick    # CI smoke run
    python benchmarks/quantizer_study.py --json out.json --rows fsq,lfq --set seed=1
    python benchmarks/quantizer_study.py --rows fsq/ --seeds 0,1,2    # + mean [min, max] over seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import queue
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
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
    steps: int = 3000         # optimiser steps per row
    batch: int = 24           # crops per step (x 64 tokens = 1536 tokens per step)
    crop: int = 32            # training crop side in px (an 8x8 token grid)
    scales: tuple = (0.25, 0.5, 1.0)  # photo scales (of full size) for training and held-out tiles
    eval_tile: int = 64       # held-out tiles: a non-overlapping grid of eval_tile px squares (16x16 tokens)
    latent_dim: int = 16      # channels at the quantizer
    width: int = 48           # autoencoder channels
    lr: float = 2e-3
    lr_decay: str = "cosine"  # "constant" or "cosine" (to lr * lr_final over the row's steps)
    lr_final: float = 0.1
    latent_norm: str = "running"  # latent standardisation: "running" (RunningStandardize) or "batch" (BatchNorm)
    # how far the latent standardisation's running statistics move towards each training batch before a
    # training step applies them (so a training batch's latent sits a little off the evaluation one; README)
    latent_momentum: float = 0.1
    # "lr": the momentum follows the learning rate's schedule (latent_momentum x lr_t / lr, so 0.1 to 0.01
    # with the cosine), or "constant" (the study's tables up to commit 9db9ce5; README, Earlier runs)
    latent_momentum_decay: str = "lr"
    init_tokens_per_code: int = 2  # k-means rows: the first (init) batch has this many tokens per code
    restart_share: float = 1.0  # restart codes whose EMA count per step is below this x T / K
    restart_stop: float = 0.9  # dead-code restarts stop after this fraction of a row's steps (1.0: never)
    vq_estimator: str = "ste"  # gradient estimator of the l2-normalised VQ and RVQ rows ("ste" or "rotation")
    # the EMA + k-means + restart VQ row's, as its peer row (VectorQuantize, rotation_trick=True);
    # "rotation" puts "-rot" in the family's name, like the peer's
    vq_ema_estimator: str = "rotation"
    vq_restart: str = "random"  # where the vqtok VQ / RVQ rows restart dead codes ("random" or "nearest")
    vq_search: str = "exact"  # the vqtok VQ / RVQ / SimVQ rows' search_precision (the same indices either way)
    vq_decay: float = 0.99  # EMA decay of the vqtok VQ / RVQ rows' codebooks
    vq_kmeans_seeding: str = "kmeans++"  # the vqtok VQ / RVQ rows' k-means seeding ("kmeans++" or "random")
    l2norm_dim: int = 3  # code dimension of the l2-normalised rows (family vq-l2norm-dim<d>)
    l2norm_kmeans_seeding: str = "random"  # the l2-normalised rows' k-means seeding
    simvq_init_std: float = 1.0  # SimVQ rows: std of the frozen basis (the latent is standardised)
    simvq_beta: float = 0.25  # SimVQ rows: commitment weight
    simvq_proj_lr: float = 3.0  # SimVQ rows: learning rate of the linear map W, in multiples of the autoencoder's
    fsq_proj_init: str = "orthogonal"  # vqtok FSQ rows' in-projection init ("orthogonal" or "linear", the peer's)
    # the fsq-entropy rows': nn.Linear's init (with the orthogonal start their 2^18 row kept 0.947-0.966
    # of the codes over three seeds, against 0.959-0.971)
    fsq_entropy_proj_init: str = "linear"
    fsq_noise: float = 0.0  # vqtok FSQ rows' dither probability (FSQ(noise=...); 0: every value rounded)
    fsq_entropy: tuple = (0.01, 0.5)  # fsq-entropy rows at ``sizes``: entropy weight, temperature (level units)
    fsq_entropy_big: tuple = (0.03, 0.5)  # the same at ``big_sizes``
    lfq_entropy: tuple = (0.1, 0.3, 1.0)  # LFQ rows at ``sizes``: entropy weight, temperature, per-sample term's weight
    lfq_entropy_big: tuple = (5.0, 0.3, 1.0)  # the same at ``big_sizes``
    sizes: tuple = (10, 14)   # log2 codebook sizes for every family
    big_sizes: tuple = (18,)  # extra log2 sizes for FSQ and LFQ
    peer_lfq_max_gib: float = 2.0
    probe_steps: int = 10      # steps timed (after as many warm-up steps) against the budget
    budget: float = 6.0        # a row's steps may cost up to this x the autoencoder's own (no quantizer)
    replan_steps: int = 100    # the row's steps are re-planned from its mean step time this often
    max_train_s: float = 900.0  # and its steps never take longer than this (s)
    held_in_usage: bool = False  # also measure usage on the dense views of the training photos
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
        """[n, 3, crop, crop]: a photo uniformly, then a position uniformly, then a coin flip (the
        draws of the whole batch come from one call to the generator)."""
        u = torch.rand(n, 4, generator=self.g, dtype=torch.float64).tolist()
        out = torch.empty(n, 3, self.crop, self.crop)
        for i, (up, uy, ux, uf) in enumerate(u):
            p = self.photos[min(int(up * len(self.photos)), len(self.photos) - 1)]
            y = min(int(uy * (p.shape[1] - self.crop + 1)), p.shape[1] - self.crop)
            x = min(int(ux * (p.shape[2] - self.crop + 1)), p.shape[2] - self.crop)
            c = p[:, y : y + self.crop, x : x + self.crop]
            out[i] = c.flip(-1) if uf < 0.5 else c
        return out


def tiles(photos: list[torch.Tensor], tile: int) -> torch.Tensor:
    """[N, 3, tile, tile]: every photo cut into a non-overlapping grid (ragged borders dropped)."""
    out = [p[:, y : y + tile, x : x + tile] for p in photos
           for y in range(0, p.shape[1] - tile + 1, tile) for x in range(0, p.shape[2] - tile + 1, tile)]
    if not out:
        raise ValueError(f"tile={tile} is larger than every photo")
    return torch.stack(out)


def dense_views(photos: list[torch.Tensor], tile: int, patch: int = 4):
    """Yield [n, 3, tile, tile] tile grids of every photo at every phase of the ``patch`` px token
    grid (patch^2 offsets) and its mirror image: patch^2 * 2 x the tokens of ``tiles``, each view
    putting different pixels into every token. Generated one view at a time (bounded memory)."""
    for p in photos:
        for flip in (False, True):
            q = p.flip(-1) if flip else p
            for oy in range(patch):
                for ox in range(patch):
                    view = q[:, oy:, ox:]
                    if min(view.shape[1:]) >= tile:
                        yield tiles([view], tile)


def dense_token_count(photos: list[torch.Tensor], tile: int, patch: int = 4) -> int:
    """Tokens in ``dense_views`` (without building the views)."""
    n = 0
    for p in photos:
        for oy in range(patch):
            for ox in range(patch):
                n += 2 * ((p.shape[1] - oy) // tile) * ((p.shape[2] - ox) // tile)
    return n * (tile // patch) ** 2


@torch.no_grad()
def held_out_codebook_health(model: nn.Module, photos: list[torch.Tensor], tile: int, layers: int,
                             batch: int = 256) -> dict:
    """Codebook health over ``dense_views`` of the held-out photos (encoder + quantizer only).

    Returns vqtok.evaluate.codebook_stats of the whole-set histogram (per layer for residual
    quantizers, whose usage / perplexity are the mean over layers, as in ``vqtok.evaluate``), and
    the histogram itself (``counts``, int64 [layers, K]).
    """
    from vqtok.evaluate import codebook_stats

    k = int(model.quantizer.codebook_size)
    counts = torch.zeros(layers, k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for view in dense_views(photos, tile):
            for i in range(0, len(view), batch):
                idx = model.quantizer.encode(model.encoder(view[i : i + batch]))
                idx = idx.reshape(-1, layers) if layers > 1 else idx.reshape(-1, 1)
                for layer in range(layers):
                    counts[layer] += torch.bincount(idx[:, layer], minlength=k)
    finally:
        model.train(was_training)
    per_layer = [codebook_stats(c) for c in counts]
    out = {key: sum(s[key] for s in per_layer) / layers for key in ("usage", "perplexity")}
    out.update(dead_codes=min(s["dead_codes"] for s in per_layer), tokens=per_layer[0]["tokens"],
               collapse=any(s["collapse"] for s in per_layer), counts=counts)
    if layers > 1:
        out["layers"] = [{key: s[key] for key in ("usage", "perplexity", "dead_codes")} for s in per_layer]
    return out


# --------------------------------------------------------------------------------------------
# the autoencoder (same for every row) and quantizer adapters
# --------------------------------------------------------------------------------------------
class RunningStandardize(nn.Module):
    """Per-channel standardisation by running statistics, the same in training and evaluation.

    y = (x - mean) / sqrt(var + eps) with ``mean`` / ``var`` buffers: the first training batch
    sets them, each later one moves them by ``momentum`` towards its own statistics before they
    are applied. BatchNorm instead standardises a training batch by that batch's own statistics,
    which jitter from batch to batch, and evaluates with the running ones: the quantizer is then
    fit to latents the evaluation never produces.

    In training the value is computed as batch renormalisation (Ioffe 2017) without clipping:
    BatchNorm's output times r = sigma_batch / sigma plus d = (mu_batch - mu) / sigma, r and d
    detached. The value is the running standardisation; the gradient is BatchNorm's (times r),
    which carries no component along the batch's mean and scale. With the statistics merely
    detached the encoder is free to shrink its latent, and VQ rows collapse.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if not self.training:
            return (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)
        dims = [0, *range(2, x.ndim)]
        var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
        with torch.no_grad():
            m = 1.0 if int(self.num_batches_tracked) == 0 else self.momentum
            n = x.numel() // x.shape[1]
            self.mean.lerp_(mean_b.detach(), m)
            self.var.lerp_(var_b.detach() * n / max(n - 1, 1), m)  # unbiased, as BatchNorm's
            self.num_batches_tracked += 1
            inv = torch.rsqrt(self.var + self.eps)
            r = torch.sqrt(var_b.detach() + self.eps) * inv
            d = (mean_b.detach() - self.mean) * inv
        y = (x - mean_b.view(shape)) * torch.rsqrt(var_b.view(shape) + self.eps)
        return y * r.view(shape) + d.view(shape)


class StudyAE(nn.Module):
    """x [B, 3, H, W] -> z [B, D, H/4, W/4] -> quantizer -> recon [B, 3, H, W].

    A 4x4 patch embedding, two 3x3 convs at token resolution, and the mirror image with a 4x4
    transposed-conv "unpatchify": small enough that the quantizer's cost shows in the wall time.
    The latent is standardised per channel (``norm="running"``: RunningStandardize, the same in
    training and evaluation; ``"batch"``: BatchNorm without affine parameters), so every quantizer
    sees inputs on the same, known scale.
    """

    modality = "image"

    def __init__(self, quantizer: nn.Module, latent_dim: int, width: int, norm: str = "running",
                 momentum: float = 0.1):
        super().__init__()
        if norm not in ("running", "batch"):
            raise ValueError(f"norm must be 'running' or 'batch', got {norm!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 4, 4), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU(), nn.Conv2d(w, latent_dim, 1),
            RunningStandardize(latent_dim, momentum) if norm == "running"
            else nn.BatchNorm2d(latent_dim, momentum=momentum, affine=False))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, w, 3, 1, 1), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(w, w, 3, 1, 1), nn.GELU(), nn.ConvTranspose2d(w, 3, 4, 4))
        self.quantizer = quantizer

    @property
    def latent_norm(self) -> nn.Module:
        return self.encoder[-1]

    def forward(self, x):
        q = self.quantizer(self.encoder(x))
        return SimpleNamespace(recon=self.decoder(q.quantized), quant=q)


def study_model(quantizer: nn.Module, cfg: StudyConfig, latent_dim: int | None = None) -> StudyAE:
    """The study's autoencoder around ``quantizer`` as ``cfg`` sets it (width, latent standardisation
    and its momentum), with ``latent_dim`` (default ``cfg.latent_dim``) latent channels."""
    return StudyAE(quantizer, latent_dim or cfg.latent_dim, cfg.width, cfg.latent_norm, cfg.latent_momentum)


class PeerAdapter(nn.Module):
    """A vector-quantize-pytorch module behind vqtok's channel-first interface.

    z [B, D, h, w] -> tokens [B, h*w, D] (the peers' layout) -> (quantized, indices, loss).
    """

    def __init__(self, module: nn.Module, codebook_size: int, returns_loss: bool):
        super().__init__()
        self.module, self.codebook_size, self.returns_loss = module, codebook_size, returns_loss
        self.encode_checked = False

    def forward(self, z):
        """The module's own forward in training. In eval mode VectorQuantize's output is its code
        vector at the nearest code (no loss), which ``encode`` finds without the N x K matrix."""
        cb = None if self.training else self._codebook()
        if cb is None:
            return self._module_forward(z)
        idx = self.encode(z)
        return SimpleNamespace(quantized=cb[idx].to(z.dtype).permute(0, 3, 1, 2), indices=idx, loss=z.new_zeros(()))

    def _module_forward(self, z):
        b, d, h, w = z.shape
        out = self.module(z.flatten(2).transpose(1, 2))
        q, idx = out[0], out[1]
        loss = out[2].sum() if self.returns_loss else z.new_zeros(())
        return SimpleNamespace(quantized=q.transpose(1, 2).reshape(b, d, h, w),
                               indices=idx.reshape(b, h, w).long(), loss=loss)

    def _codebook(self) -> torch.Tensor | None:
        """VectorQuantize's codebook [K, D] when its indices are the plain nearest code (one
        codebook, no projection, Euclidean), else None."""
        cb = getattr(getattr(self.module, "_codebook", None), "embed", None)
        if (cb is None or cb.ndim != 3 or cb.shape[0] != 1 or getattr(self.module, "heads", 1) != 1
                or not isinstance(getattr(self.module, "project_in", None), nn.Identity)
                or getattr(self.module, "use_cosine_sim", False)):
            return None
        return cb[0]

    @torch.no_grad()
    def encode(self, z):
        """Indices [B, h, w] of the module in eval mode. For VectorQuantize, the exact nearest code
        of its own codebook by vqtok.ops.nearest_code (its forward builds the N x K distance
        matrix); the first call checks indices and code vectors against the module's own forward."""
        cb = None if self.training else self._codebook()
        if cb is None:
            return self._module_forward(z).indices
        from vqtok.ops import nearest_code

        b, d, h, w = z.shape
        idx = nearest_code(z.flatten(2).transpose(1, 2).reshape(-1, d).float(), cb.float())[0].reshape(b, h, w)
        if not self.encode_checked:
            own = self._module_forward(z[:64])
            same = own.indices == idx[:64]
            agree = float(same.float().mean())
            if agree < 0.999:
                raise RuntimeError(f"nearest_code agrees with the peer's own indices on only {agree:.4f} of tokens")
            q = cb[idx[:64]].to(z.dtype).permute(0, 3, 1, 2)
            if not torch.allclose(own.quantized.permute(0, 2, 3, 1)[same], q.permute(0, 2, 3, 1)[same]):
                raise RuntimeError("the peer's eval output is not its code vector at the returned index")
            self.encode_checked = True
        return idx


FSQ_LEVELS = {10: [8, 5, 5, 5], 14: [8, 8, 8, 6, 5], 18: [8, 8, 8, 8, 8, 8]}  # Mentzer et al. table 1 style
# the BSQ rows' entropy term (weight, temperature); the peers' LFQ keeps its own defaults
BSQ_ENTROPY = dict(entropy_weight=0.1, temperature=0.05)


def _sized_setting(cfg: StudyConfig, name: str, b: int, keys: tuple[str, ...]) -> dict:
    """``cfg.<name>`` for a row with 2^b codes at ``cfg.sizes``, else (the big sizes)
    ``cfg.<name>_big``, as build arguments ``keys``."""
    field = name if b in cfg.sizes else f"{name}_big"
    value = getattr(cfg, field)
    if len(value) != len(keys):
        raise ValueError(f"{field} is ({', '.join(keys)}), got {value!r}")
    return dict(zip(keys, value))


def fsq_entropy(cfg: StudyConfig, b: int) -> dict:
    """The entropy arguments of the fsq-entropy row with 2^b codes (``fsq_entropy`` / ``_big``)."""
    return _sized_setting(cfg, "fsq_entropy", b, ("entropy_weight", "temperature"))


def lfq_entropy(cfg: StudyConfig, b: int) -> dict:
    """The entropy arguments of the LFQ row with 2^b codes (``lfq_entropy`` / ``_big``)."""
    return _sized_setting(cfg, "lfq_entropy", b, ("entropy_weight", "temperature", "per_sample_weight"))


@dataclass
class Row:
    family: str
    impl: str           # "vqtok" or "vector-quantize-pytorch"
    log2_codes: int
    build: Callable[[StudyConfig], nn.Module] | None
    skip: str | None = None
    init_codes: int = 0  # k-means rows: codes per layer to initialise from one large first batch
    setup: dict = dataclasses.field(default_factory=dict)  # how the quantizer was built (for the JSON)
    min_latent: int = 0  # the row's latent has max(cfg.latent_dim, min_latent) channels (LFQ: its bits)
    lr_scales: dict = dataclasses.field(default_factory=dict)  # quantizer submodule -> multiple of the learning rate

    def latent_dim(self, cfg: StudyConfig) -> int:
        """Channels of this row's latent: ``cfg.latent_dim``, or more where the quantizer needs them."""
        return max(cfg.latent_dim, self.min_latent)


def _restart_threshold(cfg: StudyConfig, k: int) -> float:
    """Dead-code threshold (EMA count per step): ``restart_share`` of a uniform code's share T / K,
    at most 2 tokens per step (small codebooks, e.g. residual layers, restart only rare codes)."""
    return min(2.0, cfg.restart_share * cfg.tokens_per_step / k)


def _seeding(how: str) -> dict:
    """k-means seeding as a build argument, left out at the default (so the setup names only changes)."""
    return {} if how == "kmeans++" else {"kmeans_seeding": how}


def _vqtok_row(family: str, b: int, name: str, cfg: StudyConfig, init_codes: int = 0, min_latent: int = 0,
               lr_scales: dict | None = None, **setup) -> Row:
    """A vqtok row: build_quantizer(name, dim=the row's latent channels, **setup); ``setup`` goes
    into the JSON, with ``latent_dim`` where the row widens the latent (``min_latent``) and
    ``lr_scales`` where submodules of the quantizer train at a multiple of the learning rate."""
    from vqtok.quantizers import build_quantizer

    lr_scales = {k: v for k, v in (lr_scales or {}).items() if v != 1.0}
    recorded = {"quantizer": name, **setup, **({"latent_dim": min_latent} if min_latent > cfg.latent_dim else {}),
                **({"lr_scales": lr_scales} if lr_scales else {})}
    return Row(family, "vqtok", b, lambda c: build_quantizer(name, dim=max(c.latent_dim, min_latent), **setup),
               init_codes=init_codes, setup=recorded, min_latent=min_latent, lr_scales=lr_scales)


def vqtok_rows(cfg: StudyConfig) -> list[Row]:
    """Every family at every size; the usage aids each family is built with are in its setup."""
    rows = []
    for b in cfg.sizes:
        k, kr = 2**b, 2 ** (b // 2)
        where = dict(restart=cfg.vq_restart) if cfg.vq_restart != "random" else {}
        search = dict(search_precision=cfg.vq_search) if cfg.vq_search != "exact" else {}
        where.update(search)
        if cfg.vq_decay != 0.99:
            where["decay"] = cfg.vq_decay
        restart = dict(learning="ema", kmeans_init=True, dead_code_threshold=_restart_threshold(cfg, k),
                       estimator=cfg.vq_estimator, **where)
        rows += [
            _vqtok_row("vq-plain", b, "vq", cfg, codebook_size=k, learning="grad", **search),
            _vqtok_row("vq-ema-kmeans-restart" + ("-rot" if cfg.vq_ema_estimator == "rotation" else ""), b, "vq",
                       cfg, k, codebook_size=k, **{**restart, "estimator": cfg.vq_ema_estimator},
                       **_seeding(cfg.vq_kmeans_seeding)),
            _vqtok_row(f"vq-l2norm-dim{cfg.l2norm_dim}", b, "vq", cfg, k, codebook_size=k,
                       codebook_dim=cfg.l2norm_dim, metric="cosine",
                       **restart, **_seeding(cfg.l2norm_kmeans_seeding)),
            _vqtok_row("rvq-2x", b, "rvq", cfg, kr, codebook_size=kr, num_quantizers=2, learning="ema",
                       kmeans_init=True, dead_code_threshold=_restart_threshold(cfg, kr), estimator=cfg.vq_estimator,
                       **where, **_seeding(cfg.vq_kmeans_seeding)),
            _vqtok_row("simvq", b, "simvq", cfg, codebook_size=k, init_std=cfg.simvq_init_std, beta=cfg.simvq_beta,
                       lr_scales={"proj": cfg.simvq_proj_lr}, **search),
            _vqtok_row("bsq", b, "bsq", cfg, min_latent=b, bits=b, **BSQ_ENTROPY),
        ]
    for b in (*cfg.sizes, *cfg.big_sizes):
        rows += [
            _vqtok_row("fsq", b, "fsq", cfg, levels=FSQ_LEVELS[b], proj_init=cfg.fsq_proj_init,
                       **({"noise": cfg.fsq_noise} if cfg.fsq_noise else {})),
            _vqtok_row("fsq-entropy", b, "fsq", cfg, levels=FSQ_LEVELS[b], proj_init=cfg.fsq_entropy_proj_init,
                       **fsq_entropy(cfg, b)),
            # B bits need B latent channels: a Linear from fewer spans a subspace whose regions
            # cannot hold all 2^B sign patterns evenly (a 16-channel Gaussian latent reaches ~half of 2^18)
            _vqtok_row("lfq", b, "lfq", cfg, min_latent=b, bits=b, **lfq_entropy(cfg, b)),
        ]
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
            threshold_ema_dead_code=_restart_threshold(c, k), rotation_trick=True), k, True), init_codes=k,
            setup={"quantizer": "VectorQuantize", "decay": 0.99, "commitment_weight": 0.25, "kmeans_init": True,
                   "threshold_ema_dead_code": _restart_threshold(cfg, k), "rotation_trick": True}))
    for b in (*cfg.sizes, *cfg.big_sizes):
        rows.append(Row("fsq", impl, b, lambda c, b=b: PeerAdapter(
            vqp.FSQ(levels=FSQ_LEVELS[b], dim=d), math.prod(FSQ_LEVELS[b]), False),
            setup={"quantizer": "FSQ", "levels": FSQ_LEVELS[b]}))
    for b in (*cfg.sizes, *cfg.big_sizes):
        gib = 3 * tokens * 2**b * 4 / 2**30  # logits, probabilities and their gradient, fp32
        skip = f"needs ~{gib:.1f} GiB for its {tokens}x2^{b} probabilities" if gib > cfg.peer_lfq_max_gib else None
        rows.append(Row("lfq-entropy", impl, b, lambda c, b=b: PeerAdapter(
            vqp.LFQ(dim=max(c.latent_dim, b), codebook_size=2**b, entropy_loss_weight=0.1), 2**b, True), skip=skip,
            setup={"quantizer": "LFQ", "entropy_loss_weight": 0.1}, min_latent=b))
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


def stop_restarts(quantizer: nn.Module) -> int:
    """Turns dead-code restarts off in every codebook of ``quantizer`` (vqtok's VectorQuantizer and
    residual layers: ``dead_code_threshold``; vector-quantize-pytorch's codebooks:
    ``threshold_ema_dead_code``). Returns how many codebooks had them on."""
    n = 0
    for m in quantizer.modules():
        for attr in ("dead_code_threshold", "threshold_ema_dead_code"):
            if getattr(m, attr, 0) > 0:
                setattr(m, attr, type(getattr(m, attr))(0))
                n += 1
    return n


def restarts_in(stats: dict) -> int | None:
    """Codes a quantizer step restarted, from its stats ("restarted", per layer "layerN/restarted"
    for residual VQ); None when it reports no restarts (no restarts configured, or a peer)."""
    vals = [float(v) for k, v in stats.items() if k == "restarted" or k.endswith("/restarted")]
    return int(sum(vals)) if vals else None


def learning_rate(cfg: StudyConfig, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: constant, or a cosine from
    ``lr`` down to ``lr * lr_final`` at the last step."""
    if cfg.lr_decay == "constant":
        return cfg.lr
    if cfg.lr_decay != "cosine":
        raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {cfg.lr_decay!r}")
    t = min(step / max(steps - 1, 1), 1.0)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------------
# the budget: a row's step time against the autoencoder's own, measured in the same process
# --------------------------------------------------------------------------------------------
class PassThrough(nn.Module):
    """No quantizer: the latent goes to the decoder as it is (the budget's reference model)."""

    def forward(self, z):
        return SimpleNamespace(quantized=z, indices=None, loss=z.new_zeros(()), stats={})


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor):
    """One optimiser step on MSE + the quantizer's loss; returns the model's output and the loss."""
    out = model(x)
    loss = F.mse_loss(out.recon, x) + out.quant.loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return out, loss


def base_step_s(cfg: StudyConfig, train: Crops, latent_dim: int | None = None) -> float:
    """Seconds per training step of the autoencoder without a quantizer (``PassThrough``): the
    median of 2 x ``probe_steps`` steps after ``probe_steps`` warm-up steps, on ``train``'s
    crops, with ``latent_dim`` (default ``cfg.latent_dim``) latent channels. Rows measure it just
    before they train, so their cost (step time / this) does not move with the machine's speed,
    which on a shared virtual machine changes from minute to minute."""
    model = study_model(PassThrough(), cfg, latent_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    times = []
    for _ in range(3 * cfg.probe_steps):
        x = train.batch(cfg.batch)
        t = time.perf_counter()
        train_step(model, opt, x)
        times.append(time.perf_counter() - t)
    return float(np.median(times[cfg.probe_steps:]))


def budget_steps(cfg: StudyConfig, step_s: float, base_s: float) -> int:
    """The steps a row runs when each costs ``step_s`` seconds and the autoencoder's own ``base_s``:
    all ``cfg.steps`` when they fit in ``budget`` x the autoencoder's ``cfg.steps`` steps and in
    ``max_train_s``, else the steps that fit (at least 2 x ``probe_steps``, the ones already run)."""
    fit = min(cfg.steps * cfg.budget * base_s / step_s, cfg.max_train_s / step_s)
    return max(2 * cfg.probe_steps, min(cfg.steps, int(fit)))


def plan_steps(cfg: StudyConfig, done: int, step_s: float, base_s: float, steps: int) -> int:
    """A row's planned steps after ``done`` steps (``steps``: the plan so far). After the probe
    (``done`` = 2 x ``probe_steps``, ``step_s`` its median) a row over twice the budget is cut to
    ``budget_steps`` at once (the peers' rows that cost 60x the autoencoder); every
    ``replan_steps`` steps after that (``step_s``: the mean so far) the plan becomes
    ``budget_steps``, never fewer than ``done``. So a row is not cut by a probe that a neighbour's
    burst slowed down, and a row over the budget is cut by its own mean."""
    if done == 2 * cfg.probe_steps:
        return budget_steps(cfg, step_s, base_s) if step_s > 2 * cfg.budget * base_s else steps
    if done > 2 * cfg.probe_steps and done % cfg.replan_steps == 0:
        return max(done, budget_steps(cfg, step_s, base_s))
    return steps


# --------------------------------------------------------------------------------------------
# one row: train, then evaluate on the held-out crops
# --------------------------------------------------------------------------------------------
def build_model(row: Row, cfg: StudyConfig) -> StudyAE:
    """The row's autoencoder around its quantizer. The encoder and decoder weights come from
    ``cfg.seed`` alone, whatever the quantizer draws from torch's global generator when it is
    built (its own draws come from a generator forked off at ``cfg.seed``): every row of one seed
    starts from the same autoencoder, so rows compare in pairs, not through their init's luck."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 7919)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer = row.build(cfg)
    torch.manual_seed(cfg.seed)
    return study_model(quantizer, cfg, row.latent_dim(cfg))


def param_groups(model: StudyAE, row: Row) -> list[dict]:
    """The optimiser's parameter groups, each with its ``lr_scale`` (the multiple of the schedule's
    learning rate it trains at): the quantizer's submodules named in ``row.lr_scales`` at theirs
    (SimVQ's linear map W, ``proj``, at ``simvq_proj_lr``), everything else at 1; the same groups
    as ``vqtok train``'s ``train.lr_scales``."""
    from vqtok.train import param_groups as train_groups

    return train_groups(model, {f"quantizer.{name}": scale for name, scale in row.lr_scales.items()})


def run_row(row: Row, cfg: StudyConfig, train: Crops, held_out: torch.Tensor,
            held_out_photos: list[torch.Tensor], keep: bool = False) -> dict:
    """Train one row, then evaluate: reconstruction on the ``held_out`` tiles, codebook health on
    every ``dense_views`` view of ``held_out_photos``. ``keep`` adds the trained ``model`` and the
    per-code histograms (``code_counts``: "held_out", and "held_in" with ``held_in_usage``; int64
    [layers, K]) to the result, for inspection (not JSON). The row's step time (the median of steps
    probe_steps+1 .. 2 probe_steps, after k-means init and warm-up, then its mean so far) against
    the autoencoder's own (``base_step_s``, measured first) sets its steps (``plan_steps``;
    ``steps`` in the result); a row whose steps then run past 1.25 x that budget, or
    ``max_train_s``, stops there."""
    from vqtok.evaluate import evaluate

    base = {"family": row.family, "impl": row.impl, "log2_codes": row.log2_codes, "setup": row.setup}
    if row.skip:
        return {**base, "skipped": row.skip}
    if cfg.latent_momentum_decay not in ("constant", "lr"):
        raise ValueError(f"latent_momentum_decay must be 'constant' or 'lr', got {cfg.latent_momentum_decay!r}")
    latent_dim = row.latent_dim(cfg)
    base_s = base_step_s(cfg, train, latent_dim)  # before the row's seeds: its crops and weights do not see it
    stop_s = min(cfg.max_train_s, 1.25 * cfg.budget * cfg.steps * base_s)
    model = build_model(row, cfg)
    quantizer = model.quantizer
    opt = torch.optim.AdamW(param_groups(model, row), lr=cfg.lr, weight_decay=0.0)
    train.g.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model.train()
    if row.init_codes:  # k-means sees init_tokens_per_code x K tokens, not just one small batch
        n = max(cfg.batch, -(-cfg.init_tokens_per_code * row.init_codes // (cfg.crop // 4) ** 2))
        with torch.no_grad():
            model.quantizer(model.encoder(train.batch(n)))
            _rescale_ema_counts(model.quantizer, cfg.tokens_per_step / (n * (cfg.crop // 4) ** 2))
    steps = cfg.steps
    t_steps = time.perf_counter()
    restarting, restarts, probe = True, [], []  # restarts: codes restarted at each step (vqtok rows)
    for step in range(cfg.steps):
        lr = learning_rate(cfg, step, steps)
        for group in opt.param_groups:
            group["lr"] = group["lr_scale"] * lr
        if cfg.latent_momentum_decay == "lr":
            model.latent_norm.momentum = cfg.latent_momentum * lr / cfg.lr
        if restarting and step >= cfg.restart_stop * steps:
            stop_restarts(model.quantizer)
            restarting = False
        x = train.batch(cfg.batch)
        t = time.perf_counter()
        out, loss = train_step(model, opt, x)
        restarts.append(restarts_in(getattr(out.quant, "stats", None) or {}))
        if cfg.probe_steps <= step < 2 * cfg.probe_steps:
            probe.append(time.perf_counter() - t)
        if step + 1 == 2 * cfg.probe_steps:  # a row far over the budget trains for the steps that fit in it
            steps = plan_steps(cfg, step + 1, float(np.median(probe)), base_s, steps)
        elif step + 1 > 2 * cfg.probe_steps:  # any row over the budget, by its mean step so far
            steps = plan_steps(cfg, step + 1, (time.perf_counter() - t_steps) / (step + 1), base_s, steps)
        if step + 1 == steps:
            break
        if step + 1 >= 2 * cfg.probe_steps and time.perf_counter() - t_steps >= stop_s:
            # steps slower than the probe projected (a neighbour on the cores): stop
            steps = step + 1
            break
    steps_s = time.perf_counter() - t_steps
    train_s = time.perf_counter() - t0
    reported = any(r is not None for r in restarts)
    m = evaluate(model, torch.utils.data.TensorDataset(held_out), batch_size=64, lpips=False, fid=False,
                 progress=False)
    t1 = time.perf_counter()
    layers = int(getattr(quantizer, "num_quantizers", 1) or 1)
    health = held_out_codebook_health(model, held_out_photos, cfg.eval_tile, layers)
    extra = {"model": model, "code_counts": {"held_out": health["counts"]}} if keep else {}
    if cfg.held_in_usage:  # the same measurement on the training photos: separates shift from dead codes
        held_in = held_out_codebook_health(model, train.photos, cfg.eval_tile, layers)
        extra.update(held_in_usage=held_in["usage"], held_in_perplexity=held_in["perplexity"],
                     held_in_tokens=held_in["tokens"])
        if keep:
            extra["code_counts"]["held_in"] = held_in["counts"]
    k = int(quantizer.codebook_size)  # per layer for RVQ, whose usage is the mean over layers
    return {**base, **extra, "codebook_size": k**layers,
            "usage_ceiling": min(k, int(health["tokens"])) / k,  # the most usage these held-out tokens allow
            "usage": health["usage"], "perplexity": health["perplexity"], "dead_codes": health["dead_codes"],
            "collapse": health["collapse"], "tokens": health["tokens"], "psnr": m["psnr"], "ssim": m["ssim"],
            "steps": steps, "train_s": train_s, "eval_s": m["seconds"] + time.perf_counter() - t1,
            # the row's mean step time against the autoencoder's own (no quantizer), same process
            "base_step_ms": 1e3 * base_s, "cost": steps_s / steps / base_s,
            "final_loss": float(loss.detach()), "layers": health.get("layers", []),
            # codes restarted over the row, and in its last tenth of steps (None: never reported)
            "restarts": sum(r or 0 for r in restarts) if reported else None,
            "restarts_last_tenth": sum(r or 0 for r in restarts[-max(1, len(restarts) // 10):]) if reported else None,
            "latent_stats_batches": int(model.latent_norm.num_batches_tracked)}  # batches in its running stats


def format_table(results: list[dict]) -> str:
    head = (f"{'family':27s} {'impl':9s} {'codes':>7s} {'usage':>6s} {'perplex':>8s} {'dead':>7s} "
            f"{'collapse':>8s} {'PSNR':>6s} {'SSIM':>6s} {'steps':>5s} {'train_s':>7s} {'cost':>5s} {'ceiling':>7s}")
    if any("held_in_usage" in r for r in results):
        head += f" {'held-in':>7s}"
    lines = [head, "-" * len(head)]
    for r in results:
        impl = "vqtok" if r["impl"] == "vqtok" else "vqp"
        codes = f"2^{r['log2_codes']}"
        if "skipped" in r:
            lines.append(f"{r['family']:27s} {impl:9s} {codes:>7s}  skipped: {r['skipped']}")
            continue
        held_in = f" {r['held_in_usage']:7.3f}" if "held_in_usage" in r else ""
        lines.append(f"{r['family']:27s} {impl:9s} {codes:>7s} {r['usage']:6.3f} {r['perplexity']:8.1f} "
                     f"{r['dead_codes']:7d} {'YES' if r['collapse'] else 'no':>8s} {r['psnr']:6.2f} "
                     f"{r['ssim']:6.3f} {r['steps']:5d} {r['train_s']:7.1f} {r['cost']:5.2f} {r['usage_ceiling']:7.3f}"
                     f"{held_in}")
    return "\n".join(lines)


def seed_summary(results: list[dict]) -> list[dict]:
    """Rows run at more than one seed: the seeds, and the mean / min / max of usage, PSNR, SSIM and
    train_s, with how many seeds flagged collapse (one dict per family/impl/size, first-seen order)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "skipped" not in r:
            groups.setdefault((r["family"], r["impl"], r["log2_codes"]), []).append(r)
    out = []
    for (family, impl, b), rs in groups.items():
        if len(rs) < 2:
            continue
        row = {"family": family, "impl": impl, "log2_codes": b, "seeds": [r.get("seed") for r in rs],
               "collapse_seeds": sum(bool(r["collapse"]) for r in rs)}
        for key in ("usage", "psnr", "ssim", "train_s"):
            vals = [float(r[key]) for r in rs]
            row[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        out.append(row)
    return out


def format_seed_table(summary: list[dict]) -> str:
    """The seed summary as text: mean and [min, max] per metric."""
    head = (f"{'family':27s} {'impl':9s} {'codes':>7s} {'seeds':>5s} {'usage mean [min, max]':>24s} "
            f"{'PSNR mean [min, max]':>24s} {'SSIM':>6s} {'train_s':>7s} {'collapse':>8s}")
    lines = [head, "-" * len(head)]
    for r in summary:
        impl = "vqtok" if r["impl"] == "vqtok" else "vqp"
        u, p = r["usage"], r["psnr"]
        lines.append(f"{r['family']:27s} {impl:9s} {'2^' + str(r['log2_codes']):>7s} {len(r['seeds']):5d} "
                     f"{u['mean']:7.3f} [{u['min']:.3f}, {u['max']:.3f}] {p['mean']:8.2f} [{p['min']:.2f}, "
                     f"{p['max']:.2f}] {r['ssim']['mean']:6.3f} {r['train_s']['mean']:7.1f} "
                     f"{r['collapse_seeds']:>4d}/{len(r['seeds'])}")
    return "\n".join(lines)


def row_runner(cfg: StudyConfig, held_out_photos: list[torch.Tensor] | None = None) -> Callable[[Row, int], dict]:
    """``run(row, seed)``: ``run_row`` at that seed on the study's data, loaded once: the training
    crops (reseeded per row) and the held-out photos (``held_out_photos`` when already loaded)
    with their tiles."""
    train = Crops(photo_set(TRAIN_PHOTOS, cfg.scales), cfg.crop, cfg.seed)
    photos = held_out_photos if held_out_photos is not None else photo_set(EVAL_PHOTOS, cfg.scales)
    held_out = tiles(photos, cfg.eval_tile)
    return lambda row, seed: run_row(row, dataclasses.replace(cfg, seed=seed), train, held_out, photos)


def study_rows(cfg: StudyConfig) -> list[Row]:
    """Every row of the study, in table order: vqtok's, then the peers'."""
    return vqtok_rows(cfg) + peer_rows(cfg)


def run_study(cfg: StudyConfig, rows_filter: list[str] | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None, seeds: list[int] | None = None,
              jobs: int = 1, threads: int | None = None) -> dict:
    """Train and evaluate every row at every seed of ``seeds`` (default: ``cfg.seed``); returns
    {"config", "held_out", "results", "seconds"}, and "seed_summary" (``seed_summary``) when there
    is more than one seed. ``jobs`` > 1 runs rows in that many worker processes at once
    (``run_in_workers``) with ``threads`` // ``jobs`` torch threads each; results stay in table
    order. ``on_row`` gets that dict (results so far) after every row, e.g. to save them."""
    from tqdm.auto import tqdm

    seeds = [cfg.seed] if not seeds else list(dict.fromkeys(seeds))
    t0 = time.perf_counter()
    held_out_photos = photo_set(EVAL_PHOTOS, cfg.scales)
    held_out = tiles(held_out_photos, cfg.eval_tile)
    rows = study_rows(cfg)
    picked = [i for i, r in enumerate(rows)
              if not rows_filter or any(f in f"{r.family}/{r.impl}/2^{r.log2_codes}" for f in rows_filter)]
    held = {"photos": EVAL_PHOTOS, "scales": cfg.scales, "tiles": len(held_out),
            "tokens": len(held_out) * (cfg.eval_tile // 4) ** 2,
            "usage_tokens": dense_token_count(held_out_photos, cfg.eval_tile)}
    res = {"config": {**dataclasses.asdict(cfg), "seeds": seeds}, "held_out": held, "results": [],
           "seconds": 0.0, "jobs": jobs}
    runs = [(i, seed) for i in picked for seed in (seeds if not rows[i].skip else seeds[:1])]
    if jobs > 1:
        done = run_in_workers(cfg, rows, runs, jobs, threads or torch.get_num_threads())
    else:
        run = row_runner(cfg, held_out_photos)
        done = (((i, seed), run(rows[i], seed)) for i, seed in runs)
    finished = {}
    bar = tqdm(total=len(runs), desc="quantizer study", disable=not progress)
    for (i, seed), result in done:
        finished[(i, seed)] = {**result, "seed": seed}
        res["results"] = [finished[run] for run in runs if run in finished]  # table order
        res["seconds"] = time.perf_counter() - t0
        if len(seeds) > 1:
            res["seed_summary"] = seed_summary(res["results"])
        bar.update()
        row = rows[i]
        bar.set_postfix_str(f"{row.family} {row.impl} 2^{row.log2_codes}" + (f" seed {seed}" if len(seeds) > 1 else ""))
        if progress:  # each row as it finishes (the full table is printed at the end)
            bar.write(format_table([finished[(i, seed)]]).splitlines()[-1])
        if on_row is not None:
            on_row(res)
    bar.close()
    return res


# each vqtok family's vector-quantize-pytorch counterpart (the rows the README compares in pairs)
PEER_FAMILY = {"vq-ema-kmeans-restart-rot": "vq-ema-kmeans-restart-rot",
               "vq-ema-kmeans-restart": "vq-ema-kmeans-restart-rot", "fsq": "fsq", "lfq": "lfq-entropy"}


def run_order(rows: list[Row], runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The order workers take ``runs`` (row index, seed) in, skipped rows left out: rows with more
    codes first, so the long rows do not end the study alone; at a size, each peer row (in table
    order) with its vqtok counterpart right after it at the same seed, so a pair trains side by
    side or back to back, under the same phase of a shared machine (its ``train s`` and ``cost``
    compare); then the vqtok rows without a counterpart."""
    peer_at = {(r.family, r.log2_codes): i for i, r in enumerate(rows) if r.impl != "vqtok" and not r.skip}

    def key(run):
        i, seed = run
        r = rows[i]
        anchor = i if r.impl != "vqtok" else peer_at.get((PEER_FAMILY.get(r.family), r.log2_codes))
        return (-r.log2_codes, anchor is None, anchor or 0, seed, r.impl == "vqtok", i)

    return sorted((run for run in runs if not rows[run[0]].skip), key=key)


def run_in_workers(cfg: StudyConfig, rows: list[Row], runs: list[tuple[int, int]], jobs: int, threads: int):
    """Yields ((row index, seed), result) for every run of ``runs`` as ``jobs`` worker processes
    (this script with ``--worker``, ``threads`` // ``jobs`` torch threads each) finish them, in
    ``run_order``; a skipped row is answered here. A row that fails in its worker raises here
    with the worker's traceback, after the other workers have been stopped."""
    todo = run_order(rows, runs)
    for run in runs:
        if rows[run[0]].skip:
            yield run, run_row(rows[run[0]], cfg, None, None, None)
    lock, results = threading.Lock(), queue.Queue()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(cfg)),
           "--threads", str(max(1, threads // jobs))]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
             for _ in range(min(jobs, len(todo)))]

    def serve(proc: subprocess.Popen) -> None:  # one thread per worker: hand it rows until none are left
        while True:
            with lock:
                if not todo:
                    break
                run = todo.pop(0)
            try:
                proc.stdin.write(json.dumps({"row": run[0], "seed": run[1]}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except OSError as e:
                line = json.dumps({"error": f"lost the worker: {e}"}) + "\n"
            if not line:
                line = json.dumps({"error": f"the worker exited with code {proc.wait()}"}) + "\n"
            results.put((run, json.loads(line)))
        proc.stdin.close()

    servers, n = [threading.Thread(target=serve, args=(p,), daemon=True) for p in procs], len(todo)
    for t in servers:
        t.start()
    try:
        for _ in range(n):
            run, msg = results.get()
            if "error" in msg:
                row = rows[run[0]]
                raise RuntimeError(f"row {row.family}/{row.impl}/2^{row.log2_codes} seed {run[1]} failed in its "
                                   f"worker:\n{msg['error']}")
            yield run, msg["result"]
    finally:
        with lock:
            todo.clear()
        for p in procs:
            if p.poll() is None and any(t.is_alive() for t in servers):
                p.terminate()
        for p in procs:
            p.wait()


def worker(cfg_json: str) -> int:
    """``--worker CONFIG``: runs the rows that arrive on stdin as JSON lines {"row", "seed"} (row:
    the index in ``study_rows``) and answers each with one JSON line {"result"} or {"error"} on
    stdout; anything else the row prints goes to stderr. Ends at the end of stdin."""
    fields = json.loads(cfg_json)
    cfg = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    rows, run = study_rows(cfg), row_runner(cfg)
    answer, sys.stdout = sys.stdout, sys.stderr
    for line in sys.stdin:
        task = json.loads(line)
        try:
            msg = {"result": run(rows[task["row"]], task["seed"])}
        except Exception:
            msg = {"error": traceback.format_exc()}
        answer.write(json.dumps(msg) + "\n")
        answer.flush()
    return 0


def override(cfg: StudyConfig, assignments: list[str]) -> StudyConfig:
    """``cfg`` with ``KEY=VALUE`` assignments applied; VALUE is parsed as the field's type (tuples
    as comma-separated lists of numbers). Raises ValueError on an unknown key or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    changes = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}")
        current = getattr(FULL, key)  # the field's type (QUICK may hold an empty tuple)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif isinstance(current, tuple):
                value = tuple(type(current[0] if current else 0.0)(v) for v in text.split(",") if v.strip())
            else:
                value = type(current)(text)
        except ValueError:
            raise ValueError(f"--set {key}: cannot read {text!r} as {type(current).__name__}") from None
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 2^10 only, 10 steps")
    ap.add_argument("--steps", type=int, default=None, help="override the optimiser steps per row")
    ap.add_argument("--rows", default="", help="comma-separated substrings of 'family/impl/2^b' to run")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path ('-': stdout)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar (it goes to stderr)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows trained at once, each in its own process with threads / jobs torch threads")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # run_in_workers' worker processes
    ap.add_argument("--held-in-usage", action="store_true",
                    help="also report usage on the dense views of the training photos (column held-in)")
    ap.add_argument("--seeds", default="", metavar="S,S,...",
                    help="run every row at each of these seeds (instead of seed); adds a mean [min, max] table")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a StudyConfig field (repeatable), e.g. --set seed=1 --set max_train_s=60")
    args = ap.parse_args(argv)
    if args.worker is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        return worker(args.worker)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    cfg = QUICK if args.quick else FULL
    try:
        cfg = override(cfg, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.held_in_usage:
        cfg = dataclasses.replace(cfg, held_in_usage=True)
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    def save(res: dict) -> None:  # rewritten after every row, so an interrupted run keeps its rows
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)

    on_row = save if args.json and args.json != "-" else None
    res = run_study(cfg, [s for s in args.rows.split(",") if s], progress=not args.no_progress, on_row=on_row,
                    seeds=seeds, jobs=args.jobs, threads=args.threads)
    print(format_table(res["results"]))
    if res.get("seed_summary"):
        print(f"\nover seeds {', '.join(map(str, res['config']['seeds']))}:")
        print(format_seed_table(res["seed_summary"]))
    print(f"held-out: {', '.join(EVAL_PHOTOS)} at scales {cfg.scales}: PSNR/SSIM on {res['held_out']['tiles']} "
          f"tiles ({res['held_out']['tokens']} tokens), codebook health on {res['held_out']['usage_tokens']} tokens "
          f"(every 4 px phase, mirrored); {cfg.steps} steps x {cfg.batch} crops "
          f"({cfg.tokens_per_step} tokens) per row; {args.jobs} row(s) at a time; total {res['seconds']:.0f} s\n"
          f"cost = the row's step time / the autoencoder's own without a quantizer (budget {cfg.budget:g}x); "
          f"ceiling = min(K, held-out tokens) / K: the highest usage the held-out set can show")
    if args.json == "-":
        print(json.dumps(res, indent=2))
    elif on_row is not None:
        save(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
