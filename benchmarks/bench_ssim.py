"""SSIM (``vqtok.metrics.ssim``): time per batch against scikit-image, and against a git revision.

The metric behind ``vqtok eval`` and the quantizer study's SSIM column: per-sample SSIM in float64
with scikit-image's Gaussian settings (11x11, sigma 1.5, population covariance). scikit-image's
``structural_similarity`` (one call per sample, ``channel_axis=0``) runs beside it as the peer,
and the largest difference between the two is reported with every row.

Cases (``--cases``, comma-separated ``NxCxHxW``): the study's held-out set (895 tiles of 64 px),
a batch of 256 px frames and two 1024 px photos. Inputs: a real photo tiled to the shape, and a
noisy, shifted copy of it. One warm-up, then ``reps`` timings; the table gives the median and the
ratio of the medians. torch threads: ``--threads`` (default torch's). ``--against REV`` also
times ``vqtok.metrics.reconstruction.ssim`` as of git revision REV, alternating with the current
one rep by rep.

    .venv/bin/python benchmarks/bench_ssim.py --threads 1
    .venv/bin/python benchmarks/bench_ssim.py --threads 1 --reps 7 --against HEAD~1 --json ssim.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from vqtok.bench.report import format_table, print_rows
from vqtok.bench.revision import add_against_option, against_cells, interleaved
from vqtok.bench.revision import against as load_against
from vqtok.metrics import ssim

DEFAULT_CASES = "895x3x64x64,16x3x256x256,2x3x1024x1024"


def photo_batch(n: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: scikit-image's astronaut (tiled to H x W) at n offsets, in [-1, 1]; y: x shifted by one
    pixel, blended and with Gaussian noise. float32 [n, c, h, w] each."""
    from skimage import data as skdata

    img = torch.from_numpy(skdata.astronaut()[..., :c].astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    reps = (1, -(-(h + n) // img.shape[1]) + 1, -(-(w + n) // img.shape[2]) + 1)
    big = img.repeat(*reps)
    x = torch.stack([big[:, i : i + h, (7 * i) % n : (7 * i) % n + w] for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    y = (0.8 * x + 0.2 * x.roll(1, -1) + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from skimage.metrics import structural_similarity

    a, b = x.double().numpy(), y.double().numpy()
    return torch.tensor([structural_similarity(a[i], b[i], data_range=2.0, channel_axis=0, gaussian_weights=True,
                                               sigma=1.5, use_sample_covariance=False) for i in range(len(a))])


def measure(shape: tuple[int, int, int, int], reps: int = 5, skimage: bool = True,
            against: tuple[str, object] | None = None) -> dict:
    """Median / min / max milliseconds of ``ssim`` on a [N, C, H, W] pair, beside scikit-image
    (``skimage``) and the revision ``against`` = (rev, its vqtok.metrics.reconstruction module)."""
    x, y = photo_batch(*shape)
    fns = {"vqtok": lambda: ssim(x, y)}
    if against is not None:
        fns["against"] = lambda: against[1].ssim(x, y)
    ours = fns["vqtok"]()  # warm-up
    for name, fn in fns.items():
        if name != "vqtok":
            fn()
    times = {n: [t * 1e3 for t in ts] for n, ts in interleaved(fns, reps).items()}
    med = statistics.median(times["vqtok"])
    row = {"shape": list(shape), "median_ms": med, "min_ms": min(times["vqtok"]), "max_ms": max(times["vqtok"]),
           "reps": reps, "mean_ssim": float(ours.mean())}
    if skimage:
        sk_times = []
        for _ in range(max(1, min(reps, 3))):  # the peer is slow at these sizes: fewer reps
            t = time.perf_counter()
            ref = skimage_ssim(x, y)
            sk_times.append((time.perf_counter() - t) * 1e3)
        sk = statistics.median(sk_times)
        row.update(skimage_median_ms=sk, skimage_reps=len(sk_times), vs_skimage=med / sk,
                   max_abs_diff_skimage=float((ours - ref).abs().max()))
    if against is not None:
        old = statistics.median(times["against"])
        row.update(against=against[0], against_median_ms=old, ratio=med / old)
    return row


def table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        cell = {"N x C x H x W": "x".join(map(str, r["shape"])), "median ms": round(r["median_ms"], 1),
                "min ms": round(r["min_ms"], 1), "max ms": round(r["max_ms"], 1)}
        if "skimage_median_ms" in r:
            cell.update({"skimage ms": round(r["skimage_median_ms"], 1), "/ skimage": round(r["vs_skimage"], 3),
                         "max |diff|": f"{r['max_abs_diff_skimage']:.1e}"})
        cells.append({**cell, **against_cells(r, "ms", 1)})
    return format_table(cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated NxCxHxW batches")
    ap.add_argument("--reps", type=int, default=5, help="timings per case (median reported)")
    ap.add_argument("--no-skimage", action="store_true", help="leave scikit-image's SSIM out")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_against_option(ap, "vqtok.metrics.reconstruction.ssim")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--cases expects NxCxHxW items, got {args.cases!r}")
    if not shapes or any(len(s) != 4 or min(s) < 1 or min(s[2:]) < 11 for s in shapes) or args.reps < 1:
        ap.error("--cases: NxCxHxW with N, C >= 1 and H, W >= 11 (the window); --reps >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    against = load_against(args.against, "vqtok.metrics.reconstruction", ap.error)
    rows = [measure(s, args.reps, not args.no_skimage, against) for s in shapes]
    print_rows(table(rows), rows, args.json, torch.get_num_threads())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
