"""`vqtok bench` suite: one training step of each quantizer module vs vector-quantize-pytorch.

A step is forward + backward (+ the EMA / health update the module does in training mode) on
N tokens of dimension D = 32 with K codes, loss = mean(quantized^2) + the module's aux loss.

Method:
* every case runs in its own subprocess (``python -m vqtok.bench.modules --case JSON``), so one
  case's allocations never inflate another's peak and an out-of-memory peer cannot kill the run;
* time: median of ``reps`` steps after one warm-up step;
* peak memory: the extra memory a step needs on top of inputs, module and imports. The child
  runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed tensors go back to the OS and RSS follows
  live memory), does the warm-up step (lazy imports, first-call caches), resets the kernel's RSS
  high-water mark (``echo 5 > /proc/self/clear_refs``), reads VmRSS, runs the timed steps and
  reports VmHWM - VmRSS(before) from ``/proc/self/status``. Where clear_refs is not writable it
  falls back to ``ru_maxrss`` minus the RSS before the warm-up (then lazy imports count too);
* threads: ``threads`` (0: torch's default); on a shared machine pin it to get stable numbers;
* peer cases whose dense N x K matrix (distances in VectorQuantize / ResidualVQ / SimVQ, code
  probabilities in LFQ) would exceed ``peer_limit_gib`` are not run and report
  "needs X GiB"; neither are those whose measured footprint, ``PEER_FOOTPRINT`` such matrices
  (VectorQuantize's peak RSS is ~6x N x K x 4 bytes at N=16384, K=4096 and at N=65536, K=1024:
  distances, their negation, the one-hot assignment and its transpose product), would not fit
  in the memory this machine has available now: an out-of-memory kill hurts the whole machine.

Pairs (ours -> peer): VectorQuantizer (EMA) -> VectorQuantize (EMA); ResidualVQ (2 layers) ->
ResidualVQ; FSQ -> FSQ (levels with prod = K); LFQ (entropy on) -> LFQ; SimVQ -> SimVQ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

# FSQ levels whose product is K (as close to uniform as possible)
FSQ_LEVELS = {1024: [4, 4, 4, 4, 4], 4096: [8, 8, 8, 8], 16384: [8, 8, 8, 8, 4], 65536: [8, 8, 8, 8, 4, 4]}
MODULES = ("vq", "rvq", "fsq", "lfq", "simvq")
RVQ_DEPTH = 2
PEER_FOOTPRINT = 6  # peer peak RSS / (N x K x 4 bytes), measured (see the module docstring)


@dataclass(frozen=True)
class ModulesBenchConfig:
    n: int = 65536  # tokens N per step
    d: int = 32  # feature dim D
    ks: tuple[int, ...] = (1024, 16384, 65536)  # codebook sizes K
    modules: tuple[str, ...] = MODULES
    reps: int = 3  # timed steps (median), after one warm-up step
    peer: bool = True  # also run vector-quantize-pytorch
    peer_limit_gib: float = 8.0  # skip peer cases whose N x K fp32 matrix exceeds this
    timeout_s: float = 900.0  # per case
    threads: int = 0  # torch / OpenMP threads of each case (0: the default)


QUICK = ModulesBenchConfig(n=16384, ks=(1024,), reps=2)  # about a minute: 10 subprocesses
TINY = ModulesBenchConfig(n=2048, ks=(256,), modules=("vq", "fsq"), reps=1)


# --------------------------------------------------------------------------------------------
# building one case (runs inside the child process)
# --------------------------------------------------------------------------------------------
def _ours(module: str, d: int, k: int):
    from vqtok.quantizers import FSQ, LFQ, ResidualVQ, SimVQ, VectorQuantizer

    if module == "vq":
        return VectorQuantizer(d, k, decay=0.99, beta=0.25)
    if module == "rvq":
        return ResidualVQ(d, k, RVQ_DEPTH, decay=0.99, beta=0.25)
    if module == "fsq":
        return FSQ(FSQ_LEVELS[k], dim=d)
    if module == "lfq":
        return LFQ(d, bits=int(math.log2(k)), entropy_weight=0.1, commitment_weight=0.25)
    if module == "simvq":
        return SimVQ(d, k)
    raise ValueError(f"unknown module {module!r}; choose from {MODULES}")


def _peer(module: str, d: int, k: int):
    import vector_quantize_pytorch as vqp

    if module == "vq":
        return vqp.VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25)
    if module == "rvq":
        return vqp.ResidualVQ(dim=d, codebook_size=k, num_quantizers=RVQ_DEPTH, decay=0.99, commitment_weight=0.25)
    if module == "fsq":
        return vqp.FSQ(levels=FSQ_LEVELS[k], dim=d)
    if module == "lfq":
        return vqp.LFQ(dim=d, codebook_size=k, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
    if module == "simvq":
        return vqp.SimVQ(dim=d, codebook_size=k)
    raise ValueError(f"unknown module {module!r}; choose from {MODULES}")


def _step_fn(impl: str, module: str, n: int, d: int, k: int):
    import torch

    torch.manual_seed(0)
    x = torch.randn(n, d)
    if impl == "vqtok":
        m = _ours(module, d, k).train()

        def step():
            z = x.detach().requires_grad_()
            out = m(z)
            (out.quantized.square().mean() + out.loss).backward()

        return step
    m = _peer(module, d, k).train()

    def step():
        z = x.detach()[None].requires_grad_()  # [1, N, D], channel-last as the peer expects
        out = m(z)
        q = out[0]
        aux = sum(o.sum() for o in out[2:] if torch.is_tensor(o) and o.is_floating_point()) if len(out) > 2 else 0
        (q.square().mean() + aux).backward()

    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(impl: str, module: str, n: int, d: int, k: int, reps: int) -> dict:
    """Times one case in this process: {"ms": median step ms, "peak_mib": extra RSS high-water}."""
    step = _step_fn(impl, module, n, d, k)
    rss_before_warmup = _status_kib("VmRSS")
    step()  # warm-up: lazy imports, backend selection, first-call caches
    reset = _reset_peak()
    rss0 = _status_kib("VmRSS") if reset else rss_before_warmup
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": statistics.median(times) * 1e3, "peak_mib": max(peak - rss0, 0) / 1024,
            "peak_method": "VmHWM" if reset else "ru_maxrss"}


# --------------------------------------------------------------------------------------------
# the suite (parent process)
# --------------------------------------------------------------------------------------------
def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _peer_skip_reason(n: int, k: int, cfg: ModulesBenchConfig) -> str | None:
    dense_gib = n * k * 4 / 2**30
    if dense_gib > cfg.peer_limit_gib:
        return f"needs {dense_gib:.1f} GiB (N x K fp32 matrix)"
    if PEER_FOOTPRINT * dense_gib > _available_gib():
        return f"needs ~{PEER_FOOTPRINT * dense_gib:.0f} GiB, {_available_gib():.1f} GiB available now"
    return None


def _spawn(case: dict, timeout: float, threads: int) -> dict:
    cmd = [sys.executable, "-m", "vqtok.bench.modules", "--case", json.dumps(case)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"note": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"note": f"failed (exit {p.returncode}): {tail[:160]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(
    quick: bool = False, tiny: bool = False, progress: bool = True, cfg: ModulesBenchConfig | None = None
) -> list[dict]:
    """Rows: module, impl, n, d, k, ms, peak_mib (+ speedup / mem_ratio of vqtok over the peer)."""
    from tqdm.auto import tqdm

    cfg = cfg or (TINY if tiny else QUICK if quick else ModulesBenchConfig())
    try:
        import vector_quantize_pytorch  # noqa: F401

        peer_ok = cfg.peer
    except ImportError:
        peer_ok = False
    cases = [(m, k) for m in cfg.modules for k in cfg.ks if m != "fsq" or k in FSQ_LEVELS]
    rows = []
    for module, k in tqdm(cases, desc="modules bench", disable=not progress, file=sys.stderr):
        base = {"module": module, "n": cfg.n, "d": cfg.d, "k": k}
        spawn = {"timeout": cfg.timeout_s, "threads": cfg.threads}
        ours = {**base, "impl": "vqtok", **_spawn({**base, "impl": "vqtok", "reps": cfg.reps}, **spawn)}
        rows.append(ours)
        if not peer_ok:
            continue
        dense = module in ("vq", "rvq", "lfq", "simvq")
        why = _peer_skip_reason(cfg.n, k, cfg) if dense else None
        peer = {**base, "impl": "vector-quantize-pytorch"}
        peer.update({"note": why} if why else _spawn({**base, "impl": "peer", "reps": cfg.reps}, **spawn))
        rows.append(peer)
        if "ms" in ours and "ms" in peer:
            ours["speedup"] = peer["ms"] / ours["ms"]
            ours["mem_ratio"] = ours["peak_mib"] / max(peer["peak_mib"], 1e-9)
    return rows


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help="internal: JSON of one case to run in this process")
    p.add_argument("--quick", action="store_true", help="small sizes (N=16384, K=1024)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke sizes")
    p.add_argument("--threads", type=int, default=0, help="threads per case (0: torch's default)")
    p.add_argument("--n", type=int, help="tokens per step (default: the preset's)")
    p.add_argument("--ks", help="comma-separated codebook sizes K (default: the preset's)")
    p.add_argument("--modules", help=f"comma-separated subset of {','.join(MODULES)}")
    p.add_argument("--json", help="write the rows and config to this file")
    args = p.parse_args(argv)
    if args.case:
        c = json.loads(args.case)
        if os.environ.get("OMP_NUM_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(json.dumps(run_case(c["impl"], c["module"], c["n"], c["d"], c["k"], c["reps"])))
        return 0
    cfg = TINY if args.tiny else QUICK if args.quick else ModulesBenchConfig()
    over = {"threads": args.threads}
    if args.n:
        over["n"] = args.n
    if args.ks:
        over["ks"] = tuple(int(k) for k in args.ks.split(","))
    if args.modules:
        over["modules"] = tuple(m.strip() for m in args.modules.split(","))
    cfg = replace(cfg, **over)
    rows = run(cfg=cfg)
    from vqtok.bench.report import format_table

    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
