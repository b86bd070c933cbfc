"""`vqtok bench` suite: the exact LFQ entropy op against vector-quantize-pytorch's dense LFQ entropy.

Each case is one (bits B, tokens N): forward + backward of ``per_sample - codebook`` entropy, median
wall time after a warm-up, and peak extra memory (CPU: peak resident set growth, read from
/proc/self/status after ``malloc_trim`` and a reset of the peak; CUDA: torch's peak allocation). Work per case, written out:
the codebook term is three GEMMs of 2 N 2^B flops (forward P1^T P2, backward P2 G^T and P1 G).

vector-quantize-pytorch builds the N x 2^B softmax (and several same-sized temporaries); it runs
under an address-space cap (``peer_mem_gib``) so that it fails with an out-of-memory error instead
of exhausting the machine, and cases whose dense fp32 matrix alone exceeds ``peer_max_dense_gib``
are reported as "needs X GiB, not run".
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from vqtok.ops import lfq_entropy


@dataclass(frozen=True)
class EntropyBenchConfig:
    bits: tuple[int, ...] = (10, 14, 16, 18, 20)  # codebook 2^B
    tokens: tuple[int, ...] = (16384, 262144)  # N
    extra_cases: tuple[tuple[int, int], ...] = ((24, 16384),)  # (B, N) beyond the grid
    temperature: float = 0.1
    reps: int = 5  # timed repetitions (median reported), after one warm-up
    max_case_gflop: float = 2000.0  # skip the exact op where 3 GEMMs exceed this (reported)
    peer: bool = True  # also run vector-quantize-pytorch's LFQ with the entropy loss on
    peer_max_dense_gib: float = 8.0  # do not attempt the peer beyond this N x 2^B fp32 matrix
    peer_mem_gib: float = 6.0  # address-space cap while the peer runs (it fails cleanly beyond it)
    device: str = "cpu"

    @classmethod
    def quick(cls) -> "EntropyBenchConfig":
        return cls(bits=(10, 14, 18), tokens=(16384,), extra_cases=(), reps=2, peer_mem_gib=3.0)

    @classmethod
    def tiny(cls) -> "EntropyBenchConfig":
        return cls(bits=(10,), tokens=(2048,), extra_cases=(), reps=1, peer_mem_gib=1.0)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def _peak_meter(device: torch.device):
    """Yields a dict that holds ``peak_mib`` (extra memory above the start) on exit."""
    out = {"peak_mib": float("nan")}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    _malloc_trim()  # return freed heap pages, so that re-used memory counts as growth again
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        base = _status_kib("VmRSS")
    except OSError:
        base = None
    yield out
    if base is not None:
        out["peak_mib"] = (_status_kib("VmHWM") - base) / 1024


@contextlib.contextmanager
def _address_space_cap(extra_gib: float):
    """Cap this process's address space at its current size + extra_gib (Linux), restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _status_kib("VmSize") * 1024 + int(extra_gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_fwd_bwd(step, device, reps: int):
    step()  # warm-up
    times = []
    with _peak_meter(device) as mem:
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, mem["peak_mib"]


def _ours_step(z, cfg):
    def step():
        zr = z.detach().requires_grad_()
        ps, cb = lfq_entropy(zr, temperature=cfg.temperature)
        (ps - cb).backward()
        return zr.grad

    return step


def _peer_step(z, cfg):
    from vector_quantize_pytorch import LFQ

    lfq = LFQ(dim=z.shape[-1], entropy_loss_weight=0.1).train().to(z.device)

    def step():
        zr = z.detach()[None].requires_grad_()
        _, br = lfq(zr, inv_temperature=1.0 / cfg.temperature, return_loss_breakdown=True)
        (br.per_sample_entropy - br.batch_entropy).backward()
        return zr.grad

    return step


def _case(bits: int, n: int, cfg: EntropyBenchConfig) -> dict:
    device = torch.device(cfg.device)
    gflop = 3 * 2 * n * 2.0**bits / 1e9
    row = {"bits": bits, "tokens": n, "codes": 2**bits, "gflop": round(gflop, 2)}
    z = torch.randn(n, bits, device=device)
    if gflop > cfg.max_case_gflop:
        row["ours"] = f"skipped ({gflop:.0f} GFLOP > max_case_gflop)"
    else:
        reps = cfg.reps if gflop < 200 else 1
        ms, mib = _time_fwd_bwd(_ours_step(z, cfg), device, reps)
        row.update(ours_ms=round(ms, 2), ours_mib=round(mib, 1), ours_gflops=round(gflop / ms * 1e3, 1))
        row.update(ms=row["ours_ms"], gflops=row["ours_gflops"])  # the framework's generic columns
    if not cfg.peer:
        return row
    dense_gib = n * 2.0**bits * 4 / 2**30
    if dense_gib > cfg.peer_max_dense_gib:
        row["peer"] = f"needs {dense_gib:.0f} GiB (N x 2^B fp32), not run"
        return row
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        row["peer"] = "vector-quantize-pytorch not installed"
        return row
    try:
        with _address_space_cap(cfg.peer_mem_gib):
            ms, mib = _time_fwd_bwd(_peer_step(z, cfg), device, max(1, min(cfg.reps, 3)))
        row.update(peer_ms=round(ms, 2), peer_mib=round(mib, 1))
        if "ours_ms" in row:
            row["speedup"] = round(ms / row["ours_ms"], 1)
    except (RuntimeError, MemoryError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        row["peer"] = f"out of memory (> {cfg.peer_mem_gib:g} GiB cap; dense matrix {dense_gib:.2f} GiB)"
    gc.collect()
    return row


def cases(cfg: EntropyBenchConfig) -> list[tuple[int, int]]:
    return list(itertools.product(cfg.bits, cfg.tokens)) + list(cfg.extra_cases)


def run(
    quick: bool = False, tiny: bool = False, cfg: EntropyBenchConfig | None = None, progress: bool = True
) -> list[dict]:
    """Run the suite; one dict per case (keys: bits, tokens, codes, gflop, ours_ms, ours_mib, ...)."""
    if cfg is None:
        cfg = EntropyBenchConfig.tiny() if tiny else EntropyBenchConfig.quick() if quick else EntropyBenchConfig()
    todo = cases(cfg)
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="lfq_entropy bench", unit="case")
    rows = []
    for bits, n in todo:
        row = _case(bits, n, cfg)
        row["suite"] = "entropy"
        rows.append(row)
    return rows


def config_dict(cfg: EntropyBenchConfig) -> dict:
    return asdict(cfg)
