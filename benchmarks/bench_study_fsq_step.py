"""The quantizer study's FSQ step, side by side: vqtok's FSQ against vector-quantize-pytorch's.

At the study's shape (a [24, 16, 8, 8] latent: 1536 tokens of 16 channels; the study's levels for
2^10, 2^14 and 2^18 codes), three kinds of rows:

* ``module``: one training step of the quantizer alone, vqtok's ``FSQ(levels, dim=16)`` (its
  codebook-health update included) and the peer's ``FSQ(levels=..., dim=16)`` on the same latent,
  called as the study calls them (the peer through the study's channel-last adapter); forward,
  loss mean(out^2), backward. The step's share of a study training step is small (the
  autoencoder's own step took 7-22 ms on this machine), so the study's ``train s`` and ``cost`` columns
  cannot resolve it; this can.
* ``train``: the study's whole training step (``quantizer_study.train_step``: its autoencoder
  around each FSQ, MSE + the quantizer's loss, backward, AdamW) on a fixed batch of 24 32 px
  crops of noise, the two models from the same seed: the step the study's rows time, with
  whatever the quantizer costs the rest of the step (caches, allocations) as well.
* ``op``: ``vqtok.ops.fsq_quantize`` forward + backward on [1536, len(levels)], the direct eager
  call it makes against the registered ``torch.library`` op (``torch.ops.vqtok.fsq_forward``
  under autograd, the route every eager call took before the direct one, and the one
  torch.compile traces).

Method: one warm-up call of every case, then ``reps`` reps, the cases of one size alternating
within every rep (``vqtok.bench.revision.interleaved``), each rep ``inner`` calls; the table gives
microseconds per call (median over reps, fastest, slowest) and each row's median over its pair's
(``ratio``: vqtok / peer, direct / registered). torch threads: ``--threads`` (default 1, as in the
study's workers).

    .venv/bin/python benchmarks/bench_study_fsq_step.py
    .venv/bin/python benchmarks/bench_study_fsq_step.py --reps 41 --json fsq_step.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from vqtok.bench.report import format_table
from vqtok.bench.revision import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantizer_study as study  # noqa: E402  (the study's levels, adapter, model and step)


def _builders(levels: list[int], dim: int) -> dict:
    """Builders of the two FSQ modules as the study calls them (the peer through its channel-last
    adapter; omitted when vector-quantize-pytorch is missing)."""
    from vqtok.quantizers import FSQ

    builders = {"vqtok": lambda: FSQ(levels, dim=dim)}
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return builders
    builders["vector-quantize-pytorch"] = lambda: study.PeerAdapter(
        vqp.FSQ(levels=levels, dim=dim), math.prod(levels), False)
    return builders


def _module_steps(levels: list[int], z: torch.Tensor) -> dict:
    """Step functions of the two FSQ modules on ``z`` [B, D, h, w]."""

    def step_of(module):
        def step():
            x = z.clone().requires_grad_()
            module(x).quantized.square().mean().backward()
        return step

    return {name: step_of(build().train()) for name, build in _builders(levels, z.shape[1]).items()}


def _train_steps(levels: list[int], batch: int, seed: int) -> dict:
    """The study's training step with each FSQ (same autoencoder init, same batch)."""
    cfg = study.FULL
    x = torch.rand(batch, 3, cfg.crop, cfg.crop, generator=torch.Generator().manual_seed(seed))
    steps = {}
    for name, build in _builders(levels, cfg.latent_dim).items():
        torch.manual_seed(seed)
        model = study.study_model(build(), cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        steps[name] = lambda model=model, opt=opt: study.train_step(model, opt, x)
    return steps


def _op_steps(levels: list[int], tokens: int, seed: int) -> dict:
    """fsq_quantize forward + backward: the direct eager call and the registered op."""
    from vqtok.ops import fsq_quantize

    h = torch.randn(tokens, len(levels), generator=torch.Generator().manual_seed(seed))
    g = torch.randn(tokens, len(levels), generator=torch.Generator().manual_seed(seed + 1))

    def direct():
        x = h.clone().requires_grad_()
        torch.autograd.grad(fsq_quantize(x, levels)[0], x, g)

    def registered():
        x = h.clone().requires_grad_()
        torch.autograd.grad(torch.ops.vqtok.fsq_forward(x, levels, "auto")[0], x, g)

    x = h.clone().requires_grad_()
    a = torch.autograd.grad(fsq_quantize(x, levels)[0], x, g)[0]
    b = torch.autograd.grad(torch.ops.vqtok.fsq_forward(x, levels, "auto")[0], x, g)[0]
    if not torch.equal(a, b):
        raise RuntimeError("the direct call's gradient differs from the registered op's")
    return {"direct": direct, "registered": registered}


def measure(levels: list[int], kind: str, batch: int = 24, dim: int = 16, grid: int = 8, reps: int = 21,
            inner: int = 20, seed: int = 0) -> list[dict]:
    """Rows of one size and kind ("module", "train" or "op"): microseconds per call of each case."""
    torch.manual_seed(seed)
    if kind == "module":
        z = torch.randn(batch, dim, grid, grid, generator=torch.Generator().manual_seed(seed))
        steps = _module_steps(levels, z)
    elif kind == "train":
        steps = _train_steps(levels, batch, seed)
    else:
        steps = _op_steps(levels, batch * grid * grid, seed)

    def repeat(fn):
        def run():
            for _ in range(inner):
                fn()
        return run

    for fn in steps.values():  # warm-up: first-call caches, lazy imports
        fn()
    times = interleaved({n: repeat(fn) for n, fn in steps.items()}, reps)
    base = "registered" if kind == "op" else "vector-quantize-pytorch"
    rows = []
    for name, ts in times.items():
        us = [t * 1e6 / inner for t in ts]
        rows.append({"kind": kind, "levels": levels, "codes": math.prod(levels), "tokens": batch * grid * grid,
                     "impl": name, "median_us": statistics.median(us), "min_us": min(us), "max_us": max(us),
                     "reps": reps, "inner": inner})
    med = {r["impl"]: r["median_us"] for r in rows}
    for r in rows:
        if base in med and r["impl"] != base:
            r["ratio"] = r["median_us"] / med[base]
    return rows


def table(rows: list[dict]) -> str:
    return format_table([{"kind": r["kind"], "levels": ",".join(map(str, r["levels"])), "codes": r["codes"],
                          "impl": r["impl"], "median us": round(r["median_us"], 1), "min us": round(r["min_us"], 1),
                          "max us": round(r["max_us"], 1), "ratio": round(r["ratio"], 3) if "ratio" in r else ""}
                         for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,14,18", help="log2 codebook sizes: the study's FSQ levels for each")
    ap.add_argument("--kinds", default="module,train,op", help="comma-separated: module, train, op")
    ap.add_argument("--reps", type=int, default=21, help="reps per case (median reported)")
    ap.add_argument("--inner", type=int, default=20, help="calls per rep")
    ap.add_argument("--batch", type=int, default=24, help="latents per step (the study's crops per step)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the study's workers: 1)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    try:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        ap.error("--sizes expects comma-separated integers")
    kinds = [k for k in args.kinds.split(",") if k.strip()]
    if not sizes or any(b not in study.FSQ_LEVELS for b in sizes):
        ap.error(f"--sizes must be among {sorted(study.FSQ_LEVELS)}")
    if not kinds or any(k not in ("module", "train", "op") for k in kinds):
        ap.error("--kinds must be among module, train, op")
    if args.reps < 1 or args.inner < 1 or args.batch < 1 or args.threads < 1:
        ap.error("--reps, --inner, --batch and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = [r for b in sizes for k in kinds
            for r in measure(study.FSQ_LEVELS[b], k, batch=args.batch, reps=args.reps, inner=args.inner)]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "threads": torch.get_num_threads()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
