"""Exact LFQ/BSQ entropy (vqtok.ops.lfq_entropy) vs vector-quantize-pytorch's dense LFQ entropy.

Forward + backward of (per-sample entropy - codebook entropy), median wall time and peak extra
memory, for B in {10, 14, 16, 18, 20} (+24) and N in {16384, 262144}. Prints a table; --json
writes the rows and the config.

    .venv/bin/python benchmarks/bench_lfq_entropy.py            # full grid
    .venv/bin/python benchmarks/bench_lfq_entropy.py --quick    # B in {10, 14, 18}, N = 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from vqtok.bench.entropy import EntropyBenchConfig, config_dict, run

COLUMNS = [
    ("bits", "B"),
    ("tokens", "N"),
    ("gflop", "GFLOP"),
    ("ours_ms", "ours ms"),
    ("ours_gflops", "GFLOP/s"),
    ("ours_mib", "ours MiB"),
    ("peer_ms", "vqtorch ms"),
    ("peer_mib", "vqtorch MiB"),
    ("speedup", "speedup"),
]


def table(rows: list[dict]) -> str:
    head = [name for _, name in COLUMNS] + ["note"]
    lines = []
    for r in rows:
        cells = [str(r.get(k, "-")) for k, _ in COLUMNS]
        cells.append("; ".join(str(r[k]) for k in ("ours", "peer") if k in r))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid (B in {10, 14, 18}, N = 16384)")
    ap.add_argument("--no-peer", action="store_true", help="skip vector-quantize-pytorch")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    ap.add_argument("--peer-mem-gib", type=float, default=None, help="address-space cap while the peer runs")
    ap.add_argument("--bits", default=None, help="comma-separated B values (default: the config's grid)")
    ap.add_argument("--tokens", default=None, help="comma-separated N values (default: the config's grid)")
    ap.add_argument("--extra", default=None, help="extra BxN cases, e.g. 24x16384,20x65536 ('' for none)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="write rows + config to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EntropyBenchConfig.quick() if args.quick else EntropyBenchConfig()
    changes = {"device": args.device, "peer": not args.no_peer}
    if args.reps:
        changes["reps"] = args.reps
    if args.peer_mem_gib:
        changes["peer_mem_gib"] = args.peer_mem_gib
    if args.bits:
        changes["bits"] = tuple(int(b) for b in args.bits.split(","))
    if args.tokens:
        changes["tokens"] = tuple(int(n) for n in args.tokens.split(","))
    if args.extra is not None:
        changes["extra_cases"] = tuple(tuple(int(v) for v in c.split("x")) for c in args.extra.split(",") if c)
    cfg = dataclasses.replace(cfg, **changes)
    rows = run(cfg=cfg)
    print(f"lfq_entropy fwd+bwd, torch {torch.__version__}, {torch.get_num_threads()} threads, device {cfg.device}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_dict(cfg), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
