"""vqtok ops: one functional entry point per op, an explicit backend, imports that never fail.

Each op is a ``torch.library`` custom op with a fake (meta) implementation so ``torch.compile``
traces through it; the backend string travels as an argument and is resolved by
:mod:`vqtok.ops.dispatch`.
"""

from __future__ import annotations

import torch

from . import _checks
from . import reference as _ref
from .dispatch import Backend, BackendUnavailable, available_backends, resolve
from .fsq_entropy import fsq_entropy
from .lfq_entropy import lfq_entropy

__all__ = [
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "nearest_code",
    "fsq_quantize",
    "fsq_indices_to_codes",
    "lfq_quantize",
    "lfq_indices_to_codes",
    "lfq_entropy",
    "fsq_entropy",
]


def _backend_name(backend) -> str:
    return backend.value if isinstance(backend, Backend) else str(backend)


def _check_finite_unless_fused(op: str, name: str, backend: str, t: torch.Tensor) -> None:
    """NaN/Inf check of an op input, skipped where the backend's kernel counts them itself in its
    one pass over the input (implementations marked ``checks_finite``) and raises the same error."""
    if _checks._compiling() or getattr(resolve(op, backend, t.device), "checks_finite", False):
        return
    _checks.check_finite(name, t)


def _eager(*tensors: torch.Tensor) -> bool:
    """Whether an op may skip its ``torch.library`` custom op and call the backend's functions
    directly (``_Direct``): plain tensors (no fake or other tensor subclass) outside
    torch.compile, where the custom op's dispatch would only add its Python cost, in the forward
    and again in the backward (``benchmarks/bench_study_fsq_step.py --kinds op``)."""
    return not _checks._compiling() and all(type(t) is torch.Tensor for t in tensors)


class _Direct(torch.autograd.Function):
    """An elementwise quantiser's custom op in eager mode: ``forward(z, *args)`` -> (codes,
    indices), and ``backward(grad_codes, z, *args)`` -> grad z (None: straight-through, the
    identity). The same functions, values and gradients as the registered op's, one dispatch."""

    @staticmethod
    def forward(ctx, z, forward, backward, args):
        codes, idx = forward(z, *args)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        if backward is not None:
            ctx.save_for_backward(z)
        ctx.backward_fn, ctx.args = backward, args
        return codes, idx

    @staticmethod
    def backward(ctx, grad_codes, grad_idx):
        if grad_codes is None:
            return None, None, None, None
        if ctx.backward_fn is None:
            return grad_codes, None, None, None
        (z,) = ctx.saved_tensors
        return ctx.backward_fn(grad_codes.contiguous(), z, *ctx.args).to(z.dtype), None, None, None


def _quantize(flat: torch.Tensor, backend: str, op: str, backward_op: str | None, args: tuple, registered):
    """(codes, indices) of an elementwise quantiser on ``flat``: ``registered(flat, *args, backend)``
    (the custom op) under torch.compile or for tensor subclasses, else the backend's ``op`` called
    directly, under ``_Direct`` when a gradient is wanted (``backward_op`` None: straight-through)."""
    if not _eager(flat):
        return registered(flat, *args, backend)
    forward = resolve(op, backend, flat.device)
    if not (flat.requires_grad and torch.is_grad_enabled()):
        return forward(flat, *args)
    backward = resolve(backward_op, backend, flat.device) if backward_op else None
    return _Direct.apply(flat, forward, backward, args)


# --------------------------------------------------------------------------------------------
# nearest_code
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vqtok::nearest_code_l2", mutates_args=())
def _nearest_code_l2(
    x: torch.Tensor, codebook: torch.Tensor, backend: str, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("nearest_code_l2", backend, x.device)(x, codebook, precision)


@_nearest_code_l2.register_fake
def _(x, codebook, backend, precision):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n, dtype=torch.float32)


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    metric: str = "l2",
    backend: str | Backend = "auto",
    precision: str = "exact",
):
    """Nearest code of every row of ``x``.

    Args:
        x: [N, D] float16/bfloat16/float32/float64.
        codebook: [K, D], any float dtype, 1 <= K < 2^31.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"``. For cosine both sides are normalised
            once in fp32 (zero rows stay zero) and ranked by squared L2 between the normalised
            rows; the returned distance is ``1 - cos`` (a zero vector has cos 0, distance 1).
        backend: ``auto`` | ``torch`` | ``cpp`` | ``cuda`` | ``triton``.
        precision: ``"exact"`` (fp32 ranking with certified re-checks) or ``"fast"`` (low-precision
            dot products keep a few candidates per row, re-ranked exactly in fp32, with an exact
            fallback for rows inside the rounding-error bound). Both return the same answer;
            ``fast`` is only a speed knob and backends without a fast path run ``exact``. On
            ``cpp`` the fast path scores in bf16 with AMX-BF16 tiles or AVX512-BF16 dot products
            (CPUs with either, searches with K * D^2 >= 2^19) and decides every code inside the
            bf16 error bound in float64.

    Returns:
        (indices int64 [N], distances float32 [N]); ties go to the lowest index. No N x K matrix
        is materialised by any backend but ``torch``, which chunks it.
    """
    _checks.check_search_inputs(x, codebook, metric)
    if precision not in ("exact", "fast"):
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    name = _backend_name(backend)
    x, codebook = x.detach(), codebook.detach()
    if metric == "cosine":
        xs, cs = _ref.normalize_rows(x), _ref.normalize_rows(codebook)
    elif x.dtype != codebook.dtype or x.dtype == torch.float64:
        xs, cs = x.to(torch.float32), codebook.to(torch.float32)
        if name == "torch":  # the reference searches float64 inputs at full precision
            xs, cs = x.to(torch.float64), codebook.to(torch.float64)
    else:
        xs, cs = x, codebook
    if xs.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device))
    idx, dist = _nearest_code_l2(xs, cs, name, precision)
    if metric == "cosine":
        dist = _ref.cosine_distance_of(xs, cs, idx)
    return idx, dist


# --------------------------------------------------------------------------------------------
# FSQ
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vqtok::fsq_forward", mutates_args=())
def _fsq_forward(z: torch.Tensor, levels: list[int], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("fsq_forward", backend, z.device)(z, levels)


@_fsq_forward.register_fake
def _(z, levels, backend):
    return z.new_empty(z.shape, dtype=torch.float32), z.new_empty(z.shape[0], dtype=_ref.fsq_index_dtype(levels))


@torch.library.custom_op("vqtok::fsq_backward", mutates_args=())
def _fsq_backward(grad_codes: torch.Tensor, z: torch.Tensor, levels: list[int], backend: str) -> torch.Tensor:
    return resolve("fsq_backward", backend, z.device)(grad_codes, z, levels)


@_fsq_backward.register_fake
def _(grad_codes, z, levels, backend):
    return z.new_empty(z.shape, dtype=torch.float32)


def _no_zero_grads(ctx) -> None:
    """Undefined output gradients reach the backward as None instead of materialised zeros (the
    integer indices never have one: autograd would otherwise fill an [M] zero tensor per call)."""
    ctx.set_materialize_grads(False)


def _fsq_setup(ctx, inputs, output):
    z, levels, backend = inputs
    ctx.save_for_backward(z)
    ctx.levels, ctx.backend = levels, backend
    _no_zero_grads(ctx)


def _fsq_grad(ctx, grad_codes, grad_idx):
    (z,) = ctx.saved_tensors
    if grad_codes is None:
        return None, None, None
    g = _fsq_backward(grad_codes.contiguous(), z, ctx.levels, ctx.backend)
    return g.to(z.dtype), None, None


torch.library.register_autograd("vqtok::fsq_forward", _fsq_grad, setup_context=_fsq_setup)


def fsq_quantize(z: torch.Tensor, levels, *, backend: str | Backend = "auto"):
    """Finite scalar quantisation of ``z`` [..., len(levels)].

    Returns (codes in [-1, 1] with z's dtype and shape, indices [...] int32, or int64 when
    prod(levels) >= 2^31). The rounding has a straight-through gradient; the tanh bound is
    differentiated normally. Computed in fp32 whatever z's dtype, so bf16 inputs get exact indices.
    """
    levels = _checks.check_levels(levels)
    _checks.check_float_tensor("z", z, min_ndim=1)
    _checks.check_last_dim("z", z, len(levels), "one entry per FSQ level")
    name = _backend_name(backend)
    _check_finite_unless_fused("fsq_forward", "z", name, z)
    lead = z.shape[:-1]
    flat = z.reshape(-1, len(levels)).contiguous()
    codes, idx = _quantize(flat, name, "fsq_forward", "fsq_backward", (levels,), _fsq_forward)
    return codes.to(z.dtype).reshape(z.shape), idx.reshape(lead)


@torch.library.custom_op("vqtok::fsq_indices_to_codes", mutates_args=())
def _fsq_indices_to_codes(indices: torch.Tensor, levels: list[int], backend: str) -> torch.Tensor:
    return resolve("fsq_indices_to_codes", backend, indices.device)(indices, levels)


@_fsq_indices_to_codes.register_fake
def _(indices, levels, backend):
    return indices.new_empty((indices.shape[0], len(levels)), dtype=torch.float32)


def fsq_indices_to_codes(indices: torch.Tensor, levels, *, backend: str | Backend = "auto") -> torch.Tensor:
    """indices [...] (any integer dtype) -> float32 codes [..., len(levels)]; exact inverse."""
    levels = _checks.check_levels(levels)
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
        raise TypeError("indices must be an integer torch.Tensor")
    flat = indices.reshape(-1).contiguous()
    codes = _fsq_indices_to_codes(flat, levels, _backend_name(backend))
    return codes.reshape(*indices.shape, len(levels))


# --------------------------------------------------------------------------------------------
# LFQ
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("vqtok::lfq_forward", mutates_args=())
def _lfq_forward(z: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("lfq_forward", backend, z.device)(z)


@_lfq_forward.register_fake
def _(z, backend):
    return z.new_empty(z.shape, dtype=torch.float32), z.new_empty(z.shape[0], dtype=_ref.lfq_index_dtype(z.shape[1]))


def _lfq_setup(ctx, inputs, output):
    _no_zero_grads(ctx)


def _lfq_grad(ctx, grad_codes, grad_idx):
    return grad_codes, None  # straight-through: the identity (None when codes got no gradient)


torch.library.register_autograd("vqtok::lfq_forward", _lfq_grad, setup_context=_lfq_setup)


def lfq_quantize(z: torch.Tensor, *, backend: str | Backend = "auto"):
    """Lookup-free quantisation of ``z`` [..., B], B <= 62.

    Returns (codes +-1 with z's dtype and shape, indices [...]): bit b of the index is
    ``z[..., b] > 0`` (LSB-first), int32 for B <= 30 else int64. Straight-through gradient.
    """
    _checks.check_float_tensor("z", z, min_ndim=1)
    bits = z.shape[-1]
    if not 1 <= bits <= 62:
        raise ValueError(f"z must have 1..62 bits in its last dim, got shape {tuple(z.shape)}")
    name = _backend_name(backend)
    _check_finite_unless_fused("lfq_forward", "z", name, z)
    flat = z.reshape(-1, bits).contiguous()
    codes, idx = _quantize(flat, name, "lfq_forward", None, (), _lfq_forward)
    return codes.to(z.dtype).reshape(z.shape), idx.reshape(z.shape[:-1])


def lfq_indices_to_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """indices [...] -> float32 +-1 codes [..., bits]; exact inverse of lfq_quantize's indices."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
        raise TypeError("indices must be an integer torch.Tensor")
    return _ref.lfq_indices_to_codes(indices.reshape(-1), bits).reshape(*indices.shape, bits)
