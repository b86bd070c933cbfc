"""Evaluate a tokenizer on a held-out set: codebook health and reconstruction quality.

``evaluate(model, data)`` streams the set once (bounded memory, DDP-aware, tqdm bar) and returns
a JSON-safe dict:

===============  ==========================================================================
key              meaning
===============  ==========================================================================
samples          number of evaluated samples (summed over ranks)
tokens           number of code indices counted (per layer for residual quantizers)
codebook_size    K (per layer for residual quantizers)
usage            fraction of the K codes used at least once over the set
perplexity       exp of the entropy of the code histogram (effective number of codes)
entropy_bits     entropy of the code histogram, in bits (log2 K at most)
dead_codes       codes never used over the set
collapse         True when few of the codes the set could reach carry it (see codebook_stats)
layers           residual quantizers only: a list of the above per depth layer
l1               mean absolute reconstruction error (inputs in [-1, 1])
psnr, ssim       mean per-sample PSNR (dB, data range 2) and SSIM; None where not applicable
lpips, rfid      mean LPIPS / reconstruction FID; None when unavailable
unavailable      {metric: {"reason", "path"}} for every metric that could not be computed
seconds          wall time of the evaluation
===============  ==========================================================================

The model contract (``vqtok.models.VQAutoencoder``): ``forward(x)`` returns an object with
``.recon`` and ``.quant.indices``; ``.quantizer.codebook_size``; optional ``.modality`` and
``.quantizer.num_quantizers`` (residual depth: indices carry a trailing depth axis).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .metrics.accumulate import CountAccumulator, MeanAccumulator, all_reduce_sum, dist_ready
from .metrics.fid import FIDAccumulator, load_fid_extractor
from .metrics.perceptual import LPIPSMetric, Unavailable, load_lpips
from .metrics.reconstruction import psnr, ssim

__all__ = ["evaluate", "run_evaluation", "EvalOutcome", "codebook_stats", "evaluate_checkpoint", "find_run_dir"]

# Histograms are dense int64 [K]; larger codebooks report usage from unique counts per batch only.
MAX_DENSE_CODES = 1 << 24


@dataclass
class EvalOutcome:
    """metrics: the JSON dict; counts: code histograms (one int64 [K] per layer);
    examples: up to ``keep_examples`` (original, reconstruction) pairs on the CPU for figures."""

    metrics: dict
    counts: list[torch.Tensor] = field(default_factory=list)
    originals: torch.Tensor | None = None
    reconstructions: torch.Tensor | None = None


def codebook_stats(counts: torch.Tensor) -> dict:
    """Codebook health from a histogram counts int [K] over an evaluation set.

    The numbers come from ``vqtok.metrics.codebook.CodebookHealth`` fed the whole-set histogram
    once (usage, unused/dead codes, perplexity, entropy). The collapse flag uses the tracker's
    thresholds against the codes the set could reach, min(K, tokens), so a 2^18-code FSQ seen
    through a few thousand tokens is not flagged for being large: collapse when
    used / reachable < min_usage or perplexity < min_perplexity * reachable.
    """
    from .metrics.codebook import CodebookHealth

    k = int(counts.numel())
    tracker = CodebookHealth(k, sync=False)
    tracker.update_counts(counts.to(torch.int64), reduced=True)
    stats = tracker.summary()
    total = stats["tokens"]
    used = k - stats["unused_codes"]
    reachable = max(1, min(k, total))
    stats["used_codes"] = used
    stats["collapse"] = bool(total > 0 and (used / reachable < tracker.min_usage
                                            or stats["perplexity"] < tracker.min_perplexity * reachable))
    return stats


def _first_tensor(batch) -> torch.Tensor:
    """Datasets yield tensors, (x, ...) tuples or {"x": ...} dicts."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "image", "video", "audio", "input"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def _make_loader(data, batch_size: int, max_samples: int | None, num_workers: int,
                 sync: bool) -> tuple[DataLoader, int | None]:
    """A loader over this rank's shard, and the number of samples this rank may use (None: all)."""
    world = torch.distributed.get_world_size() if sync else 1
    rank = torch.distributed.get_rank() if sync else 0
    if isinstance(data, DataLoader) or not isinstance(data, Dataset):
        # an iterable/loader is taken as already sharded; split the sample budget evenly
        limit = None if max_samples is None else -(-max_samples // world)
        return data, limit
    n = len(data) if max_samples is None else min(len(data), max_samples)
    shard = Subset(data, list(range(rank, n, world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers), None


def _resolve_metric(value, loader_fn, device):
    """True -> load the real metric (or Unavailable); False/None -> skipped; an instance -> used."""
    if value is True:
        return loader_fn(device=device)
    return value or None


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Streams:
    """All running sums of one evaluation."""

    def __init__(self, codebook_size: int, depth: int | None, lpips_metric, fid_metric):
        self.depth = depth
        layers = depth or 1
        self.dense = codebook_size <= MAX_DENSE_CODES
        self.counts = [CountAccumulator(codebook_size) for _ in range(layers)] if self.dense else []
        self.means = {name: MeanAccumulator() for name in ("l1", "psnr", "ssim", "lpips")}
        self.lpips = lpips_metric
        self.fid = FIDAccumulator(fid_metric) if fid_metric is not None else None

    def update(self, x: torch.Tensor, recon: torch.Tensor, indices: torch.Tensor, image_like: bool) -> None:
        indices = indices.detach()
        if self.dense:
            if self.depth:
                for layer, acc in enumerate(self.counts):
                    ids = indices[..., layer]
                    acc.update(ids[ids >= 0])  # -1: a layer dropped by quantizer dropout
            else:
                self.counts[0].update(indices)
        self.means["l1"].update((x - recon).abs().reshape(x.shape[0], -1).mean(1))
        self.means["psnr"].update(psnr(x, recon))
        if image_like and min(x.shape[-2:]) >= 11:
            self.means["ssim"].update(ssim(x, recon))
        if image_like and self.lpips is not None:
            self.means["lpips"].update(self.lpips(x, recon))
        if image_like and self.fid is not None:
            self.fid.update(x, recon)

    def all_reduce(self) -> None:
        for acc in [*self.counts, *self.means.values()]:
            acc.all_reduce()
        if self.fid is not None:
            self.fid.all_reduce()


@torch.no_grad()
def run_evaluation(
    model: torch.nn.Module,
    data,
    *,
    max_samples: int | None = None,
    batch_size: int = 16,
    lpips: bool | LPIPSMetric | Unavailable = True,
    fid: bool | torch.nn.Module | Unavailable = True,
    keep_examples: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
    sync: bool | None = None,
) -> EvalOutcome:
    """Evaluate ``model`` on ``data`` (a Dataset, DataLoader or iterable of batches). See module doc.

    ``lpips``/``fid``: True loads the real metric (reported unavailable with the missing weights
    file otherwise), False skips it, or pass a ready ``LPIPSMetric`` / feature extractor.
    ``sync``: shard a Dataset over the ranks and all-reduce the sums (every rank must call);
    None: when a process group with several ranks is initialised. Pass False when only one
    rank evaluates (e.g. rank 0 during training).
    """
    from tqdm.auto import tqdm

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    device = _model_device(model)
    modality = getattr(model, "modality", "image")
    image_like = modality in ("image", "video")
    unavailable: dict[str, dict] = {}
    lp = _resolve_metric(lpips, load_lpips, device) if image_like else None
    fe = _resolve_metric(fid, load_fid_extractor, device) if image_like else None
    for name, m in (("lpips", lp), ("rfid", fe)):
        if isinstance(m, Unavailable):
            unavailable[name] = {"reason": m.reason, "path": m.path}
    if isinstance(lp, LPIPSMetric) and not lp.real_weights:
        unavailable["lpips"] = {"reason": "LPIPS built with a random backbone (code-path check only)", "path": None}
    if not image_like:
        for name in ("ssim", "lpips", "rfid"):
            unavailable[name] = {"reason": f"image metric, not defined for {modality}", "path": None}
    quantizer = model.quantizer
    depth = getattr(quantizer, "num_quantizers", None)
    streams = _Streams(int(quantizer.codebook_size), depth,
                       lp if isinstance(lp, LPIPSMetric) else None,
                       fe if isinstance(fe, torch.nn.Module) else None)
    sync = dist_ready() if sync is None else bool(sync and dist_ready())
    loader, limit = _make_loader(data, batch_size, max_samples, num_workers, sync)
    was_training = model.training
    model.eval()
    seen, originals, recons = 0, [], []
    total = limit if limit is not None else (len(loader.dataset) if hasattr(loader, "dataset") else None)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False)
    try:
        for batch in loader:
            x = _first_tensor(batch)
            if limit is not None:
                x = x[: limit - seen]
            if x.shape[0] == 0:
                break
            x = x.to(device, torch.float32)
            out = model(x)
            recon = out.recon.float().clamp(-1, 1)
            streams.update(x, recon, out.quant.indices, image_like)
            kept = sum(o.shape[0] for o in originals)
            if kept < keep_examples:
                originals.append(x[: keep_examples - kept].cpu())
                recons.append(recon[: keep_examples - kept].cpu())
            seen += x.shape[0]
            bar.update(x.shape[0])
            if limit is not None and seen >= limit:
                break
    finally:
        bar.close()
        model.train(was_training)
    if sync:
        streams.all_reduce()
        seen = int(all_reduce_sum(torch.tensor(seen)).item())
    metrics = _summarise(streams, seen, unavailable, image_like)
    metrics["seconds"] = time.perf_counter() - t0
    return EvalOutcome(
        metrics=metrics,
        counts=[acc.counts for acc in streams.counts],
        originals=torch.cat(originals)[:keep_examples] if originals else None,
        reconstructions=torch.cat(recons)[:keep_examples] if recons else None,
    )


def _summarise(streams: _Streams, samples: int, unavailable: dict, image_like: bool) -> dict:
    metrics: dict = {"samples": samples}
    if streams.dense:
        per_layer = [codebook_stats(acc.counts) for acc in streams.counts]
        if streams.depth:
            metrics["codebook_size"] = per_layer[0]["codebook_size"]
            metrics["depth"] = len(per_layer)
            metrics.update({k: sum(s[k] for s in per_layer) / len(per_layer)
                            for k in ("usage", "perplexity", "entropy_bits")})
            metrics["dead_codes"] = min(s["dead_codes"] for s in per_layer)
            metrics["tokens"] = per_layer[0]["tokens"]
            metrics["collapse"] = any(s["collapse"] for s in per_layer)
            metrics["layers"] = per_layer
        else:
            metrics.update(per_layer[0])
    else:
        unavailable["usage"] = {"reason": f"codebook larger than {MAX_DENSE_CODES} codes: no dense histogram",
                                "path": None}
    for name in ("l1", "psnr", "ssim", "lpips"):
        acc = streams.means[name]
        metrics[name] = acc.compute() if acc.count and name not in unavailable else None
    if streams.lpips is not None and not streams.lpips.real_weights and streams.means["lpips"].count:
        metrics["lpips_random_backbone"] = streams.means["lpips"].compute()  # code-path check, not LPIPS
    if image_like and metrics["ssim"] is None and "ssim" not in unavailable:
        unavailable["ssim"] = {"reason": "frames smaller than the 11x11 SSIM window", "path": None}
    fid = streams.fid
    if fid is not None and fid.count >= 2 and "rfid" not in unavailable:
        metrics["rfid"] = fid.compute()
        metrics["rfid_samples"] = fid.count
    else:
        metrics["rfid"] = None
        if fid is not None and "rfid" not in unavailable:
            unavailable["rfid"] = {"reason": f"rFID needs at least 2 images, got {fid.count}", "path": None}
    metrics["unavailable"] = unavailable
    return metrics


def evaluate(model: torch.nn.Module, dataset_or_loader, *, max_samples: int | None = None, batch_size: int = 16,
             lpips=True, fid=True, progress: bool = True, sync: bool | None = None) -> dict:
    """Codebook health + reconstruction metrics of ``model`` on a held-out set (see module doc)."""
    return run_evaluation(model, dataset_or_loader, max_samples=max_samples, batch_size=batch_size,
                          lpips=lpips, fid=fid, keep_examples=0, progress=progress, sync=sync).metrics


# --------------------------------------------------------------------------------------------
# checkpoints and run folders (what `vqtok eval` calls)
# --------------------------------------------------------------------------------------------
def find_run_dir(path) -> "Path | None":
    """The run folder (holding config.json and metrics.jsonl) that ``path`` is or lies in, else None."""
    from pathlib import Path

    p = Path(path).resolve()
    for cand in [p, *p.parents][:4]:
        if (cand / "config.json").is_file() and (cand / "metrics.jsonl").is_file():
            return cand
    return None


def _data_config(cfg: dict, data: str | None) -> dict:
    """The config's data section, pointed at ``data`` (a folder evaluated whole) when given."""
    data_cfg = dict(cfg.get("data") or {})
    data_cfg.setdefault("modality", cfg.get("model", {}).get("modality", "image"))
    if data:
        data_cfg.update(source="folder", path=str(data), eval_path=str(data))
    return data_cfg


def evaluate_checkpoint(checkpoint, *, data: str | None = None, out=None, max_samples: int | None = None,
                        batch_size: int = 16, lpips=True, fid=True, keep_examples: int = 8,
                        device: str = "cpu", progress: bool = True):
    """Evaluate a run folder or checkpoint on its held-out split (or the folder ``data``).

    Writes OUT/metrics.json, OUT/arrays.npz and OUT/report/index.html (OUT defaults to RUN/eval
    for a run, else CHECKPOINT/eval) and returns (metrics, page path). Under torchrun the ranks
    share the work and rank 0 writes (other ranks return (metrics, None)).
    """
    import json
    from pathlib import Path

    from .checkpoint import load_model
    from .data import build_dataset
    from .report import read_history, save_arrays, write_report

    from . import distributed as D

    own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    di = D.init_from_env(torch.device(device).type)  # torchrun: ranks shard the set, sums all-reduced
    if di.enabled and torch.device(device).type == "cuda":
        device = f"cuda:{di.local_rank}"
    try:
        model, cfg = load_model(str(checkpoint), use_ema=True, map_location=device)
        dataset = build_dataset(_data_config(cfg, data), "eval")
        if len(dataset) == 0:
            raise ValueError(f"the evaluation set is empty (data={data or cfg.get('data')})")
        res = run_evaluation(model, dataset, max_samples=max_samples, batch_size=batch_size, lpips=lpips, fid=fid,
                             keep_examples=keep_examples, progress=progress and di.is_main)
    finally:
        if own_group and di.enabled:
            D.shutdown()
    metrics = dict(res.metrics, source=str(checkpoint), data=str(data or "config eval split"))
    if not di.is_main:
        return metrics, None
    run_dir = find_run_dir(checkpoint)
    out = Path(out) if out else (run_dir or Path(checkpoint)) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    modality = getattr(model, "modality", "image")
    save_arrays(out / "arrays.npz", res.counts, None if res.originals is None else res.originals.numpy(),
                None if res.reconstructions is None else res.reconstructions.numpy(), modality)
    history = read_history(run_dir / "metrics.jsonl") if run_dir else []
    page = write_report(out, metrics, counts=[c.numpy() for c in res.counts],
                        originals=None if res.originals is None else res.originals.numpy(),
                        reconstructions=None if res.reconstructions is None else res.reconstructions.numpy(),
                        modality=modality, history=history, source=str(checkpoint))
    return metrics, page
