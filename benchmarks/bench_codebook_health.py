"""Per-step cost of codebook health tracking (``CodebookHealth.update``) against the codebook size.

Every vqtok quantizer updates its tracker once per training step: batch counts into the running
histogram, the EMA usage distribution, then stats (batch usage and perplexity, EMA perplexity,
dead codes, collapse). With a small batch and a large codebook (the quantizer study's 1536 tokens
at 2^18 codes) that update is a fixed cost per step on top of the quantiser itself.

Method: ``tokens`` random ids per step from a fixed generator, ``warmup`` steps, then ``reps``
timings of ``steps`` consecutive updates each; the table gives the median time per update and the
fastest and slowest of the ``reps``. torch threads: ``--threads`` (default torch's).
``--against REV`` also times the tracker as of git revision REV (``vqtok.bench.revision``), its reps
alternating with the current one's in this process, and adds the ratio of the medians.

    .venv/bin/python benchmarks/bench_codebook_health.py --threads 2
    .venv/bin/python benchmarks/bench_codebook_health.py --bits 10,18 --tokens 1536 --json health.json
    .venv/bin/python benchmarks/bench_codebook_health.py --threads 1 --reps 31 --against HEAD~1   # before / after
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vqtok.bench.report import format_table, print_rows
from vqtok.bench.revision import add_against_option, against_cells, interleaved
from vqtok.bench.revision import against as load_against
from vqtok.metrics.codebook import CodebookHealth


def measure(bits: int, tokens: int, steps: int = 32, reps: int = 9, warmup: int = 32, seed: int = 0,
            against: tuple[str, object] | None = None) -> dict:
    """Median / min / max microseconds per ``CodebookHealth.update`` of ``tokens`` ids over 2^bits codes.
    ``against`` = (revision, that revision's ``vqtok.quantizers.health`` module): its tracker runs
    the same updates, alternating with the current one rep by rep."""
    k = 1 << bits
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(k, (tokens,), generator=g) for _ in range(steps)]
    trackers = {"current": CodebookHealth(k)}
    if against is not None:
        trackers["against"] = against[1].CodebookHealth(k)
    last = {}

    def run_of(name):
        def run():
            for idx in batches:
                last[name] = trackers[name].update(idx)
        return run

    for health in trackers.values():
        for i in range(warmup):
            health.update(batches[i % steps])
    times = interleaved({n: run_of(n) for n in trackers}, reps)
    per_step = [t / steps * 1e6 for t in times["current"]]
    stats = last["current"]
    row = {"bits": bits, "codes": k, "tokens": tokens, "median_us": statistics.median(per_step),
           "min_us": min(per_step), "max_us": max(per_step), "reps": reps, "steps_per_rep": steps,
           "ema_perplexity": float(stats["ema_perplexity"]), "dead_codes": int(stats["dead_codes"])}
    if against is not None:
        old = statistics.median(t / steps * 1e6 for t in times["against"])
        row.update(against=against[0], against_median_us=old, ratio=row["median_us"] / old)
    return row


def table(rows: list[dict]) -> str:
    return format_table([{"codes": f"2^{r['bits']}", "tokens": r["tokens"], "median us": round(r["median_us"]),
                          "min us": round(r["min_us"]), "max us": round(r["max_us"]),
                          "EMA ppl": round(r["ema_perplexity"], 1), "dead": r["dead_codes"],
                          **against_cells(r, "us")} for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="10,14,18", help="comma-separated log2 codebook sizes")
    ap.add_argument("--tokens", type=int, default=1536, help="ids per step (the quantizer study's batch)")
    ap.add_argument("--steps", type=int, default=32, help="updates per timing")
    ap.add_argument("--reps", type=int, default=9, help="timings per size (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_against_option(ap, "the tracker")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--bits expects comma-separated integers, got {args.bits!r}")
    if not bits or any(not 1 <= b <= 24 for b in bits) or args.tokens < 1 or args.steps < 1 or args.reps < 1:
        ap.error("--bits must be in 1..24; --tokens, --steps and --reps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    against = load_against(args.against, "vqtok.quantizers.health", ap.error)
    rows = [measure(b, args.tokens, args.steps, args.reps, against=against) for b in bits]
    print_rows(table(rows), rows, args.json, torch.get_num_threads())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
