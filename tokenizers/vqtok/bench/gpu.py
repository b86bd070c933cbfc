"""`vqtok bench --suite gpu`: nearest-code search on a CUDA device, vqtok kernels vs baselines.

Each case is one (N, D, K) of fp32 Gaussian rows and codes (N = 2^18 by default). Methods:

  triton_exact  vqtok Triton kernel, fp32 operands (certified; re-decided rows included)
  triton_fast   vqtok Triton kernel, bf16 operands, 4 candidates re-ranked in float64, exact
                fallback for rows the certificate rejects (same answer as exact)
  cuda_exact    vqtok CUDA C++ kernel (fp32 FMA, certified)
  torch_cdist   torch.cdist(x, c).argmin(1): materialises N x K (out-of-memory is reported)
  torch_addmm   row chunks of addmm(|c|^2, x, c^T, alpha=-2).argmin(1) (not certified)
  faiss_gpu     faiss.GpuIndexFlatL2 search(x, 1), when a GPU build of FAISS is installed

Columns: median ms of ``reps`` timed calls (CUDA events) after a warm-up; TFLOP/s = 2 N K D / t
(the dot-product work, whatever a method executes); pairs/s = N K / t; ``redo`` the share of rows
re-decided exactly; ``agree`` the share of indices equal to the exact answer; ``frac_bound`` =
pairs/s over the roofline below.

Roofline (H100 SXM reference numbers; the device the bench ran on is in every row):
  GEMM bound     pairs/s <= P_mma / (2 D)         P_mma = 989e12 (bf16 tensor cores, fast),
                                                  495e12 (TF32), 67e12 (fp32 FMA: exact, torch)
  epilogue bound pairs/s <= R_core / C_EPI        R_core = 33.5e12 fp32 lane instructions/s
                                                  (67 TFLOP/s / 2), C_EPI = 4 instructions per
                                                  pair (norm add, compare, two selects)
  CUDA-core GEMMs share those lanes with the epilogue: pairs/s <= R_core / (D + C_EPI)
  memory bound   pairs/s <= N K B_hbm / ((N + K) D 4 + 12 N)      B_hbm = 3.35e12 B/s
  bound = min of the bounds that apply. For D <= 32 the epilogue bounds the fast path, at D = 256
  the GEMM does.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

H100 = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "hbm": 3.35e12}
R_CORE = H100["fp32"] / 2  # fp32 lane instructions per second (one FMA = 2 FLOPs)
C_EPI = 4  # CUDA-core instructions per (row, code) pair in a fused argmin epilogue
# which peak bounds each method's dot products, and whether those run on the CUDA-core lanes
METHOD_PEAK = {
    "triton_exact": ("fp32", True),
    "triton_fast": ("bf16", False),
    "cuda_exact": ("fp32", True),
    "torch_cdist": ("fp32", True),
    "torch_addmm": ("fp32", True),
    "faiss_gpu": ("fp32", True),
}
ALL_METHODS = tuple(METHOD_PEAK)


@dataclass(frozen=True)
class GpuBenchConfig:
    n: int = 1 << 18  # query rows
    dims: tuple[int, ...] = (8, 16, 32, 256)  # D
    codes: tuple[int, ...] = (1024, 8192, 16384, 65536, 262144)  # K
    methods: tuple[str, ...] = ALL_METHODS
    reps: int = 5  # timed calls per case (median reported), after one warm-up
    addmm_elems: int = 1 << 28  # rows x codes per torch_addmm chunk (1 GiB of fp32 scores)
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form notes saved with the rows

    @classmethod
    def quick(cls) -> "GpuBenchConfig":
        return cls(n=1 << 16, dims=(8, 256), codes=(1024, 65536), reps=3)

    @classmethod
    def tiny(cls) -> "GpuBenchConfig":
        return cls(n=512, dims=(16,), codes=(300,), reps=1, methods=("triton_exact", "triton_fast", "torch_addmm"))


def roofline_pairs_per_s(method: str, n: int, k: int, d: int) -> float:
    """Upper bound of pairs/s for ``method`` at (N, K, D); see the module docstring."""
    peak, on_cores = METHOD_PEAK[method]
    mem = n * k * H100["hbm"] / ((n + k) * d * 4 + 12 * n)
    if on_cores:
        return min(R_CORE / (d + C_EPI), mem)
    return min(H100[peak] / (2 * d), R_CORE / C_EPI, mem)


# --------------------------------------------------------------------------------------------
# methods: each returns a callable search(x, c) -> indices, and a dict of per-call stats
# --------------------------------------------------------------------------------------------
def _method(name: str, cfg: GpuBenchConfig):
    if name in ("triton_exact", "triton_fast"):
        from vqtok.ops.triton import nearest

        prec = name.split("_")[1]

        def run(x, c, stats):
            return nearest.search(x, c, prec, stats=stats)[0]

        return run
    if name == "cuda_exact":
        from vqtok.ops.dispatch import resolve, unavailable_reason

        why = unavailable_reason("cuda")
        if why is not None:
            raise RuntimeError(f"cuda backend unavailable: {why}")
        impl = resolve("nearest_code_l2", "cuda", torch.device("cuda"))  # the kernel path, without input checks
        return lambda x, c, stats: impl(x, c, "exact")[0]
    if name == "torch_cdist":
        return lambda x, c, stats: torch.cdist(x, c).argmin(1)
    if name == "torch_addmm":

        def run(x, c, stats):
            cn = c.square().sum(1)
            rows = max(1, cfg.addmm_elems // c.shape[0])
            parts = [torch.addmm(cn, x[r : r + rows], c.t(), alpha=-2).argmin(1) for r in range(0, x.shape[0], rows)]
            return torch.cat(parts)

        return run
    if name == "faiss_gpu":
        import faiss  # noqa: PLC0415 - optional baseline

        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("faiss is installed without GPU support")
        import faiss.contrib.torch_utils  # noqa: F401,PLC0415 - lets faiss take torch CUDA tensors

        res = faiss.StandardGpuResources()

        def run(x, c, stats):
            index = faiss.GpuIndexFlatL2(res, c.shape[1])
            index.add(c)
            return index.search(x, 1)[1][:, 0]

        return run
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def _time_ms(fn, device: torch.device, reps: int) -> list[float]:
    import time

    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(cfg: GpuBenchConfig, device: torch.device, progress: bool = True) -> list[dict]:
    """Runs every (D, K, method) case of ``cfg`` on ``device``; returns one row per case.

    ``agree`` compares indices with the exact answer: ``ops.reference`` where N K <= 2^22, else
    the first certified vqtok method of the case (triton_exact / cuda_exact)."""
    from tqdm.auto import tqdm

    from vqtok.ops import reference as ref

    gen = torch.Generator().manual_seed(cfg.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    rows = []
    bar = tqdm(total=len(cfg.dims) * len(cfg.codes) * len(cfg.methods), desc="gpu bench", unit="case",
               disable=not progress)
    for d in cfg.dims:
        x = torch.randn(cfg.n, d, generator=gen).to(device)
        for k in cfg.codes:
            c = torch.randn(k, d, generator=gen).to(device)
            truth = ref.nearest_code_l2(x, c)[0] if cfg.n * k <= (1 << 22) else None
            for method in cfg.methods:
                row = _measure_one(method, cfg, x, c, name)
                got = row.pop("_indices", None)
                if got is not None:
                    if truth is None and method in ("triton_exact", "cuda_exact"):
                        truth = got
                    if truth is not None:
                        row["agree"] = (got.to(torch.int64) == truth).double().mean().item()
                rows.append(row)
                bar.update()
            del c
        del x
    bar.close()
    return rows


def _measure_one(method: str, cfg: GpuBenchConfig, x: torch.Tensor, c: torch.Tensor, device_name: str) -> dict:
    n, d = x.shape
    k = c.shape[0]
    row = {"method": method, "n": n, "d": d, "k": k, "device": device_name}
    try:
        fn = _method(method, cfg)
        stats: dict = {}
        got = fn(x, c, stats)  # warm-up (compiles / autotunes)
        stats.clear()
        ms = statistics.median(_time_ms(lambda: fn(x, c, stats), x.device, cfg.reps))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {**row, "status": "OOM"}
    except (ImportError, RuntimeError) as e:
        return {**row, "status": f"skipped: {e}"}
    pairs = n * k
    row.update(status="ok", ms=ms, tflops=2 * pairs * d / (ms * 1e-3) / 1e12, pairs_per_s=pairs / (ms * 1e-3))
    row["frac_bound"] = row["pairs_per_s"] / roofline_pairs_per_s(method, n, k, d)
    for key in ("redo_fast", "redo_exact"):  # share of rows re-decided (fast: then exact, then reference)
        if key in stats:
            row[key] = stats[key] / (n * cfg.reps)
    row["_indices"] = got
    return row


def run(quick: bool = False, tiny: bool = False, progress: bool = True) -> list[dict]:
    """The suite entry point of `vqtok bench`: skips (SuiteSkipped) without a CUDA device."""
    from . import SuiteSkipped

    if not torch.cuda.is_available():
        raise SuiteSkipped("no CUDA device visible to torch")
    cfg = GpuBenchConfig.tiny() if tiny else GpuBenchConfig.quick() if quick else GpuBenchConfig()
    return measure(cfg, torch.device("cuda"), progress=progress)
