"""`vqtok bench` suite: exact nearest-code search (vqtok ``cpp``) against FAISS and plain torch.

Each case is one (N, D, K) of fp32 Gaussian rows and codes (``data="lowrank"``: both from one
rank-4 subspace, as trained latents concentrate). Per backend: median wall time of
``reps`` calls after one warm-up (the fused backends of a case take turns call by call, so drift in
the machine's speed falls on all of them alike; the baselines that materialise N x K run after),
GFLOP/s = 2 N K D / t (the FMA work of all N x K dot products, whatever the method executes), the
time ratio against FAISS ``IndexFlatL2`` k=1 (below 1 is faster than FAISS), the fraction of the
machine's measured fp32 FMA peak (``vqtok.bench.machine.fma_peak``, measured once per run), the
share of indices equal to vqtok's exact answer, and the peak extra memory.

Backends:
  cpp          vqtok.ops.nearest_code(..., backend="cpp") (exact; certified re-decisions included)
  cpp_fast     the same with precision="fast": bf16 scores where the CPU has AMX-BF16 or
               AVX512-BF16, every candidate inside the bf16 error bound decided exactly (same
               answer; elsewhere it runs the exact path)
  faiss        faiss.IndexFlatL2(D) with the codes added, search(x, 1) (add not timed)
  torch_cdist  torch.cdist(x, c).argmin(1) (materialises N x K)
  torch_addmm  chunks of rows: addmm(|c|^2, x, c^T, alpha=-2).argmin(1) (no N x K matrix)
  vqtorch      vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K) eval forward; run
               only where its ~3 N x K fp32 temporaries fit ``vqtorch_max_gib``

Memory: peak resident-set growth (VmHWM - VmRSS after resetting VmHWM through
/proc/self/clear_refs) of one call, measured in a fresh subprocess per backend started with
MALLOC_MMAP_THRESHOLD_=65536 so that every buffer of 64 KiB or more is mapped fresh and counted
(native allocations included, unlike tracemalloc). Outputs (12 bytes per row) are counted too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from vqtok.ops import nearest_code

ALL_BACKENDS = ("cpp", "cpp_fast", "faiss", "torch_cdist", "torch_addmm", "vqtorch")
FUSED = ("cpp", "cpp_fast", "faiss")  # backends that never hold an N x K matrix: they also run the big K


@dataclass(frozen=True)
class NearestBenchConfig:
    n: int = 16384  # query rows
    dims: tuple[int, ...] = (8, 16, 32, 256)  # D
    codes: tuple[int, ...] = (1024, 16384, 65536)  # K, every backend
    fused_codes: tuple[int, ...] = (262144,)  # K, fused backends only
    backends: tuple[str, ...] = ALL_BACKENDS
    reps: int = 5  # timed calls per case (median reported), after one warm-up
    threads: int = 2  # torch / OpenMP / FAISS threads
    addmm_rows: int = 1024  # row chunk of torch_addmm
    cdist_max_gib: float = 6.0  # torch_cdist only where its N x K fp32 matrix fits
    vqtorch_max_gib: float = 6.0  # vqtorch only where ~3 N x K fp32 temporaries fit
    memory: bool = True  # measure peak extra memory (subprocess per backend)
    seed: int = 0
    data: str = "gaussian"  # x and codes: "gaussian" (i.i.d. N(0, 1)) or "lowrank" (see _data)

    @classmethod
    def quick(cls) -> "NearestBenchConfig":
        # small enough for `make demo` on a busy 2-core machine; memory needs a subprocess per
        # backend (torch import), so it is off here
        return cls(n=2048, dims=(8, 32), codes=(1024, 4096), fused_codes=(), reps=3, memory=False)


def config_dict(cfg: NearestBenchConfig) -> dict:
    return dataclasses.asdict(cfg)


def cases(cfg: NearestBenchConfig) -> list[tuple[int, int, str]]:
    """(D, K, backend) triples in table order."""
    out = []
    for d in cfg.dims:
        for k in tuple(cfg.codes) + tuple(cfg.fused_codes):
            for b in cfg.backends:
                if k in cfg.fused_codes and k not in cfg.codes and b not in FUSED:
                    continue
                out.append((d, k, b))
    return out


DATA = ("gaussian", "lowrank")
LOWRANK = 4  # the rank of "lowrank" data


def _data(cfg: NearestBenchConfig, d: int, k: int):
    """(x [N, D], codes [K, D]). "gaussian": i.i.d. N(0, 1). "lowrank": both from one random
    rank-4 subspace plus N(0, 0.01^2) noise, the way trained latents and codebooks concentrate;
    many codes then score alike, which the certified fast mode must resolve exactly."""
    g = torch.Generator().manual_seed(cfg.seed + 1000 * d + k)
    if cfg.data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {cfg.data!r}")
    if cfg.data == "gaussian":
        return torch.randn(cfg.n, d, generator=g), torch.randn(k, d, generator=g)
    basis = torch.randn(LOWRANK, d, generator=g) / LOWRANK**0.5
    x, c = (torch.randn(m, LOWRANK, generator=g) @ basis + 0.01 * torch.randn(m, d, generator=g) for m in (cfg.n, k))
    return x, c


def _skip_reason(cfg: NearestBenchConfig, backend: str, n: int, k: int) -> str | None:
    if backend == "torch_cdist" and n * k * 4 / 2**30 > cfg.cdist_max_gib:
        return f"not run (needs {n * k * 4 / 2**30:.1f} GiB)"
    if backend == "vqtorch" and 3 * n * k * 4 / 2**30 > cfg.vqtorch_max_gib:
        return f"not run (needs {3 * n * k * 4 / 2**30:.1f} GiB)"
    return None


def make_runner(cfg: NearestBenchConfig, backend: str, x: torch.Tensor, c: torch.Tensor):
    """A no-argument callable returning int64 indices [N] for ``backend`` (set-up not timed)."""
    if backend == "cpp":
        return lambda: nearest_code(x, c, backend="cpp")[0]
    if backend == "cpp_fast":
        return lambda: nearest_code(x, c, backend="cpp", precision="fast")[0]
    if backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(cfg.threads)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(c.numpy())
        xn = x.numpy()
        return lambda: torch.from_numpy(index.search(xn, 1)[1][:, 0])
    if backend == "torch_cdist":
        return lambda: torch.cdist(x, c).argmin(1)
    if backend == "torch_addmm":
        cn = (c * c).sum(1)[None]
        ct = c.t()

        def run():
            return torch.cat(
                [torch.addmm(cn, x[r : r + cfg.addmm_rows], ct, alpha=-2.0).argmin(1) for r in range(0, x.shape[0], cfg.addmm_rows)]
            )

        return run
    if backend == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=x.shape[1], codebook_size=c.shape[0]).eval()
        vq._codebook.embed.data.copy_(c[None])
        xb = x[None]

        def run():
            with torch.no_grad():
                return vq(xb)[1][0]

        return run
    raise ValueError(f"unknown backend {backend!r}; choose from {ALL_BACKENDS}")


def _fast_kernel(k: int, d: int) -> str:
    """Which kernel precision="fast" ran for this shape."""
    from vqtok.ops import _native

    c = _native._C
    if c is None or not hasattr(c, "nearest_fast_runs"):
        return "exact kernel"
    if c.nearest_fast_runs(k, d):
        return c.nearest_fast_isa()
    return "fp32 kernel" + (" (search too small)" if c.nearest_fast_isa() else " (no bf16 kernel)")


def _time_interleaved(fns: dict, reps: int) -> dict:
    """{name: (median seconds, output)} of the no-argument callables in ``fns`` (already warmed
    up): ``reps`` rounds that call every one of them in turn, so that a slow spell of the machine
    (another tenant on the cores, a clock change) falls on every backend alike instead of on
    whichever ran during it."""
    outs, ts = {}, {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts[name]), outs[name]) for name in fns}


# ---- memory: one subprocess per backend --------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _memory_worker(cfg_json: str, backend: str, shapes_json: str) -> None:
    """Runs in the subprocess: prints {"D,K": peak extra MiB} for one backend."""
    cfg = NearestBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()})
    torch.set_num_threads(cfg.threads)
    out = {}
    for d, k in json.loads(shapes_json):
        x, c = _data(cfg, d, k)
        fn = make_runner(cfg, backend, x, c)
        fn()  # first call: lazy initialisation is not part of the steady-state peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS")
        fn()
        out[f"{d},{k}"] = round((_status_kib("VmHWM") - base) / 1024, 1)
        del fn, x, c
    print(json.dumps(out))


def measure_memory(cfg: NearestBenchConfig, backend: str, shapes: list[tuple[int, int]]) -> dict:
    if not shapes:
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import sys; from vqtok.bench.nearest import _memory_worker as w; w(sys.argv[1], sys.argv[2], sys.argv[3])"
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config_dict(cfg)), backend, json.dumps(shapes)],
        env=env, capture_output=True, text=True,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the suite ------------------------------------------------------------------------------------
def _progress(groups: dict, progress: bool):
    """The (shape, backends) items of ``groups``, under a progress bar when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return groups.items()
    return tqdm(groups.items(), desc="nearest_code bench", unit="shape", disable=not progress)


def run(quick: bool = False, backends=None, cfg: NearestBenchConfig | None = None, progress: bool = True,
        peak_gflops: float | None = None) -> list[dict]:
    """Runs the grid; returns one dict per (D, K, backend) (see the module docstring). With
    ``peak_gflops`` (the machine's measured FMA peak) rows get ``peak_frac``; under `vqtok bench`
    the framework adds ``frac_peak`` from its own single measurement instead."""
    cfg = cfg or (NearestBenchConfig.quick() if quick else NearestBenchConfig())
    if backends is not None:
        cfg = dataclasses.replace(cfg, backends=tuple(backends))
    torch.set_num_threads(cfg.threads)
    todo = cases(cfg)
    rows: list[dict] = []
    faiss_ms = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for d, k, b in todo:  # every backend of one shape is timed in the same rounds
        groups.setdefault((d, k), []).append(b)
    for (d, k), names in _progress(groups, progress):
        x, c = _data(cfg, d, k)
        shape_rows, runners = {}, {}
        for b in names:
            row = {"N": cfg.n, "D": d, "K": k, "backend": b, "gflop": round(2 * cfg.n * k * d / 1e9, 2)}
            shape_rows[b] = row
            why = _skip_reason(cfg, b, cfg.n, k)
            if why is not None:
                row["note"] = why
                continue
            try:
                runners[b] = make_runner(cfg, b, x, c)
                runners[b]()  # warm-up; a baseline that cannot run here is reported, not fatal
            except Exception as e:
                row["note"] = f"failed: {type(e).__name__}: {e}"[:120]
                runners.pop(b, None)
        # The fused backends take turns; each materialising baseline is timed on its own afterwards,
        # so its GiB-sized allocations and frees never land between two calls of another backend.
        fused = {b: f for b, f in runners.items() if b in FUSED}
        timed = _time_interleaved(fused, cfg.reps) if fused else {}
        for b, f in runners.items():
            if b not in FUSED:
                timed.update(_time_interleaved({b: f}, cfg.reps))
        exact = nearest_code(x, c, backend="cpp")[0] if timed else None
        for b, (t, idx) in timed.items():
            row = shape_rows[b]
            row["ms"] = round(t * 1e3, 2)
            row["gflops"] = round(2 * cfg.n * k * d / t / 1e9, 1)
            row["agree"] = round((idx.to(torch.int64) == exact).double().mean().item(), 5)
            if peak_gflops:
                row["peak_frac"] = round(row["gflops"] / peak_gflops, 3)
            if b == "faiss":
                faiss_ms[(d, k)] = row["ms"]
            if b == "cpp_fast":
                row["note"] = _fast_kernel(k, d)
        rows += [shape_rows[b] for b in names]
    for row in rows:
        f = faiss_ms.get((row["D"], row["K"]))
        if f and "ms" in row:
            row["vs_faiss"] = round(row["ms"] / f, 3)
    if cfg.memory:
        for b in cfg.backends:
            shapes = [(r["D"], r["K"]) for r in rows if r["backend"] == b and "ms" in r]
            mem = measure_memory(cfg, b, shapes)
            for r in rows:
                if r["backend"] == b and "ms" in r:
                    r["peak_mib"] = mem.get(f"{r['D']},{r['K']}", mem.get("error"))
    return rows


COLUMNS = [
    ("D", "D"), ("K", "K"), ("backend", "backend"), ("ms", "ms"), ("gflops", "GFLOP/s"),
    ("peak_frac", "of peak"), ("vs_faiss", "vs FAISS"), ("agree", "agree"), ("peak_mib", "peak MiB"),
]


def table(rows: list[dict]) -> str:
    head = [name for _, name in COLUMNS] + ["note"]
    lines = [[str(r.get(key, "-")) for key, _ in COLUMNS] + [str(r.get("note", ""))] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny grid (N=2048, D in {8, 32}, K in {1024, 4096}, no memory column), < 30 s")
    ap.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(ALL_BACKENDS)}")
    ap.add_argument("--dims", default=None, help="comma-separated D values (overrides the grid)")
    ap.add_argument("--codes", default=None, help="comma-separated K values for every backend (overrides the grid)")
    ap.add_argument("--fused-codes", default=None, help="comma-separated K values for fused backends only ('' for none)")
    ap.add_argument("--n", type=int, default=None, help="query rows N")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every backend (default 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--data", choices=DATA, default=None,
                    help="inputs: i.i.d. Gaussian (default) or from one rank-4 subspace plus 1%% noise")
    ap.add_argument("--json", default=None, help="write rows + config to this file")
    args = ap.parse_args(argv)
    cfg = NearestBenchConfig.quick() if args.quick else NearestBenchConfig()
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())  # noqa: E731
    changes = {}
    if args.backends:
        changes["backends"] = tuple(b.strip() for b in args.backends.split(","))
        bad = [b for b in changes["backends"] if b not in ALL_BACKENDS]
        if bad:
            ap.error(f"--backends: unknown {bad}; choose from {ALL_BACKENDS}")
    for name in ("dims", "codes", "fused_codes"):
        if getattr(args, name) is not None:
            changes[name] = ints(getattr(args, name))
    for name in ("n", "reps", "threads", "data"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.no_memory:
        changes["memory"] = False
    cfg = dataclasses.replace(cfg, **changes)
    from vqtok.bench.machine import fma_peak  # noqa: PLC0415

    peak = fma_peak()[0]
    rows = run(cfg=cfg, peak_gflops=peak)
    print(f"nearest_code, N={cfg.n} fp32, torch {torch.__version__}, {cfg.threads} threads, median of {cfg.reps}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config_dict(cfg), "fma_peak_gflops": peak, "rows": rows}, f, indent=2)
