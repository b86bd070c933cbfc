"""`vqtok bench`: a registry of benchmark suites, each an experiment that ends in a table.

A suite is a module with ``run(quick: bool = False, ...) -> list[dict]`` returning flat rows (it
may also accept ``tiny: bool`` for a seconds-long smoke size). Rows may carry ``ms`` (median
time), ``gflops`` (compute rate) and ``bytes`` (memory traffic, read + written); the framework
adds the fraction of the machine's measured FMA peak and memcpy bandwidth (see
:mod:`vqtok.bench.machine`). The registry is tolerant: a suite whose module is missing, whose
optional baseline is not installed (ImportError), or that raises :class:`SuiteSkipped` is skipped
with a printed reason; a suite that fails is reported as an error and the others still run.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .report import add_derived, format_table, plot_nearest, write_json

# name -> (module, what it measures)
SUITES: dict[str, tuple[str, str]] = {
    "elementwise": ("vqtok.bench.elementwise", "FSQ / LFQ fwd+bwd: torch, cpp vs vector-quantize-pytorch"),
    "nearest": ("vqtok.bench.nearest", "nearest-code search time vs K and D per backend"),
    "entropy": ("vqtok.bench.entropy", "exact LFQ entropy vs vector-quantize-pytorch's dense one"),
    "modules": ("vqtok.bench.modules", "quantizer module training steps"),
    "gpu": ("vqtok.bench.gpu", "CUDA / Triton kernels (needs a CUDA device)"),
}


class SuiteSkipped(Exception):
    """Raised by a suite that cannot run here (the message says why)."""


def _call_run(run: Callable, quick: bool, tiny: bool) -> list[dict]:
    params = inspect.signature(run).parameters
    kwargs = {}
    if "quick" in params:
        kwargs["quick"] = quick or tiny
    if "tiny" in params:
        kwargs["tiny"] = tiny
    if "progress" in params:
        kwargs["progress"] = False
    return list(run(**kwargs))


def run_suite(name: str, quick: bool = False, tiny: bool = False) -> dict:
    """{"status": ok | skipped | error, "reason", "seconds", "rows"} for one registered suite."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    module, _ = SUITES[name]
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        return {"status": "skipped", "reason": f"module {module} not available ({e})", "rows": []}
    try:
        rows = _call_run(mod.run, quick, tiny)
    except SuiteSkipped as e:
        return {"status": "skipped", "reason": str(e), "rows": []}
    except ImportError as e:  # an optional baseline (faiss, vector-quantize-pytorch, ...) is missing
        return {"status": "skipped", "reason": f"optional dependency missing: {e}", "rows": []}
    except Exception as e:  # one broken suite must not hide the others' results
        tb = traceback.format_exc(limit=3)
        return {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": tb, "rows": []}
    for r in rows:
        r.setdefault("suite", name)
    return {"status": "ok", "reason": None, "seconds": time.perf_counter() - t0, "rows": rows}


def _parse_suites(suites) -> list[str]:
    if suites is None:
        return list(SUITES)
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites) if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    return names


def run_bench(
    suites=None,
    *,
    quick: bool = False,
    tiny: bool = False,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Runs the suites, prints a table per suite, writes JSON (machine info included) and, when the
    nearest suite produced rows, a PNG of time vs K. ``out_dir`` sets default paths
    (bench.json, bench.txt, nearest.png) for whatever is not given explicitly."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .machine import machine_info  # noqa: PLC0415

    names = _parse_suites(suites)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = json_path or out_dir / "bench.json"
        plot_path = plot_path or out_dir / "nearest.png"
    machine = machine_info(quick=quick, tiny=tiny)
    echo(
        f"machine: {machine['cpu']} | {machine['cores']} cores, {machine['torch_threads']} torch threads | "
        f"isa {machine['isa']} | FMA peak {machine['fma_peak_gflops']:.1f} GFLOP/s | "
        f"memcpy {machine['memcpy_gbps']:.1f} GB/s"
    )
    load = machine.get("load_average")
    if load and machine.get("cores") and load[0] > machine["cores"]:
        echo(f"warning: load average {load[0]:.1f} on {machine['cores']} cores: other processes share the CPU, so "
             "times (and the measured peak and bandwidth) are inflated and noisy")
    results: dict = {"machine": machine, "quick": quick, "tiny": tiny, "suites": {}}
    text = []
    for name in tqdm(names, desc="bench suites", unit="suite", file=sys.stderr, disable=len(names) < 2):
        res = run_suite(name, quick=quick, tiny=tiny)
        add_derived(res["rows"], machine)
        results["suites"][name] = res
        header = f"== {name}: {SUITES[name][1]}"
        if res["status"] == "ok":
            block = f"{header} ({res['seconds']:.1f} s)\n{format_table(res['rows'])}"
        else:
            block = f"{header}\n   {res['status']}: {res['reason']}"
        echo(block)
        text.append(block)
    nearest = results["suites"].get("nearest", {})
    if plot_path is not None and nearest.get("rows"):
        written = plot_nearest(nearest["rows"], plot_path)
        results["plot"] = str(written) if written else None
        if written:
            echo(f"plot: {written}")
    elif plot_path is not None:
        echo("plot: skipped (the nearest suite did not run or produced no rows)")
    if json_path is not None:
        echo(f"json: {write_json(json_path, results)}")
    if out_dir is not None:
        (out_dir / "bench.txt").write_text("\n\n".join(text) + "\n")
    return results
