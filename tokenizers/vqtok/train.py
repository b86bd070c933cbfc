"""One training loop for image, video and audio tokenizers (``vqtok train``).

    result = train(load_config("demo"), "runs/demo")       # or resume=True to continue a run

Per step: autocast forward of the autoencoder -> TokenizerObjective (reconstruction, perceptual,
STFT, quantizer loss, adaptive hinge GAN after loss.disc_start) -> backward -> gradient all-reduce
across ranks -> clip -> AdamW (warm-up + cosine lr) -> EMA of weights -> discriminator step.
Train batches are a pure function of (train.seed, step) and every random draw inside a sample is a
function of its index, so a run resumed from a checkpoint continues bit for bit on CPU.

Rank 0 writes RUN/config.{json,yaml}, RUN/metrics.jsonl (+ RUN/tb when tensorboard is installed)
and RUN/checkpoints/ (see vqtok.checkpoint); the held-out eval runs on rank 0.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, ConfigError, check_quantizer
from .data import build_dataset
from .losses import TokenizerObjective, check_lpips_weights
from .models import build_autoencoder, build_discriminator

# The collapse warning waits this many steps (the health tracker's EMA horizon at its default decay
# 0.99: before it, a codebook still at its init, e.g. FSQ's few codes at step 1, reads as collapsed)
# and repeats at most this often.
COLLAPSE_WARN_STEPS = 100


# --------------------------------------------------------------------------------------------
# schedule, EMA, batches
# --------------------------------------------------------------------------------------------
def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``base * min_ratio``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, lr_scales: dict[str, float]) -> list[dict]:
    """AdamW groups, each with its ``lr_scale`` (the multiple of the schedule's learning rate it
    trains at): the parameters of each module named in ``lr_scales`` (a path such as
    ``quantizer.proj``) at its multiple, every other parameter at 1."""
    groups, taken = [], set()
    for path, scale in lr_scales.items():
        try:
            params = list(model.get_submodule(path).parameters())
        except AttributeError:
            q = getattr(model, "quantizer", None)
            known = [f"quantizer.{n}" for n, m in q.named_children() if any(True for _ in m.parameters())] if q else []
            raise ConfigError(f"train.lr_scales: the model has no module {path!r} (its quantizer's modules with "
                              f"parameters: {', '.join(known) or 'none'})") from None
        if not params or any(id(p) in taken for p in params):
            why = "has no parameters" if not params else "shares parameters with another entry"
            raise ConfigError(f"train.lr_scales: module {path!r} {why}")
        taken.update(id(p) for p in params)
        groups.append({"params": params, "lr_scale": float(scale)})
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [{"params": rest, "lr_scale": 1.0}, *groups]


class WeightEMA:
    """EMA of a module's state dict: float entries averaged, others (counters, flags) copied.
    The decay ramps up as min(decay, (1 + n) / (10 + n)) so early weights are not over-weighted."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in module.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(d).add_(v.detach().to(s.dtype), alpha=1 - d)
            else:
                s.copy_(v)


class StepBatches:
    """Batch sampler yielding the index batches of steps ``start, start+1, ...`` forever.

    Epoch e is ``DistributedSampler.set_epoch(e)`` (a permutation seeded by train.seed + e, split
    across ranks); step s is batch ``s % per_epoch`` of epoch ``s // per_epoch``.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, start_step: int = 0):
        self.sampler, self.batch_size, self.start = sampler, batch_size, start_step
        self.per_epoch = len(sampler) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"train.batch_size={batch_size} is larger than the per-process train set ({len(sampler)})")

    def __iter__(self):
        step = self.start
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            self.sampler.set_epoch(epoch)
            idx = list(self.sampler)
            for b in range(offset, self.per_epoch):
                yield idx[b * self.batch_size:(b + 1) * self.batch_size]
            step = (epoch + 1) * self.per_epoch


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_during_training(model: nn.Module, loader, step: int, max_batches: int = 0,
                             objective: TokenizerObjective | None = None) -> dict:
    """Held-out metrics of ``model`` on ``loader`` with :func:`vqtok.evaluate.evaluate`, the code
    behind `vqtok eval`: rec_loss (L1), usage, perplexity, entropy_bits, dead_codes, collapse,
    psnr, ssim (images/video) and usage_l{i} per residual layer. Rank 0 only (no all-reduce);
    LPIPS/rFID are left to `vqtok eval`. Runs in eval mode, restores the previous mode."""
    from .evaluate import evaluate

    limit = max_batches * loader.batch_size if max_batches and getattr(loader, "batch_size", None) else None
    m = evaluate(model, loader, max_samples=limit, lpips=False, fid=False, progress=False, sync=False)
    if not m.get("samples"):
        return {"step": step}
    res = {"step": step, "rec_loss": m["l1"], "samples": m["samples"]}
    for key in ("usage", "perplexity", "entropy_bits", "dead_codes", "collapse", "psnr", "ssim"):
        if m.get(key) is not None:
            res[key] = m[key]
    for i, layer in enumerate(m.get("layers") or []):
        res[f"usage_l{i}"] = layer["usage"]
    return res


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl (+ TensorBoard when installed and enabled); a no-op on ranks > 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard not installed
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def _write_config(run_dir: Path, cfgd: dict) -> None:
    for name, text in (("config.json", json.dumps(cfgd, indent=2)), ("config.yaml", yaml.safe_dump(cfgd, sort_keys=False))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)


def train(cfg: Config, run_dir: str | os.PathLike, resume: bool = False, progress: bool = True) -> dict:
    """Train the tokenizer described by ``cfg`` into ``run_dir``. Returns the final held-out metrics
    plus "checkpoint" (path of the last checkpoint) on rank 0 ({} on other ranks)."""
    t, run_dir = cfg.train, Path(run_dir)
    device = _device(t.device)
    dist_info = D.init_from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main = dist_info.is_main
    try:
        return _train(cfg, run_dir, resume, progress and main, device, dist_info)
    finally:
        D.shutdown()


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, device: torch.device, di: D.DistInfo) -> dict:
    t, lo = cfg.train, cfg.loss
    cfgd = cfg.to_dict()
    if lo.perceptual_weight > 0:
        check_lpips_weights(lo.perceptual_net)  # stop before anything else when LPIPS is unavailable
    elif di.is_main and cfg.model.modality != "audio":
        print("[vqtok] perceptual (LPIPS) loss off: loss.perceptual_weight=0", file=sys.stderr)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.use_deterministic_algorithms(t.deterministic, warn_only=True)
    torch.manual_seed(t.seed)
    check_quantizer(cfg)

    model = build_autoencoder(cfgd).to(device)
    objective = TokenizerObjective(cfg.model.modality, lo.rec, lo.rec_weight, lo.perceptual_weight, lo.perceptual_net,
                                   lo.stft_weight, lo.quantizer_weight, lo.adv_weight, lo.disc_start,
                                   lo.adaptive_weight).to(device)
    disc = build_discriminator(cfg.model.modality, lo.disc_channels, lo.disc_layers).to(device) if lo.adv_weight > 0 else None
    opt = torch.optim.AdamW(param_groups(model, t.lr_scales), lr=t.lr, betas=tuple(t.betas),
                            weight_decay=t.weight_decay)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr or t.lr, betas=(0.5, 0.9)) if disc is not None else None
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    ema = WeightEMA(model, t.ema_decay) if t.ema_decay > 0 else None

    start = 0
    if resume:
        start = _restore(run_dir, model, opt, disc, d_opt, scaler, ema, device)
    elif di.is_main and (run_dir / "checkpoints" / ckpt.LATEST).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    D.broadcast_module(model)
    if disc is not None:
        D.broadcast_module(disc)

    train_ds = build_dataset(cfgd["data"], "train")
    sampler = DistributedSampler(train_ds, num_replicas=di.world_size, rank=di.rank, shuffle=True, seed=t.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_sampler=StepBatches(sampler, t.batch_size, start),
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    eval_loader = None
    if di.is_main:
        eval_ds = build_dataset(cfgd["data"], "eval")
        eval_loader = DataLoader(eval_ds, batch_size=t.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfgd)
    log = RunLog(run_dir, di.is_main, t.tensorboard)

    def save(step: int) -> Path | None:
        if not di.is_main:
            return None
        state = {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "rng_cpu": torch.get_rng_state(), "ema_updates": ema.updates if ema else 0}
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        if disc is not None:
            state["discriminator"] = {k: v.cpu() for k, v in disc.state_dict().items()}
            state["disc_optimizer"] = d_opt.state_dict()
        return ckpt.save_checkpoint(run_dir, step, model, state, cfgd, ema.shadow if ema else None, t.keep_last)

    model.train()
    bar = tqdm(total=t.steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
    it = iter(loader)
    last_ckpt, t0, collapse_warned = None, time.time(), -10**9
    final: dict = {}
    for step in range(start, t.steps):
        lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # absent in checkpoints saved before lr_scales
        x = next(it).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
            loss, terms = objective.generator_loss(x, out.recon, out.quant.loss, step, model.last_layer, disc)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        D.all_reduce_grads(model, di.world_size)
        scaler.unscale_(opt)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(opt)
        scaler.update()
        if di.enabled:
            D.broadcast_module(model, params=False)
        if ema is not None:
            ema.update(model)
        if disc is not None:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                d_loss = objective.discriminator_loss(x, out.recon, disc, step)
            if d_loss is not None:
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                D.all_reduce_grads(disc, di.world_size)
                d_opt.step()
                terms["d_loss"] = d_loss.detach()

        stats = out.quant.stats
        done = step + 1
        if (bool(_scalar(stats.get("collapse", 0))) and done >= COLLAPSE_WARN_STEPS
                and done - collapse_warned >= COLLAPSE_WARN_STEPS and di.is_main):
            collapse_warned = done
            tqdm.write(f"[vqtok] WARNING step {done}: codebook collapse signalled by the quantizer "
                       f"(usage {_scalar(stats.get('usage', 0)):.3f}, perplexity {_scalar(stats.get('perplexity', 0)):.1f}, "
                       f"dead codes {_scalar(stats.get('dead_codes', 0)):.0f})", file=sys.stderr)
        if done % t.log_every == 0 or done == t.steps:
            with torch.no_grad():
                from .metrics.reconstruction import psnr

                p = float(psnr(out.recon.detach().float().clamp(-1, 1), x.float()).mean())
            rec = {"step": done, "split": "train", "loss": _scalar(loss), **{k: _scalar(v) for k, v in terms.items()},
                   "usage": _scalar(stats.get("usage", float("nan"))),
                   "perplexity": _scalar(stats.get("perplexity", float("nan"))), "psnr": p, "lr": lr,
                   "time": time.time() - t0}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", usage=f"{rec['usage']:.3f}", psnr=f"{p:.2f}")
        bar.update(1)
        if eval_loader is not None and t.eval_every and done % t.eval_every == 0 and done != t.steps:
            ev = evaluate_during_training(model, eval_loader, done, t.eval_batches)
            log.write({"split": "eval", **ev, "time": time.time() - t0})
            tqdm.write(_eval_line(ev))
        if done % t.ckpt_every == 0 or done == t.steps:
            last_ckpt = save(done) or last_ckpt
        D.barrier()
    bar.close()
    if eval_loader is not None:
        final = evaluate_during_training(model, eval_loader, t.steps, t.eval_batches)
        log.write({"split": "eval", **final, "time": time.time() - t0})
        if last_ckpt is None:
            last_ckpt = ckpt.resolve_checkpoint(run_dir)
        final["checkpoint"] = str(last_ckpt)
    log.close()
    return final


def _eval_line(ev: dict) -> str:
    parts = [f"step {ev['step']}"] + [f"{k} {ev[k]:.4f}" for k in ("usage", "perplexity", "psnr", "ssim", "rec_loss") if k in ev]
    return "[eval] " + ", ".join(parts)


def _restore(run_dir: Path, model, opt, disc, d_opt, scaler, ema, device) -> int:
    """Load the latest checkpoint of ``run_dir`` into the training objects; returns its step."""
    c = ckpt.resolve_checkpoint(run_dir)
    meta = ckpt.read_meta(c)
    ckpt.load_into(model, c / ckpt.MODEL_FILE)
    state = ckpt.load_state(c, map_location=device)
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
    if disc is not None and "discriminator" in state:
        disc.load_state_dict(state["discriminator"])
        d_opt.load_state_dict(state["disc_optimizer"])
    if ema is not None:
        if meta.get("has_ema"):
            for k, v in ckpt.load_tensors(c / ckpt.EMA_FILE).items():
                ema.shadow[k].copy_(v)
            ema.updates = int(state.get("ema_updates", 0))
    return int(state["step"])
