"""FSQ and LFQ forward + backward: vqtok (torch reference, C++) vs vector-quantize-pytorch.

Prints one table per N (median of --reps runs after a warm-up) with GB/s from the minimum fp32
traffic (see vqtok/bench/elementwise.py for the byte formulas), the fraction of this machine's
measured memcpy bandwidth, and the speed-up over vector-quantize-pytorch; --json writes the rows
with the machine info. The same suite runs inside `vqtok bench --suite elementwise`.

    python benchmarks/bench_fsq_lfq.py                      # N = 2^20, levels 8,5,5,5, B = 18
    python benchmarks/bench_fsq_lfq.py --n 65536 1048576 --json fsq_lfq.json
"""

from __future__ import annotations

import argparse
import sys

from vqtok.bench.elementwise import ElementwiseBenchConfig, run
from vqtok.bench.machine import machine_info
from vqtok.bench.report import add_derived, format_table, write_json

COLUMNS = ["op", "backend", "kind", "shape", "ms", "gbps", "frac_memcpy", "speedup_vs_peer", "note"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1 << 20], help="token counts N to run")
    p.add_argument("--levels", type=int, nargs="+", default=[8, 5, 5, 5], help="FSQ levels")
    p.add_argument("--bits", type=int, default=18, help="LFQ bits B")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median)")
    p.add_argument("--no-peer", action="store_true", help="skip vector-quantize-pytorch")
    p.add_argument("--quick", action="store_true", help="3 repetitions, a smaller memcpy probe")
    p.add_argument("--json", default=None, metavar="PATH", help="write rows and machine info here")
    args = p.parse_args(argv)
    machine = machine_info(quick=args.quick)
    print(f"machine: {machine['cpu']} | {machine['cores']} cores | isa {machine['isa']} | "
          f"memcpy {machine['memcpy_gbps']:.1f} GB/s | FMA peak {machine['fma_peak_gflops']:.0f} GFLOP/s")
    all_rows = []
    for n in args.n:
        cfg = ElementwiseBenchConfig(n=n, fsq_levels=tuple(args.levels), lfq_bits=args.bits,
                                     reps=3 if args.quick else args.reps, peer=not args.no_peer)
        rows = add_derived(run(cfg=cfg), machine)
        print(f"\nN = {n}")
        print(format_table(rows, COLUMNS))
        all_rows += rows
    if args.json:
        print(f"json: {write_json(args.json, {'machine': machine, 'rows': all_rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
