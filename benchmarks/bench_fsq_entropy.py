"""Exact FSQ entropy (``vqtok.ops.fsq_entropy``): forward + backward time per codebook and batch.

The op behind FSQ's entropy term (the quantizer study's ``fsq-entropy`` rows): per-sample and
codebook entropy of the soft code assignment, the codebook term as three GEMMs of 2 N K flops
(forward P1^T P2, backward P2 G^T and P1 G) over the two balanced groups of dims. There is no peer
op to run side by side (vector-quantize-pytorch's FSQ has no entropy term).

Method: h ~ N(0, 1) from a fixed generator; one warm-up, then ``reps`` timings of ``per_sample -
codebook`` forward and backward; the table gives the median, the fastest and slowest, and the
median's GFLOP/s of the three GEMMs. torch threads: ``--threads`` (default torch's).
``--against REV`` also times the op as of git revision REV (``vqtok.bench.revision``), its reps
alternating with the current one's in this process, and adds the ratio of the medians.

    .venv/bin/python benchmarks/bench_fsq_entropy.py --threads 2
    .venv/bin/python benchmarks/bench_fsq_entropy.py --levels 8,8,8,6,5 --tokens 1536,16384 --json fsq.json
    .venv/bin/python benchmarks/bench_fsq_entropy.py --threads 1 --reps 31 --against HEAD~1   # before / after
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from vqtok.bench.report import format_table
from vqtok.bench.revision import add_against_option, against_cells, interleaved
from vqtok.bench.revision import against as load_against
from vqtok.ops.fsq_entropy import fsq_entropy

# the quantizer study's FSQ levels at 2^10, 2^14 and 2^18 codes
DEFAULT_LEVELS = ("8,5,5,5", "8,8,8,6,5", "8,8,8,8,8,8")


def measure(levels: list[int], tokens: int, temperature: float = 0.5, reps: int = 9, seed: int = 0,
            against: tuple[str, object] | None = None) -> dict:
    """Median / min / max milliseconds of one forward + backward of fsq_entropy on [tokens, len(levels)].
    ``against`` = (revision, that revision's ``vqtok.ops.fsq_entropy`` module): its op is timed
    too, alternating with the current one rep by rep (``vqtok.bench.revision.interleaved``)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, len(levels), generator=g)

    def step_of(op):
        def step():
            x = h.clone().requires_grad_()
            per_sample, codebook = op(x, levels, temperature=temperature)
            (per_sample - codebook).backward()
            return x.grad
        return step

    fns = {"current": step_of(fsq_entropy)}
    if against is not None:
        fns["against"] = step_of(against[1].fsq_entropy)
    grad = fns["current"]()  # warm-up (both versions)
    if against is not None:
        fns["against"]()
    times = {n: [t * 1e3 for t in ts] for n, ts in interleaved(fns, reps).items()}
    k = math.prod(levels)
    gflop = 3 * 2 * tokens * k / 1e9
    med = statistics.median(times["current"])
    row = {"levels": levels, "codes": k, "tokens": tokens, "median_ms": med, "min_ms": min(times["current"]),
           "max_ms": max(times["current"]), "reps": reps, "gflop": gflop, "gflops": gflop / (med / 1e3),
           "grad_finite": bool(torch.isfinite(grad).all())}
    if against is not None:
        old = statistics.median(times["against"])
        row.update(against=against[0], against_median_ms=old, ratio=med / old)
    return row


def table(rows: list[dict]) -> str:
    return format_table([{"levels": ",".join(map(str, r["levels"])), "codes": r["codes"], "tokens": r["tokens"],
                          "median ms": round(r["median_ms"], 2), "min ms": round(r["min_ms"], 2),
                          "max ms": round(r["max_ms"], 2), "GFLOP": round(r["gflop"], 2),
                          "GFLOP/s": round(r["gflops"], 1), **against_cells(r, "ms", 2)} for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", action="append", default=None, metavar="L,L,...",
                    help="FSQ levels (repeatable; default: the quantizer study's 2^10, 2^14 and 2^18 sets)")
    ap.add_argument("--tokens", default="1536,16384", help="comma-separated batch sizes N")
    ap.add_argument("--temperature", type=float, default=0.5, help="tau of the soft assignment")
    ap.add_argument("--reps", type=int, default=9, help="timings per case (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_against_option(ap, "the op")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    try:
        level_sets = [[int(v) for v in s.split(",") if v.strip()] for s in (args.levels or DEFAULT_LEVELS)]
        tokens = [int(v) for v in args.tokens.split(",") if v.strip()]
    except ValueError:
        ap.error("--levels and --tokens expect comma-separated integers")
    if (not level_sets or any(not ls or min(ls) < 2 or math.prod(ls) > 2**22 for ls in level_sets)
            or not tokens or min(tokens) < 1 or args.reps < 1 or not args.temperature > 0):
        ap.error("levels >= 2 with at most 2^22 codes; --tokens and --reps >= 1; --temperature > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    against = load_against(args.against, "vqtok.ops.fsq_entropy", ap.error)
    rows = [measure(ls, n, args.temperature, args.reps, against=against) for ls in level_sets for n in tokens]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads(), "temperature": args.temperature}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
