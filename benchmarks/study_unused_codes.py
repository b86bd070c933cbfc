"""Which codes a quantizer-study VQ row leaves unused, and why: train one row, then inspect them.

Trains one vqtok VQ row of ``benchmarks/quantizer_study.py`` exactly as the study does (same
settings, ``--set`` overrides, the same usage and PSNR), recording the step at which each code was
last restarted. Then it splits the codes by their use over the dense views of the training photos
(held-in) and of the held-out photos (unused held-in; used held-in but unused held-out; used on
both), and for each group reports:

- ``fresh hits``: how many of the group's codes win at least one token of ``--crops`` fresh random
  training crops (the crops the row trained on, drawn anew). Codes unused on the training photos'
  dense views but hit here serve only crop borders; codes hit by neither are dead on the training
  data as well;
- ``train-mode hits``: the same crops, in batches of the row's training batch, with the latent
  standardised as in training (a copy of the model whose latent standardisation moves its running
  statistics towards each batch before applying them; the quantizer in eval mode, so no code
  moves). Codes hit here but not in eval mode serve only the batch-to-batch jitter of the training
  latent, which evaluation never produces;
- the EMA count (``cluster_size``: tokens a step) over the mean code's, median: a code unused at the
  end but with a count near the mean was still winning tokens in the last ~1 / (1 - decay) steps,
  so the final encoder has moved away from it;
- the median step of the last restart, and the codes never restarted;
- the distance to the nearest other code in code space (unit vectors for cosine rows), median, and
  the share of the group's codes whose nearest code is unused on the training photos as well:
  unused codes next to used ones are shadowed; unused codes next to unused ones sit in a region
  the latent has left.

    python benchmarks/study_unused_codes.py --row vq-ema-kmeans-restart-rot/vqtok/2^14
    python benchmarks/study_unused_codes.py --row vq-l2norm-dim3/vqtok/2^14 --set restart_share=0.05 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantizer_study as qs  # noqa: E402

from vqtok.bench.report import format_table, write_json  # noqa: E402


def vq_layers(module: torch.nn.Module) -> list:
    """The VectorQuantizer modules inside a built quantizer (one for VQ, one per layer for RVQ)."""
    from vqtok.quantizers.vq import VectorQuantizer

    return [m for m in module.modules() if isinstance(m, VectorQuantizer)]


def record_restarts(quantizer: torch.nn.Module) -> torch.Tensor:
    """Wraps the quantizer's restarts; returns int64 [K], each code's last restart step (-1: never),
    filled in as the row trains."""
    layers = vq_layers(quantizer)
    if len(layers) != 1:
        raise ValueError(f"expected a single-codebook VQ row, found {len(layers)} VectorQuantizer layers")
    vq = layers[0]
    last = torch.full((vq.codebook_size,), -1, dtype=torch.int64)
    restart = vq._restart_dead

    def recorded() -> int:
        dead = vq.cluster_size < vq.dead_code_threshold  # the codes restart_dead is about to replace
        n = restart()
        if n:
            last[dead.cpu()] = int(vq.steps)
        return n

    vq._restart_dead = recorded
    return last


@torch.no_grad()
def fresh_crop_counts(model: torch.nn.Module, crops: qs.Crops, n: int, batch: int = 256,
                      train_latent: bool = False) -> torch.Tensor:
    """int64 [K]: codes picked over ``n`` fresh random training crops (encoder + quantizer, eval mode).
    ``train_latent``: the encoder's latent standardisation in training mode instead, on a copy of
    ``model`` (its running statistics move batch by batch, so ``batch`` should be the training
    batch); ``model`` itself is left as it was."""
    k = int(model.quantizer.codebook_size)
    counts = torch.zeros(k, dtype=torch.int64)
    if train_latent:
        model = copy.deepcopy(model)
    model.eval()
    model.latent_norm.train(train_latent)
    for s in range(0, n, batch):
        idx = model.quantizer.encode(model.encoder(crops.batch(min(batch, n - s))))
        counts += torch.bincount(idx.reshape(-1), minlength=k)
    return counts


@torch.no_grad()
def nearest_other(codes: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each code's nearest other code, [K] each, without a K x K matrix."""
    dist = torch.empty(codes.shape[0])
    idx = torch.empty(codes.shape[0], dtype=torch.int64)
    for s in range(0, codes.shape[0], block):
        d = torch.cdist(codes[s : s + block], codes)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = torch.inf
        dist[s : s + block], idx[s : s + block] = d.min(1)
    return dist, idx


def summarise(groups: dict[str, torch.Tensor], fresh: torch.Tensor, ema: torch.Tensor, last: torch.Tensor,
              nn_dist: torch.Tensor, nn_unused: torch.Tensor, fresh_train: torch.Tensor) -> list[dict]:
    """One row per group of codes (a bool mask [K] each): the statistics of the module docstring."""
    mean_ema = float(ema.mean())
    rows = []
    for name, mask in groups.items():
        n = int(mask.sum())
        row = {"codes": name, "n": n}
        if n:
            restarted = last[mask] >= 0
            row.update(
                fresh_hits=int((fresh[mask] > 0).sum()),
                train_mode_hits=int((fresh_train[mask] > 0).sum()),
                ema_over_mean=float(ema[mask].median()) / mean_ema,
                last_restart_median=float(last[mask][restarted].float().median()) if restarted.any() else None,
                never_restarted=int((~restarted).sum()),
                nearest_code_distance=float(nn_dist[mask].median()),
                nearest_code_unused=float(nn_unused[mask].float().mean()),
            )
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return format_table([{
        "codes": r["codes"], "n": r["n"], "fresh hits": r.get("fresh_hits", "-"),
        "train-mode hits": r.get("train_mode_hits", "-"),
        "EMA / mean": fmt(r.get("ema_over_mean"), ".3f"), "last restart": fmt(r.get("last_restart_median"), ".0f"),
        "never restarted": r.get("never_restarted", "-"), "nearest dist": fmt(r.get("nearest_code_distance"), ".4f"),
        "nearest unused": fmt(r.get("nearest_code_unused"), ".3f")} for r in rows])


def run(name: str, cfg: qs.StudyConfig, crops: int, crop_seed: int = 12345) -> dict:
    """Train the row ``name`` ('family/impl/2^b') under ``cfg`` and inspect its unused codes."""
    rows = [r for r in qs.study_rows(cfg) if f"{r.family}/{r.impl}/2^{r.log2_codes}" == name]
    if not rows:
        raise ValueError(f"no study row named {name!r}")
    row = rows[0]
    if row.impl != "vqtok" or row.setup.get("quantizer") != "vq":
        raise ValueError(f"{name!r} is not a vqtok VQ row (its quantizer: {row.setup.get('quantizer', row.impl)})")
    recorded = {}

    def build(c):
        q = row.build(c)
        recorded["last"] = record_restarts(q)
        return q

    cfg = dataclasses.replace(cfg, held_in_usage=True)
    train = qs.Crops(qs.photo_set(qs.TRAIN_PHOTOS, cfg.scales), cfg.crop, cfg.seed)
    photos = qs.photo_set(qs.EVAL_PHOTOS, cfg.scales)
    res = qs.run_row(dataclasses.replace(row, build=build), cfg, train, qs.tiles(photos, cfg.eval_tile), photos,
                     keep=True)
    model, counts = res.pop("model"), res.pop("code_counts")
    vq = vq_layers(model.quantizer)[0]
    used_in, used_out = counts["held_in"][0] > 0, counts["held_out"][0] > 0
    fresh, fresh_train = (fresh_crop_counts(model, qs.Crops(train.photos, cfg.crop, crop_seed), crops, cfg.batch,
                                            train_latent=mode) for mode in (False, True))
    nn_dist, nn_idx = nearest_other(vq.codes().detach())
    groups = {"unused held-in": ~used_in, "unused held-out only": used_in & ~used_out, "used on both": used_in & used_out}
    stats = summarise(groups, fresh, vq.cluster_size.detach().cpu(), recorded["last"], nn_dist, ~used_in[nn_idx],
                      fresh_train)
    summary = {k: res[k] for k in ("family", "impl", "log2_codes", "setup", "usage", "held_in_usage", "perplexity",
                                   "collapse", "psnr", "steps", "restarts")}
    summary["fresh_crop_usage"] = float((fresh > 0).float().mean())
    summary["fresh_crop_tokens"] = int(fresh.sum())
    summary["fresh_crop_usage_train_latent"] = float((fresh_train > 0).float().mean())
    return {"row": summary, "groups": stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", required=True, help="a vqtok VQ row of the study, e.g. vq-ema-kmeans-restart-rot/vqtok/2^14")
    ap.add_argument("--quick", action="store_true", help="the study's --quick settings (2^10, 10 steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as the study's --set")
    ap.add_argument("--crops", type=int, default=25600, help="fresh training crops (64 tokens each at 32 px)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study's workers use 1)")
    ap.add_argument("--json", default=None, help="write the result to this file")
    args = ap.parse_args(argv)
    try:
        cfg = qs.override(qs.QUICK if args.quick else qs.FULL, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.crops < 1:
        ap.error(f"--crops must be >= 1, got {args.crops}")
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = run(args.row, cfg, args.crops)
        except ValueError as e:
            ap.error(str(e))
    r = out["row"]
    print(f"{args.row}: usage {r['usage']:.3f} held-out, {r['held_in_usage']:.3f} held-in, "
          f"{r['fresh_crop_usage']:.3f} on {r['fresh_crop_tokens']} fresh training-crop tokens "
          f"({r['fresh_crop_usage_train_latent']:.3f} with the latent standardised as in training); "
          f"PSNR {r['psnr']:.2f} dB; {r['restarts']} restarts over {r['steps']} steps")
    print(table(out["groups"]))
    if args.json:
        write_json(args.json, {**out, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
