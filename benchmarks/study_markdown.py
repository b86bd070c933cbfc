"""The quantizer study's JSON as the Markdown tables of the README.

    python benchmarks/study_markdown.py study.json              # the results table
    python benchmarks/study_markdown.py seeds.json --seeds      # mean [min, max] over each row's seeds
    python benchmarks/study_markdown.py seeds.json --pairs      # each vqtok row against its peer, seed by seed

Reads what ``quantizer_study.py --json`` wrote (one run, or several merged: ``--seeds`` groups the
rows of every file by family, implementation and size; ``--pairs`` matches each vqtok row with its
vector-quantize-pytorch counterpart at the same size and seed). The ``setup`` column is written
from each row's build arguments and the run's config (restart threshold and stop, entropy terms,
levels), so the table says how every row was built without reading the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMPL = {"vqtok": "vqtok", "vector-quantize-pytorch": "vq-pytorch"}
HEAD = ("| family | impl | codes | setup | usage | perplexity | dead codes | collapse | PSNR | SSIM | steps "
        "| train s | cost |")
RULE = "| --- | --- | --- | --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: |"


def _num(x: float) -> str:
    """A setting as written in the setup column: 1.5, 0.094, 2, 0.01."""
    return f"{x:.2g}"


def _restarts(setup: dict, config: dict, threshold_key: str) -> list[str]:
    """The restart phrase: threshold per step and until when (the study stops every row's alike)."""
    if threshold_key not in setup:
        return []
    stop = float(config.get("restart_stop", 1.0))
    until = "to the end" if stop >= 1.0 else f"to {stop:.0%} of steps"
    return [f"restart < {_num(setup[threshold_key])}/step {until}"]


def describe_setup(setup: dict, config: dict) -> str:
    """One row's build arguments in words; keys it does not know are appended as ``key=value``."""
    s = dict(setup)
    name = s.pop("quantizer", "?")
    parts: list[str] = []
    s.pop("codebook_size", None)
    if name in ("vq", "rvq"):
        if name == "rvq":
            parts.append(f"{s.pop('num_quantizers', '?')} x {setup.get('codebook_size', '?')} codes")
        if "codebook_dim" in s:
            metric = s.pop("metric", "l2")
            parts.append(f"{'l2-normalised ' if metric == 'cosine' else ''}dim {s.pop('codebook_dim')}")
        learning = s.pop("learning", "ema")
        parts.append("gradient codebook" if learning == "grad" else "EMA")
        if "decay" in s:
            parts.append(f"decay {s.pop('decay')}")
        if s.pop("kmeans_init", False):
            parts.append("k-means" if s.pop("kmeans_seeding", "kmeans++") == "kmeans++" else "k-means (random seeds)")
        parts += _restarts(s, config, "dead_code_threshold")
        s.pop("dead_code_threshold", None)
        if s.pop("restart", "random") == "nearest":
            parts.append("nearest restarts")
        if s.pop("estimator", "ste") == "rotation":
            parts.append("rotation trick")
    elif name == "VectorQuantize":
        s.pop("decay", None), s.pop("commitment_weight", None)
        parts.append("EMA")
        if s.pop("kmeans_init", False):
            parts.append("k-means")
        parts += _restarts(s, config, "threshold_ema_dead_code")
        s.pop("threshold_ema_dead_code", None)
        if s.pop("rotation_trick", False):
            parts.append("rotation trick")
    elif name == "simvq":
        parts.append(f"basis std {s.pop('init_std', '?')}")
        s.pop("beta", None)
        for module, scale in s.pop("lr_scales", {}).items():
            parts.append(f"{'W' if module == 'proj' else module} at {_num(scale)}x lr")
    elif name in ("fsq", "FSQ"):
        levels = s.pop("levels", [])
        text = ",".join(map(str, levels))
        if len(set(levels)) == 1 and len(levels) > 3:
            text = f"{levels[0]}^{len(levels)}"
        if "entropy_weight" in s:
            parts.append(f"{text}; entropy {_num(s.pop('entropy_weight'))}, τ {_num(s.pop('temperature'))}")
        else:
            parts.append(f"levels {text}")
        if s.pop("proj_init", "linear") == "orthogonal":
            parts.append("orthogonal in-projection")
        if s.get("noise"):
            parts.append(f"dither {_num(s.pop('noise'))}")
    elif name in ("lfq", "bsq"):
        s.pop("bits", None)
        parts.append(f"entropy {_num(s.pop('entropy_weight'))}, τ {_num(s.pop('temperature'))}")
        if s.pop("per_sample_weight", 1.0) != 1.0:
            parts.append(f"per-sample {_num(setup['per_sample_weight'])}")
        if "latent_dim" in s:
            parts.append(f"{s.pop('latent_dim')}-channel latent")
    elif name == "LFQ":
        parts.append(f"entropy {_num(s.pop('entropy_loss_weight'))} (its defaults)")
    s.pop("search_precision", None)  # a speed knob: the same indices either way
    parts += [f"{k}={v}" for k, v in s.items()]
    return ", ".join(parts)


def results_table(run: dict) -> str:
    """The README's results table: one line per row of ``run["results"]``, in the run's order."""
    lines = [HEAD, RULE]
    for r in run["results"]:
        head = f"| {r['family']} | {IMPL.get(r['impl'], r['impl'])} | 2^{r['log2_codes']} | " \
               f"{describe_setup(r.get('setup', {}), run['config'])} |"
        if "skipped" in r:
            lines.append(head + f" {r['skipped']} |" + " |" * 8)
            continue
        lines.append(head + f" {r['usage']:.3f} | {r['perplexity']:.0f} | {r['dead_codes']} | "
                     f"{'**YES**' if r['collapse'] else 'no'} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{r['steps']} | {r['train_s']:.0f} | {r['cost']:.2f} |")
    return "\n".join(lines)


def _spread(vals: list[float], fmt: str) -> str:
    return f"{sum(vals) / len(vals):{fmt}} [{min(vals):{fmt}}, {max(vals):{fmt}}]"


def seed_table(runs: list[dict]) -> str:
    """Mean [min, max] over the seeds of every row that ran at two or more (held-in usage where
    every seed measured it), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for r in run["results"]:
            if "skipped" not in r:
                groups.setdefault((r["family"], r["impl"], r["log2_codes"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    held_in = any(all("held_in_usage" in r for r in rs) for rs in groups.values())
    head = "| family | impl | codes | seeds | usage |" + (" held-in usage |" if held_in else "") + \
           " PSNR | SSIM | train s | collapse |"
    rule = "| --- | --- | --- | --- | --- |" + (" --- |" if held_in else "") + " --- | ---: | ---: | ---: |"
    lines = [head, rule]
    for (family, impl, b), rs in groups.items():
        seeds = ",".join(str(r.get("seed", "?")) for r in sorted(rs, key=lambda r: r.get("seed", 0)))
        cells = [family, IMPL.get(impl, impl), f"2^{b}", seeds, _spread([r["usage"] for r in rs], ".3f")]
        if held_in:
            hi = [r["held_in_usage"] for r in rs if "held_in_usage" in r]
            cells.append(_spread(hi, ".3f") if len(hi) == len(rs) else "–")
        cells += [_spread([r["psnr"] for r in rs], ".2f"), f"{sum(r['ssim'] for r in rs) / len(rs):.3f}",
                  f"{sum(r['train_s'] for r in rs) / len(rs):.0f}",
                  f"{sum(bool(r['collapse']) for r in rs)}/{len(rs)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pair_table(runs: list[dict]) -> str:
    """Each vqtok row against its vector-quantize-pytorch counterpart (``quantizer_study.PEER_FAMILY``)
    at the same size, over the seeds both ran: mean usage and PSNR of each, the seeds at which the
    vqtok row is at or ahead of the peer's, the PSNR difference (vqtok - peer) as mean [min, max]
    and the mean training seconds. One seed's order can be the rounding's (README), so the pair is
    read seed by seed."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from quantizer_study import PEER_FAMILY

    rows = {}
    for run in runs:
        for r in run["results"]:
            if "skipped" not in r:
                rows[(r["family"], r["impl"], r["log2_codes"], r.get("seed", 0))] = r
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for (family, impl, b, seed), r in rows.items():
        peer = rows.get((PEER_FAMILY.get(family), "vector-quantize-pytorch", b, seed))
        if impl == "vqtok" and peer is not None:
            groups.setdefault((family, PEER_FAMILY[family], b), []).append((r, peer))
    lines = ["| family | peer family | codes | seeds | usage, vqtok / peer | usage at or ahead | PSNR, vqtok / peer "
             "| PSNR at or ahead | PSNR difference | train s, vqtok / peer |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for (family, peer_family, b), pairs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0])):
        pairs.sort(key=lambda p: p[0].get("seed", 0))
        n = len(pairs)

        def mean(key, side):
            return sum(p[side][key] for p in pairs) / n

        ahead = {k: sum(v[k] >= w[k] for v, w in pairs) for k in ("usage", "psnr")}
        lines.append(
            f"| {family} | {peer_family} | 2^{b} | {','.join(str(p[0].get('seed', 0)) for p in pairs)} "
            f"| {mean('usage', 0):.3f} / {mean('usage', 1):.3f} | {ahead['usage']} of {n} "
            f"| {mean('psnr', 0):.2f} / {mean('psnr', 1):.2f} | {ahead['psnr']} of {n} "
            f"| {_spread([v['psnr'] - w['psnr'] for v, w in pairs], '+.2f')} "
            f"| {mean('train_s', 0):.0f} / {mean('train_s', 1):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="quantizer_study.py --json output(s)")
    ap.add_argument("--seeds", action="store_true", help="mean [min, max] over seeds instead of the results table")
    ap.add_argument("--pairs", action="store_true",
                    help="each vqtok row against its vector-quantize-pytorch counterpart, seed by seed")
    args = ap.parse_args(argv)
    runs = []
    for path in args.json:
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e}")
        if not isinstance(run, dict) or not {"results", "config"} <= run.keys():
            ap.error(f"{path}: not a quantizer_study.py JSON (no 'results' and 'config')")
        runs.append(run)
    if args.seeds and args.pairs:
        ap.error("--seeds and --pairs are two different tables: give one")
    if args.pairs:
        print(pair_table(runs))
    elif args.seeds:
        print(seed_table(runs))
    else:
        for run in runs:
            print(results_table(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
