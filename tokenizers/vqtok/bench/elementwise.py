"""`vqtok bench` suite: FSQ and LFQ forward + backward, our backends vs vector-quantize-pytorch.

Each row is one (op, backend) at N tokens: median wall time of ``reps`` runs after a warm-up.
``op`` rows run the public op with autograd (``fsq_quantize`` / ``lfq_quantize``: argument checks,
the finite check, the custom op, fresh outputs, the straight-through backward), taking the
gradient with ``torch.autograd.grad`` as the layer below the quantiser in a network receives it
(``.backward()`` on a leaf input would add autograd's copy of a caller-held gradient into
``.grad``, which is not the op's work); ``kernel`` rows call the C++ kernels directly on
preallocated buffers. Bytes, the minimum traffic of fwd + bwd (fp32):

* FSQ, d = len(levels): forward reads z and writes codes + int32 indices, backward reads grad and
  z and writes grad_z: ``4 N (5 d + 1)``.
* LFQ, B bits: forward reads z and writes codes + indices; the backward is the identity (no
  traffic): ``4 N (2 B + 1)``.

The FSQ kernels are also timed apart (``fsq-forward``: ``4 N (2 d + 1)``; ``fsq-backward``:
``12 N d``), to show which half holds the time.

Peers (entropy off): vector-quantize-pytorch's ``FSQ`` module in training mode (fwd + bwd), and
its ``LFQ``. Its LFQ builds the N x 2^B entropy softmax whenever it is in training mode, whatever
``entropy_loss_weight`` is, so the peer LFQ row is its eval-mode forward (rounding + indices
only), which is a lower bound of its training step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from vqtok.ops import fsq_quantize, lfq_quantize
from vqtok.ops.dispatch import unavailable_reason


@dataclass(frozen=True)
class ElementwiseBenchConfig:
    n: int = 1 << 20  # tokens N
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels (d = 4, 1000 codes)
    lfq_bits: int = 18  # LFQ bits B
    reps: int = 5  # timed repetitions (median), after one warm-up
    backends: tuple[str, ...] = ("torch", "cpp")
    peer: bool = True  # also time vector-quantize-pytorch


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _fsq_forward_bytes(n: int, d: int) -> int:
    return 4 * n * (2 * d + 1)  # reads z, writes codes and int32 indices


def _fsq_backward_bytes(n: int, d: int) -> int:
    return 12 * n * d  # reads the code gradient and z, writes z's gradient


def _fsq_bytes(n: int, d: int) -> int:
    return _fsq_forward_bytes(n, d) + _fsq_backward_bytes(n, d)


def _lfq_bytes(n: int, bits: int) -> int:
    return 4 * n * (2 * bits + 1)


def _op_rows(cfg: ElementwiseBenchConfig) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    levels = list(cfg.fsq_levels)
    zf = torch.randn(cfg.n, len(levels), generator=g) * 2
    gf = torch.randn(cfg.n, len(levels), generator=g)
    zl = torch.randn(cfg.n, cfg.lfq_bits, generator=g)
    gl = torch.randn(cfg.n, cfg.lfq_bits, generator=g)
    rows = []
    for backend in cfg.backends:
        why = unavailable_reason(backend)
        if why is not None:
            rows.append({"op": "fsq", "backend": backend, "kind": "op", "note": f"unavailable: {why}"})
            continue

        def fsq_step(backend=backend):
            z = zf.detach().requires_grad_()
            codes, _ = fsq_quantize(z, levels, backend=backend)
            torch.autograd.grad(codes, z, gf)

        def lfq_step(backend=backend):
            z = zl.detach().requires_grad_()
            codes, _ = lfq_quantize(z, backend=backend)
            torch.autograd.grad(codes, z, gl)

        rows.append({"op": "fsq", "backend": backend, "kind": "op", "ms": _median_ms(fsq_step, cfg.reps),
                     "bytes": _fsq_bytes(cfg.n, len(levels))})
        rows.append({"op": "lfq", "backend": backend, "kind": "op", "ms": _median_ms(lfq_step, cfg.reps),
                     "bytes": _lfq_bytes(cfg.n, cfg.lfq_bits)})
    if unavailable_reason("cpp") is None:
        rows += _kernel_rows(cfg, zf, gf, zl)
    return rows


def _kernel_rows(cfg, zf, gf, zl) -> list[dict]:
    """The C++ kernels alone, on preallocated outputs (what the memory-bandwidth target is about)."""
    from vqtok import _C  # noqa: PLC0415

    levels = list(cfg.fsq_levels)
    n, d = zf.shape
    codes, grad_z = torch.empty_like(zf), torch.empty_like(zf)
    idx = torch.empty(n, dtype=torch.int32)

    def fsq_forward():
        _C.fsq_forward(zf.data_ptr(), n, levels, 0, codes.data_ptr(), idx.data_ptr(), False)

    def fsq_backward():
        _C.fsq_backward(gf.data_ptr(), zf.data_ptr(), n, levels, 0, grad_z.data_ptr())

    def fsq():
        fsq_forward()
        fsq_backward()

    lcodes = torch.empty_like(zl)
    lidx = torch.empty(n, dtype=torch.int32 if cfg.lfq_bits <= 30 else torch.int64)

    def lfq():
        _C.lfq_forward(zl.data_ptr(), n, cfg.lfq_bits, 0, lcodes.data_ptr(), lidx.data_ptr(), cfg.lfq_bits > 30)

    isa = _C.active_isa()
    return [
        {"op": "fsq", "backend": f"cpp-{isa}", "kind": "kernel", "ms": _median_ms(fsq, cfg.reps),
         "bytes": _fsq_bytes(n, d)},
        {"op": "fsq-forward", "backend": f"cpp-{isa}", "kind": "kernel", "ms": _median_ms(fsq_forward, cfg.reps),
         "bytes": _fsq_forward_bytes(n, d)},
        {"op": "fsq-backward", "backend": f"cpp-{isa}", "kind": "kernel", "ms": _median_ms(fsq_backward, cfg.reps),
         "bytes": _fsq_backward_bytes(n, d)},
        {"op": "lfq", "backend": f"cpp-{isa}", "kind": "kernel", "ms": _median_ms(lfq, cfg.reps),
         "bytes": _lfq_bytes(n, cfg.lfq_bits)},
    ]


def _peer_rows(cfg: ElementwiseBenchConfig) -> list[dict]:
    try:
        from vector_quantize_pytorch import FSQ, LFQ  # noqa: PLC0415
    except ImportError as e:
        note = f"not installed ({e})"
        return [{"op": op, "backend": "vector-quantize-pytorch", "note": note} for op in ("fsq", "lfq")]
    g = torch.Generator().manual_seed(0)
    levels = list(cfg.fsq_levels)
    zf = torch.randn(1, cfg.n, len(levels), generator=g) * 2
    gf = torch.randn(1, cfg.n, len(levels), generator=g)
    fsq = FSQ(levels=levels).train()

    def fsq_step():
        z = zf.detach().requires_grad_()
        out, _ = fsq(z)
        torch.autograd.grad(out, z, gf)

    zl = torch.randn(1, cfg.n, cfg.lfq_bits, generator=g)
    lfq = LFQ(dim=cfg.lfq_bits, codebook_size=2**cfg.lfq_bits, entropy_loss_weight=0.0).eval()

    def lfq_step():
        with torch.no_grad():
            lfq(zl)

    return [
        {"op": "fsq", "backend": "vector-quantize-pytorch", "kind": "op", "ms": _median_ms(fsq_step, cfg.reps),
         "bytes": _fsq_bytes(cfg.n, len(levels)), "note": "FSQ module, train fwd+bwd"},
        {"op": "lfq", "backend": "vector-quantize-pytorch", "kind": "op", "ms": _median_ms(lfq_step, cfg.reps),
         "bytes": _lfq_bytes(cfg.n, cfg.lfq_bits), "note": "LFQ eval fwd only (train mode builds the entropy)"},
    ]


def run(quick: bool = False, tiny: bool = False, cfg: ElementwiseBenchConfig | None = None) -> list[dict]:
    """Rows for `vqtok bench --suite elementwise`; ``tiny`` is a seconds-long smoke size."""
    if cfg is None:
        cfg = ElementwiseBenchConfig()
        if tiny:
            cfg = ElementwiseBenchConfig(n=1 << 12, reps=2)
        elif quick:
            cfg = ElementwiseBenchConfig(reps=3)
    rows = _op_rows(cfg)
    if cfg.peer:
        rows += _peer_rows(cfg)
    peer = {r["op"]: r["ms"] for r in rows if r.get("backend") == "vector-quantize-pytorch" and "ms" in r}
    fsq_shape = f"N={cfg.n} levels={','.join(map(str, cfg.fsq_levels))}"
    shape = {"fsq": fsq_shape, "fsq-forward": fsq_shape, "fsq-backward": fsq_shape,
             "lfq": f"N={cfg.n} B={cfg.lfq_bits}"}
    for r in rows:
        r["shape"] = shape[r["op"]]
        if "ms" in r and r["op"] in peer:
            r["speedup_vs_peer"] = peer[r["op"]] / r["ms"]
    return rows


def config_dict(cfg: ElementwiseBenchConfig | None = None) -> dict:
    return asdict(cfg or ElementwiseBenchConfig())
