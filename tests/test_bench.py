"""`vqtok bench`: the CLI writes a table, JSON with machine info and a PNG; the registry tolerates
missing suites; derived fractions and the plot use real measurements."""

import dataclasses
import json
import shutil
import time

import pytest
import torch

import vqtok.bench as bench
from vqtok.bench.report import add_derived, format_table, plot_nearest
from vqtok.cli import main
from vqtok.ops import nearest_code
from vqtok.ops.dispatch import unavailable_reason


def test_cli_elementwise_tiny(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "p.png"
    argv = ["bench", "--tiny", "--suite", "elementwise", "--json", str(js), "--plot", str(png), "--out", str(tmp_path)]
    rc = main(argv)
    assert rc == 0
    out = capsys.readouterr().out
    assert "== elementwise" in out and "speedup_vs_peer" in out and "machine:" in out
    data = json.loads(js.read_text())
    m = data["machine"]
    assert m["memcpy_gbps"] > 0 and m["fma_peak_gflops"] > 0 and m["cores"] >= 1
    suite = data["suites"]["elementwise"]
    assert suite["status"] == "ok"
    rows = {(r["op"], r["backend"]): r for r in suite["rows"]}
    expect = {("fsq", "torch"), ("lfq", "torch")}
    if unavailable_reason("cpp") is None:
        expect |= {("fsq", "cpp"), ("lfq", "cpp")}
    assert expect <= set(rows)
    for key in expect:
        r = rows[key]
        assert r["ms"] > 0 and r["bytes"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["frac_memcpy"] == pytest.approx(r["gbps"] / m["memcpy_gbps"])
    if unavailable_reason("cpp") is None:  # the FSQ kernels also apart: their bytes add up to the pair's
        kern = {r["op"]: r for r in suite["rows"] if r.get("kind") == "kernel"}
        assert kern["fsq-forward"]["ms"] > 0 and kern["fsq-backward"]["ms"] > 0
        assert kern["fsq-forward"]["bytes"] + kern["fsq-backward"]["bytes"] == kern["fsq"]["bytes"]
    # the nearest suite did not run: no plot, and the reason is printed
    assert not png.exists() and "plot: skipped" in out
    assert (tmp_path / "bench.txt").read_text().startswith("== elementwise")


def test_registry_skips_missing_suite(monkeypatch):
    monkeypatch.setitem(bench.SUITES, "absent", ("vqtok.bench._no_such_suite", "a suite that is not installed"))
    res = bench.run_suite("absent", tiny=True)
    assert res["status"] == "skipped" and "_no_such_suite" in res["reason"] and res["rows"] == []
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run_suite("nope")


def test_cli_rejects_unknown_suite(capsys):
    assert main(["bench", "--suite", "elementwise,bogus", "--tiny"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_plot_nearest_from_measured_rows(tmp_path):
    """Time real nearest_code calls over a tiny grid and plot them (one panel per D)."""
    rows = []
    backends = [b for b in ("torch", "cpp") if unavailable_reason(b) is None]
    for d in (4, 16):
        for k in (64, 256):
            x, c = torch.randn(256, d), torch.randn(k, d)
            for b in backends:
                t0 = time.perf_counter()
                nearest_code(x, c, backend=b)
                rows.append({"D": d, "K": k, "backend": b, "ms": (time.perf_counter() - t0) * 1e3, "gflops": 1.0})
    path = plot_nearest(rows, tmp_path / "n.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    add_derived(rows, {"fma_peak_gflops": 4.0, "memcpy_gbps": 10.0})
    assert all(r["frac_peak"] == 0.25 for r in rows)
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["D", "K", "backend", "ms", "gflops", "frac_peak"]
    assert len(table.splitlines()) == 2 + len(rows)
    assert plot_nearest([{"op": "fsq", "ms": 1.0}], tmp_path / "none.png") is None


def test_nearest_backends_take_turns_call_by_call():
    from vqtok.bench.nearest import _time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    out = _time_interleaved(fns, reps=3)
    assert calls == ["a", "b", "c"] * 3
    assert {name: o for name, (t, o) in out.items()} == {"a": "a", "b": "b", "c": "c"}
    assert all(t >= 0 for t, _ in out.values())


@pytest.mark.skipif(unavailable_reason("cpp") is not None, reason="cpp backend not built")
def test_nearest_suite_rows_and_failed_baseline(monkeypatch):
    from vqtok.bench import nearest

    real = nearest.make_runner

    def runner(cfg, b, x, c):
        if b == "torch_addmm":
            raise RuntimeError("no such kernel here")
        return real(cfg, b, x, c)

    monkeypatch.setattr(nearest, "make_runner", runner)
    cfg = nearest.NearestBenchConfig(n=300, dims=(8, 33), codes=(70,), fused_codes=(), reps=2, memory=False,
                                     backends=("cpp", "torch_cdist", "torch_addmm"))
    rows = nearest.run(cfg=cfg, progress=False)
    assert [(r["D"], r["backend"]) for r in rows] == [(d, b) for d in (8, 33) for b in cfg.backends]
    for r in rows:
        if r["backend"] == "torch_addmm":
            assert "ms" not in r and r["note"].startswith("failed: RuntimeError")
        else:
            assert r["ms"] > 0 and r["agree"] == 1.0 and r["gflops"] >= 0  # tiny shapes round to 0.0


@pytest.mark.skipif(unavailable_reason("cpp") is not None, reason="cpp backend not built")
def test_nearest_suite_lowrank_data():
    """--data lowrank: rows and codes from one rank-4 subspace (plus 1% noise); every backend
    still returns the exact answer."""
    from vqtok.bench import nearest

    cfg = nearest.NearestBenchConfig(n=512, dims=(16,), codes=(4096,), fused_codes=(), reps=1, memory=False,
                                     backends=("cpp", "cpp_fast", "torch_addmm"), data="lowrank")
    x, c = nearest._data(cfg, 16, 4096)
    s = torch.linalg.svdvals(torch.cat([x, c]))
    assert float(s[nearest.LOWRANK] / s[0]) < 0.05 and float(s[nearest.LOWRANK - 1] / s[0]) > 0.2
    rows = nearest.run(cfg=cfg, progress=False)
    assert [r["agree"] for r in rows] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="data must be one of"):
        nearest._data(dataclasses.replace(cfg, data="uniform"), 16, 64)


def test_nearest_suite_peak_fraction_from_the_given_peak():
    from vqtok.bench import nearest

    cfg = nearest.NearestBenchConfig(n=256, dims=(8,), codes=(64,), fused_codes=(), reps=1, memory=False,
                                     backends=("cpp",))
    (row,) = nearest.run(cfg=cfg, progress=False, peak_gflops=0.01)
    assert row["peak_frac"] == round(row["gflops"] / 0.01, 3)
    (row,) = nearest.run(cfg=cfg, progress=False)
    assert "peak_frac" not in row  # under `vqtok bench` the framework adds frac_peak instead


@pytest.mark.skipif(unavailable_reason("cpp") is not None, reason="cpp backend not built")
def test_nearest_builds_ab_script(capsys, tmp_path):
    """benchmarks/bench_nearest_builds.py: the same build as base and current (A/A) gives the same
    answer in every alternating run; bad cases and missing files are refused."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_nearest_builds.py"
    spec = importlib.util.spec_from_file_location("bench_nearest_builds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    so = mod.current_build()
    js = tmp_path / "ab.json"
    assert mod.main(["--base", str(so), "--cases", "8x16x300,3x32x70", "--reps", "1", "--rounds", "2",
                     "--threads", "1", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["case"] for r in rows] == ["8x16x300", "3x32x70"]
    assert all(r["same_answer"] and r["base_ms"] > 0 and r["current_ms"] > 0 for r in rows)
    assert "same answer" in capsys.readouterr().out
    assert mod.main(["--base", str(so), "--cases", "64x16x8192", "--reps", "1", "--rounds", "1", "--threads", "1",
                     "--fast", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["rows"][0]["same_answer"] and "fast" in capsys.readouterr().out
    for codebook in ("pairs", "zeros"):  # duplicated codes: both builds still agree
        assert mod.main(["--base", str(so), "--cases", "100x8x64", "--reps", "1", "--rounds", "1", "--threads", "1",
                         "--codebook", codebook, "--json", str(js)]) == 0
        assert json.loads(js.read_text())["rows"][0]["same_answer"] and codebook in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--base", str(so), "--codebook", "ones"])
    with pytest.raises(ValueError, match="NxDxK"):
        mod.parse_cases("8x16")
    with pytest.raises(SystemExit):
        mod.main(["--base", str(tmp_path / "missing.so")])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the driver")
def test_nearest_profile_driver_builds_and_agrees_across_isas(tmp_path):
    """benchmarks/nearest_profile.sh: the symbol-carrying C++ driver (for perf) builds from
    kernels/cpu and gives the same indices at the scalar level as at the best one."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "nearest_profile.sh"
    env = dict(os.environ, OUT=str(tmp_path))
    out = subprocess.run([str(script), "300", "700", "24", "1"], env=env, capture_output=True, text=True, check=True)
    best = dict(zip(*[iter(out.stdout.split())] * 2))
    scalar = subprocess.run([str(tmp_path / "nearest_profile"), "300", "700", "24", "1"],
                            env=dict(env, VQTOK_ISA="scalar"), capture_output=True, text=True, check=True)
    low = dict(zip(*[iter(scalar.stdout.split())] * 2))
    assert low["isa"] == "scalar" and float(best["median_ms"]) > 0
    assert best["checksum"] == low["checksum"]
    bad = subprocess.run([str(tmp_path / "nearest_profile"), "0", "1", "1", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "positive" in bad.stderr
    # ceiling mode: the micro-tile's loop alone, next to register-only FMAs and the FMA peak
    ceil = subprocess.run([str(tmp_path / "nearest_profile"), "ceiling", "16", "1"], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    if ceil.returncode == 2 and "needs" in ceil.stderr:
        pytest.skip("ceiling mode needs AVX-512")
    assert ceil.returncode == 0, ceil.stderr
    c = dict(zip(*[iter(ceil.stdout.split())] * 2))
    assert c["isa"] == "avx512" and c["threads"] == "1" and c["d"] == "16"
    mix, only, peak = float(c["mix_gflops"]), float(c["fma_only_gflops"]), float(c["fma_peak_gflops"])
    assert mix > 0 and only > 0 and peak > 0
    for key, ratio in (("mix_of_peak", mix / peak), ("mix_of_fma_only", mix / only), ("fma_only_of_peak", only / peak)):
        assert float(c[key]) == pytest.approx(ratio, abs=2e-3), key
    bad = subprocess.run([str(tmp_path / "nearest_profile"), "ceiling", "0", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "positive" in bad.stderr


def test_ssim_benchmark_rows_agree_with_skimage(tmp_path, capsys):
    """benchmarks/bench_ssim.py: one row per case, timed beside scikit-image, whose SSIM it matches."""
    from scripts import load_script

    mod = load_script("benchmarks/bench_ssim.py")
    out = tmp_path / "ssim.json"
    assert mod.main(["--cases", "3x3x20x24,1x1x400x12", "--reps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["shape"] for r in rows] == [[3, 3, 20, 24], [1, 1, 400, 12]]
    for r in rows:
        assert r["median_ms"] > 0 and r["skimage_median_ms"] > 0 and r["vs_skimage"] > 0
        assert r["max_abs_diff_skimage"] < 1e-9 and -1 < r["mean_ssim"] < 1
    assert "skimage ms" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--cases", "1x3x8x8"])  # smaller than the 11 px window
