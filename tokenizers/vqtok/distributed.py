"""Process-group helpers for ``torchrun --nproc_per_node=N -m vqtok train ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`init_from_env` starts the group (nccl on GPU,
gloo on CPU). Gradients are averaged with one coalesced all-reduce per step (:func:`all_reduce_grads`)
rather than wrapping the model in DDP, so the adaptive GAN weight can take autograd.grad of the
decoder's last layer and unused parameters (a discriminator before its start step) need no
special handling. Buffers (EMA codebooks, health counters) are broadcast from rank 0 after each
step, as DDP's broadcast_buffers does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def all_reduce_grads(module: nn.Module, world_size: int) -> None:
    """Average .grad of every parameter across ranks (one flat buffer; missing grads count as 0)."""
    if world_size <= 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


@torch.no_grad()
def broadcast_module(module: nn.Module, params: bool = True) -> None:
    """Copy rank 0's buffers (and parameters when ``params``) to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    tensors = list(module.buffers()) + (list(module.parameters()) if params else [])
    for t in tensors:
        if t.dtype == torch.bool:  # gloo has no bool collectives
            u = t.data.to(torch.uint8)
            dist.broadcast(u, src=0)
            t.data.copy_(u.bool())
        else:
            dist.broadcast(t.data, src=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()
