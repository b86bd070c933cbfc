"""Helpers shared by the quantizer modules: layout, fp32 regions, gradient estimators, DDP.

Layout: quantizers accept channel-first maps ``[B, D, *spatial]`` (1-D, 2-D, 3-D data) or flat
tokens ``[N, D]``. :func:`flatten_tokens` turns either into ``[N, D]`` rows plus a
:class:`Layout` that puts results back.

Estimators: :func:`estimate` returns exactly ``q`` in the forward pass (so that
``decode(encode(z)) == forward(z).quantized`` holds bit for bit) and sends the gradient to ``x``
either straight through (van den Oord et al. 2017) or through the rotation trick (Fifty et al.
2024, "Restructuring Vector Quantization with the Rotation Trick").

DDP: every collective here is entered by every rank; callers only branch on values that are
already identical across ranks (all-reduced counts, step counters, shared seeds).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

ESTIMATORS = ("ste", "rotation")
# nearest_code precisions: the same indices either way ("fast" scores with AMX-BF16 where the CPU has it)
SEARCH_PRECISIONS = ("exact", "fast")


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How to map rows ``[N, C]`` back to the caller's layout. lead: z's shape without dim 1."""

    lead: tuple[int, ...]
    channel_first: bool

    def unflatten(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, C] -> [B, C, *spatial] (channel-first input) or [N, C] (flat input)."""
        out = rows.reshape(*self.lead, rows.shape[-1])
        return out.movedim(-1, 1) if self.channel_first else out

    def indices(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [N, *extra] -> [*lead, *extra]."""
        return idx.reshape(*self.lead, *idx.shape[1:])


def flatten_tokens(z: torch.Tensor, dim: int, name: str = "z") -> tuple[torch.Tensor, Layout]:
    """z [B, dim, *spatial] or [N, dim] -> (rows [N, dim], layout)."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() < 2 or z.dim() > 5:
        raise ValueError(f"{name} must be [N, D] or [B, D, *spatial] with 1-3 spatial dims, got shape {tuple(z.shape)}")
    if z.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} channels in dim 1 (the quantizer's dim), got shape {tuple(z.shape)}")
    if z.dim() == 2:
        return z, Layout((z.shape[0],), channel_first=False)
    zl = z.movedim(1, -1)
    return zl.reshape(-1, dim), Layout(tuple(zl.shape[:-1]), channel_first=True)


def layout_of_indices(indices: torch.Tensor, depth: int | None = None) -> Layout:
    """Layout of a decode call: indices [B, *spatial] (channel-first) or [N] (flat).

    depth: residual quantizers' trailing depth axis, excluded from the lead shape.
    """
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
        raise TypeError("indices must be an integer torch.Tensor")
    shape = tuple(indices.shape[:-1]) if depth is not None else tuple(indices.shape)
    if depth is not None and (indices.dim() < 2 or indices.shape[-1] != depth):
        raise ValueError(f"indices must end with a depth axis of size {depth}, got shape {tuple(indices.shape)}")
    if len(shape) == 0:
        raise ValueError(f"indices must have at least one token axis, got shape {tuple(indices.shape)}")
    return Layout(shape, channel_first=len(shape) > 1)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def keep_fp32(fn):
    """Wrap a ``Module._apply`` conversion so that fp32 tensors keep their dtype when ``fn`` would
    cast them to fp16 / bf16 (``.half()``, ``.bfloat16()``, ``.to(torch.bfloat16)``); device moves
    and every other conversion (``.double()``, ``.to_empty()``) apply as usual. ``fn``'s target is
    read from its result on an empty tensor of the same dtype and device.

    Quantizers compute in fp32 whatever the surrounding precision (``fp32_region``), and their
    state (codebooks, projections, EMA counts, usage statistics) is what that fp32 math reads and
    accumulates: a model cast to bf16 would otherwise hand them bf16 weights (a dtype error in
    every fp32 matmul) and bf16 running statistics (8 bits of mantissa under a 0.99 EMA)."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32:
            target = fn(t.new_empty(0))
            if target.dtype in LOW_PRECISION:
                return t.to(device=target.device)
        return fn(t)

    return apply


def fp32_region(device: torch.device):
    """Disable autocast: quantizers compute in fp32 whatever the surrounding AMP policy."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# gradient estimators
# --------------------------------------------------------------------------------------------
class _Estimate(torch.autograd.Function):
    """Forward: q itself (bit-exact). Backward: d/dx by STE or the rotation trick; q gets none."""

    @staticmethod
    def forward(ctx, x, q, rotation: bool):
        ctx.rotation = rotation
        if rotation:
            ctx.save_for_backward(x, q)
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.rotation:
            return grad, None, None
        x, q = ctx.saved_tensors
        return rotation_grad(x, q, grad), None, None


def rotation_grad(x: torch.Tensor, q: torch.Tensor, grad: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Gradient of the rotation trick w.r.t. x. x, q, grad [N, D].

    The forward is q = lam R x with R the rotation taking x/|x| to q/|q| and lam = |q|/|x|,
    both treated as constants: R = I - 2 r r^T + 2 q^ x^T with r = (x^ + q^)/|x^ + q^|. Hence
    dL/dx = lam R^T g = lam (g - 2 r (r.g) + 2 x^ (q^.g)).
    """
    xn = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    qn = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    xh, qh = x / xn, q / qn
    r = xh + qh
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
    g = grad.to(x.dtype)
    out = g - 2 * r * (r * g).sum(-1, keepdim=True) + 2 * xh * (qh * g).sum(-1, keepdim=True)
    return (qn / xn) * out


def estimate(x: torch.Tensor, q: torch.Tensor, estimator: str = "ste") -> torch.Tensor:
    """Returns a tensor equal to q whose gradient flows to x by ``estimator`` ('ste'|'rotation')."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return _Estimate.apply(x, q, estimator == "rotation")


def check_indices(flat: torch.Tensor, codebook_size: int, what: str | None = None) -> None:
    """Raise a clear error unless every id of flat lies in [0, codebook_size)."""
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"indices must lie in [0, {what or codebook_size}), "
                         f"got [{int(flat.min())}, {int(flat.max())}]")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process). Every rank must call it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows x [n_r, D] in rank order -> [sum n_r, D]; n_r may differ."""
    if not is_distributed():
        return x
    w = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    m = max(sizes)
    padded = x.new_zeros((m, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


def shared_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that every rank seeds identically (same seed, step and salt)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1))
    return g
