"""Every fp32 input through the FSQ kernels' tanh: the grid path against the exact evaluation.

The FSQ kernels compute tanh from a 1/64 grid with a rounding test and fall back to the plain
double evaluation near fp32 rounding midpoints (kernels/cpu/fsq_lfq_simd.h). Both must give the
same bits for every input. This walks every fp32 bit pattern with magnitude below ``--limit``
(both signs; the default 11.0 covers everything below the clamp at 10, where both return +-1) at
the active SIMD level (``VQTOK_ISA`` lowers it) and reports the mismatches.

    python benchmarks/check_tanh_bits.py                  # 2.19e9 inputs: 87 s at AVX2, 146 s scalar (2 cores)
    VQTOK_ISA=scalar python benchmarks/check_tanh_bits.py --limit 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

CHUNK = 1 << 24


def check(limit: float, progress: bool = True) -> dict:
    from vqtok import _C  # noqa: PLC0415

    top = int(torch.tensor([limit], dtype=torch.float32).view(torch.int32))
    starts = range(0, top, CHUNK)
    try:
        from tqdm import tqdm  # noqa: PLC0415

        starts = tqdm(starts, desc=f"tanh bits ({_C.active_isa()})", unit="chunk", disable=not progress)
    except ImportError:
        pass
    fast, exact = torch.empty(2 * CHUNK), torch.empty(2 * CHUNK)
    mismatches, examples, count = 0, [], 0
    t0 = time.perf_counter()
    for start in starts:
        bits = torch.arange(start, min(start + CHUNK, top), dtype=torch.int32)
        x = torch.cat([bits, bits | torch.tensor(-(2**31), dtype=torch.int32)]).view(torch.float32)
        n = x.numel()
        _C.tanh_f32(x.data_ptr(), n, fast.data_ptr())
        _C.tanh_f32(x.data_ptr(), n, exact.data_ptr(), exact=True)
        bad = fast[:n].view(torch.int32) != exact[:n].view(torch.int32)
        mismatches += int(bad.sum())
        examples += [(float(v), float(f), float(e))
                     for v, f, e in zip(x[bad][:5], fast[:n][bad][:5], exact[:n][bad][:5])]
        count += n
    return {"isa": _C.active_isa(), "limit": limit, "inputs": count, "mismatches": mismatches,
            "examples": examples[:10], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=11.0, help="largest magnitude (exclusive) to walk")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not 0 < args.limit < float("inf"):
        ap.error(f"--limit must be positive and finite, got {args.limit}")
    res = check(args.limit, progress=not args.no_progress)
    print(f"isa {res['isa']}: {res['inputs']} inputs with |x| < {res['limit']}, "
          f"{res['mismatches']} mismatches, {res['seconds']} s")
    for x, f, e in res["examples"]:
        print(f"  x={x!r}: grid path {f!r}, exact {e!r}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 1 if res["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
