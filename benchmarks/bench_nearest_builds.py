"""Before / after for the compiled nearest-code kernel: two builds of ``vqtok._C`` timed on the same
searches (exact mode, or ``--fast``), their runs alternating.

``vqtok.bench.revision`` loads a Python module as of another git revision beside the current one;
a pybind11 extension cannot be loaded twice in one process (its types register globally), so here
each build runs in its own child process, A B A B ..., ``--rounds`` times. Each child times every
case (median of ``--reps`` calls after one warm-up) and returns the indices' and distances' sums,
so the table also says whether both builds gave the same answer. The ratio is the median of the
current build's rounds over the base build's.

Build the base revision's extension in a worktree first (with this checkout's environment), e.g.:

    git worktree add /tmp/base REV && (cd /tmp/base && $OLDPWD/.venv/bin/python setup.py -q build_ext --inplace)
    .venv/bin/python benchmarks/bench_nearest_builds.py --base /tmp/base/tokenizers/vqtok/_C.cpython-311-x86_64-linux-gnu.so
    .venv/bin/python benchmarks/bench_nearest_builds.py --base BASE.so --cases 1x16x16384,16384x256x1024 --threads 1
    .venv/bin/python benchmarks/bench_nearest_builds.py --base BASE.so --codebook pairs   # duplicated codes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import importlib.machinery, importlib.util, json, statistics, sys, timeit
import torch
path, threads, reps, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
fast, codebook = sys.argv[5] == "fast", sys.argv[6]
loader = importlib.machinery.ExtensionFileLoader("vqtok._C", path)
spec = importlib.util.spec_from_file_location("vqtok._C", path, loader=loader)
ext = importlib.util.module_from_spec(spec)
loader.exec_module(ext)
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
out = {}
for n, d, k in cases:
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    if codebook == "pairs":  # every code twice
        c[1::2] = c[0::2]
    elif codebook == "zeros":  # 1% zero codes (at least 2), as in a codebook with untouched entries
        c[: max(2, k // 100)] = 0.0
    idx, dist = torch.empty(n, dtype=torch.int64), torch.empty(n)
    call = lambda: ext.nearest_code_l2(x.data_ptr(), c.data_ptr(), n, k, d, 0, fast, idx.data_ptr(), dist.data_ptr())
    number = max(1, int(2e8 / (2 * n * k * d + 1e7)))  # ~0.1 s or more per timing
    call()
    times = [timeit.timeit(call, number=number) / number for _ in range(reps)]
    out[f"{n}x{d}x{k}"] = [statistics.median(times), int(idx.sum()), float(dist.double().sum())]
print(json.dumps(out))
"""

DEFAULT_CASES = "1x16x16384,1x256x1024,1536x16x16384,16384x8x1024,16384x32x1024,16384x256x1024,16384x256x16384"


def current_build() -> Path:
    """The extension the current checkout imports."""
    import vqtok

    found = sorted(Path(vqtok.__file__).parent.glob("_C*.so"))
    if not found:
        raise SystemExit("vqtok._C is not built in this checkout (make build)")
    return found[0]


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    """'NxDxK,...' -> [(N, D, K), ...]."""
    cases = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a case is NxDxK with positive integers, got {item!r}")
        cases.append(tuple(int(p) for p in parts))
    return cases


CODEBOOKS = ("gaussian", "pairs", "zeros")


def measure(builds: dict[str, Path], cases, threads: int, reps: int, rounds: int, fast: bool = False,
            codebook: str = "gaussian") -> list[dict]:
    """Rows per case: each build's median over ``rounds`` alternating child runs, the ratio
    current / base, and whether every run of both builds gave the same answer."""
    runs = {name: [] for name in builds}
    for _ in range(rounds):
        for name, path in builds.items():
            res = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads), str(reps), json.dumps(cases),
                                  "fast" if fast else "exact", codebook], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"the {name} build failed:\n{res.stderr.strip()[-2000:]}")
            runs[name].append(json.loads(res.stdout))
    rows = []
    for key in runs["base"][0]:
        base = statistics.median(r[key][0] for r in runs["base"])
        cur = statistics.median(r[key][0] for r in runs["current"])
        answers = {tuple(r[key][1:]) for name in runs for r in runs[name]}
        rows.append({"case": key, "base_ms": base * 1e3, "current_ms": cur * 1e3, "ratio": cur / base,
                     "same_answer": len(answers) == 1})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base build's _C*.so")
    ap.add_argument("--current", default=None, help="the build to compare (default: this checkout's)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"NxDxK,... (default {DEFAULT_CASES})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9, help="timed calls per case and run (median)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per build")
    ap.add_argument("--fast", action="store_true", help="the certified fast mode (AMX-BF16 where the CPU has it)")
    ap.add_argument("--codebook", choices=CODEBOOKS, default="gaussian",
                    help="Gaussian codes; every code twice (pairs); or 1%% of the codes zero (zeros)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        ap.error(str(e))
    builds = {"base": Path(args.base), "current": Path(args.current) if args.current else current_build()}
    for name, path in builds.items():
        if not path.is_file():
            ap.error(f"--{name}: no such file {path}")
    rows = measure(builds, cases, args.threads, args.reps, args.rounds, args.fast, args.codebook)
    print(f"nearest_code_l2 (fp32, {'fast' if args.fast else 'exact'}, {args.codebook} codebook), {args.threads} threads, median of {args.reps} calls x {args.rounds} "
          f"alternating runs per build\n{'N x D x K':>18}  {'base ms':>9}  {'current ms':>10}  {'ratio':>6}  same answer")
    for r in rows:
        print(f"{r['case']:>18}  {r['base_ms']:9.3f}  {r['current_ms']:10.3f}  {r['ratio']:6.3f}  {r['same_answer']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
