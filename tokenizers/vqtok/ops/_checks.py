"""Argument checks shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

import math
from typing import Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_float_tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if _compiling() or t.numel() == 0:
        return
    # Fast path (~25x faster than isfinite().all()): a finite sum proves every element finite
    # (NaN or Inf make the sum non-finite); overflow of a finite sum falls through to the exact check.
    if bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"tensors must be on the same device: {desc}")


def check_search_inputs(x, codebook, metric: str) -> None:
    check_float_tensor("x", x, ndim=2)
    check_float_tensor("codebook", codebook, ndim=2)
    check_same_device(x=x, codebook=codebook)
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code (K=0)")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"x and codebook must have the same feature dim D: x is {tuple(x.shape)}, codebook is {tuple(codebook.shape)}"
        )
    if codebook.shape[0] >= 2**31:
        raise ValueError(f"codebook has {codebook.shape[0]} codes; at most 2^31 - 1 are supported")
    check_finite("x", x)
    check_finite("codebook", codebook)


def check_levels(levels) -> list[int]:
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    if not isinstance(levels, Sequence) or isinstance(levels, (str, bytes)):
        raise TypeError(f"levels must be a sequence of ints, got {type(levels).__name__}")
    out = []
    for i, lv in enumerate(levels):
        if isinstance(lv, bool) or not isinstance(lv, int):
            raise TypeError(f"levels[{i}] must be an int, got {lv!r}")
        if lv < 2:
            raise ValueError(f"levels[{i}] must be >= 2, got {lv}")
        out.append(int(lv))
    if not out:
        raise ValueError("levels must not be empty")
    if math.prod(out) >= 2**63:
        raise ValueError(f"prod(levels) = {math.prod(out)} does not fit in int64")
    return out


def check_last_dim(name: str, t: torch.Tensor, d: int, what: str) -> None:
    if t.shape[-1] != d:
        raise ValueError(f"{name} must have last dim {d} ({what}), got shape {tuple(t.shape)}")
