"""What the machine can do, measured: FMA peak, memcpy bandwidth, cores and SIMD level.

Benchmark rows are judged against these two ceilings: compute-bound rows carry ``gflops`` and get
a fraction of the FMA peak, memory-bound rows carry ``bytes`` (read + written) and get a fraction
of the memcpy bandwidth (also counted as bytes read + written).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memcpy_gbps(mib: int = 256, reps: int = 5) -> float:
    """Median bandwidth of a ``mib`` MiB fp32 tensor copy on all torch threads, in GB/s (1e9 B/s),
    counting the bytes read plus the bytes written."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def sgemm_gflops(n: int = 1024, reps: int = 3) -> float:
    """Median fp32 matmul throughput (torch/BLAS), the fallback peak without the extension."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def fma_peak(seconds: float = 0.2) -> tuple[float, str]:
    """(GFLOP/s, how it was measured): the C++ FMA loop when the extension is built, else sgemm."""
    try:
        from vqtok import _C  # noqa: PLC0415

        if hasattr(_C, "fma_peak_gflops"):
            gf = float(_C.fma_peak_gflops(seconds))
            if gf > 0:
                return gf, f"C++ {_C.active_isa()} FMA chains on all threads"
    except ImportError:
        pass
    return sgemm_gflops(), "torch sgemm 1024^3 (extension not built)"


def machine_info(quick: bool = False, tiny: bool = False) -> dict:
    """Measured ceilings plus a description of the machine (JSON-serialisable). ``tiny`` (tests
    only) measures on a 32 MiB copy and a 20 ms FMA loop: fast, not a faithful ceiling."""
    from vqtok.ops import _native  # noqa: PLC0415

    peak, how = fma_peak(0.02 if tiny else 0.1 if quick else 0.3)
    mib = 32 if tiny else 256
    build = _native.build_info()
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": None,
        "fma_peak_gflops": peak,
        "fma_peak_method": how,
        "memcpy_gbps": memcpy_gbps(mib, 3 if quick or tiny else 5),
        "memcpy_method": f"torch copy_ of {mib} MiB fp32, median, bytes read + written",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": build,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if build.get("built"):
        from vqtok import _C  # noqa: PLC0415

        info["isa"] = _C.active_isa()
    return info
