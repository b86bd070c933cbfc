"""Streaming, DDP-aware accumulation of metrics: bounded memory whatever the evaluation set size.

Every accumulator keeps running float64 sums only (no per-sample lists), so evaluating a million
images costs the same memory as evaluating ten. Under ``torch.distributed`` each rank accumulates
its own shard and ``all_reduce()`` sums the state across ranks (call it once, on every rank,
before ``compute()``); the sums are order-independent, so the result equals a single-process run
over the union of the shards up to float64 rounding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["MeanAccumulator", "GaussianAccumulator", "CountAccumulator", "dist_ready", "all_reduce_sum"]


def dist_ready() -> bool:
    """True when a torch.distributed process group is initialised (with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (a no-op without a process group). Returns a tensor on t's device."""
    if not dist_ready():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


class MeanAccumulator:
    """Running mean of per-sample values. ``update(values [B])``; ``compute() -> float`` (nan if empty)."""

    def __init__(self) -> None:
        self.state = torch.zeros(2, dtype=torch.float64)  # [sum, count]

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().reshape(-1).to("cpu", torch.float64)
        if not torch.isfinite(v).all():
            raise ValueError("MeanAccumulator.update got non-finite values")
        self.state += torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64)])

    @property
    def count(self) -> int:
        return int(self.state[1].item())

    def all_reduce(self) -> None:
        self.state = all_reduce_sum(self.state)

    def compute(self) -> float:
        s, n = self.state.tolist()
        return s / n if n > 0 else math.nan


class CountAccumulator:
    """Running histogram of integer ids in [0, size): ``update(ids)``; ``counts`` int64 [size]."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)
        self.counts = torch.zeros(self.size, dtype=torch.int64)

    def update(self, ids: torch.Tensor) -> None:
        flat = ids.detach().reshape(-1).to("cpu", torch.int64)
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.size):
            raise ValueError(f"ids must lie in [0, {self.size}), got range [{int(flat.min())}, {int(flat.max())}]")
        self.counts += torch.bincount(flat, minlength=self.size)

    def all_reduce(self) -> None:
        self.counts = all_reduce_sum(self.counts)


class GaussianAccumulator:
    """Running mean and covariance of feature vectors (for FID), in float64.

    Keeps n, sum x [D] and sum x x^T [D, D]: memory 8 D^2 bytes (32 MiB for D = 2048), independent
    of the number of samples. ``compute() -> (mean [D], covariance [D, D])`` with the unbiased
    (n - 1) normalisation used by ``numpy.cov`` / pytorch-fid.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        """feats [B, D]."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must be [B, {self.dim}], got shape {tuple(feats.shape)}")
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.t() @ f

    @property
    def count(self) -> int:
        return int(self.n.item())

    def all_reduce(self) -> None:
        self.n = all_reduce_sum(self.n)
        self.sum = all_reduce_sum(self.sum)
        self.outer = all_reduce_sum(self.outer)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mean = self.sum / n
        cov = (self.outer - n * torch.outer(mean, mean)) / (n - 1)
        return mean, (cov + cov.t()) / 2
