"""Exact LFQ/BSQ entropy (vqtok.ops.lfq_entropy) vs vector-quantize-pytorch's dense LFQ entropy.

Forward + backward of (per-sample entropy - codebook entropy), median wall time and peak extra
memory, for B in {10, 14, 16, 18, 20} (+24) and N in {16384, 262144}. Prints a table; --json
writes the rows and the config.

    .venv/bin/python benchmarks/bench_lfq_entropy.py            # full grid
    .venv/bin/python benchmarks/bench_lfq_entropy.py --quick    # B in {10, 14, 18}, N = 16384
    .venv/bin/python benchmarks/bench_lfq_entropy.py --threads 1 --bits 10,14,18 --tokens 1536 --extra '' \
        --reps 21 --against HEAD~1    # before / after

``--against REV`` times the op as of git revision REV (``vqtok.bench.revision``) beside the current
one instead: their reps alternate in this process, and the table gives both medians and their
ratio (no memory column, no peer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch

from vqtok.bench.entropy import EntropyBenchConfig, cases, config_dict, run
from vqtok.bench.report import format_table
from vqtok.bench.revision import add_against_option, against_cells, interleaved
from vqtok.bench.revision import against as load_against
from vqtok.ops.lfq_entropy import lfq_entropy

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
    if rows and "against" in rows[0]:
        return table_against(rows)
    head = [name for _, name in COLUMNS] + ["note"]
    lines = []
    for r in rows:
        cells = [str(r.get(k, "-")) for k, _ in COLUMNS]
        cells.append("; ".join(str(r[k]) for k in ("ours", "peer") if k in r))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def measure_against(bits: int, n: int, cfg: EntropyBenchConfig, against: tuple[str, object], seed: int = 0) -> dict:
    """Median ms of one forward + backward of (per-sample - codebook) entropy on z [n, bits] ~ N(0, 1),
    the current op and ``against`` = (revision, its ``vqtok.ops.lfq_entropy`` module) alternating."""
    z = torch.randn(n, bits, generator=torch.Generator().manual_seed(seed)).to(cfg.device)

    def step_of(op):
        def step():
            x = z.clone().requires_grad_()
            per_sample, codebook = op(x, temperature=cfg.temperature)
            (per_sample - codebook).backward()
            if x.is_cuda:
                torch.cuda.synchronize()
        return step

    fns = {"current": step_of(lfq_entropy), "against": step_of(against[1].lfq_entropy)}
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [t * 1e3 for t in v] for k, v in interleaved(fns, cfg.reps).items()}
    cur, old = statistics.median(times["current"]), statistics.median(times["against"])
    return {"bits": bits, "tokens": n, "median_ms": cur, "against": against[0], "against_median_ms": old,
            "ratio": cur / old, "reps": cfg.reps}


def table_against(rows: list[dict]) -> str:
    return format_table([{"B": r["bits"], "N": r["tokens"], "median ms": round(r["median_ms"], 2),
                          **against_cells(r, "ms", 2)} for r in rows])


def main(argv=None) -> int:
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
    add_against_option(ap, "the op (instead of the suite: no memory column, no peer)")
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
    against = load_against(args.against, "vqtok.ops.lfq_entropy", ap.error)
    print(f"lfq_entropy fwd+bwd, torch {torch.__version__}, {torch.get_num_threads()} threads, device {cfg.device}")
    rows = [measure_against(b, n, cfg, against) for b, n in cases(cfg)] if against is not None else run(cfg=cfg)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_dict(cfg), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
