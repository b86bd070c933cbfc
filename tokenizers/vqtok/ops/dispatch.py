"""Backend selection for vqtok ops.

A backend module registers its implementation of an op with :func:`register`; the public op asks
:func:`resolve` which backend runs for a given device. ``auto`` picks the fastest available
backend for the tensors' device and logs its choice once; a backend asked for by name that is not
available raises :class:`BackendUnavailable` saying how to get it. Nothing here touches CUDA at
import time.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
import os
from typing import Callable

import torch

log = logging.getLogger("vqtok")


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"  # ops/reference.py: the spec, runs anywhere
    CPP = "cpp"  # vqtok._C C++ CPU kernels (OpenMP + SIMD)
    CUDA = "cuda"  # vqtok._C CUDA kernels, when built with nvcc
    TRITON = "triton"  # ops/triton, on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)


class BackendUnavailable(RuntimeError):
    pass


# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}
# modules that register implementations when imported, per backend
_PROVIDERS = {
    "torch": "vqtok.ops._torch_impl",
    "cpp": "vqtok.ops._native",
    "cuda": "vqtok.ops._native",
    "triton": "vqtok.ops.triton",
}
# auto's preference per device type
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}
_HOW_TO_GET = {
    "cpp": "build the extension: `pip install -e .` (needs cmake and a C++17 compiler)",
    "cuda": "build the extension on a machine with nvcc (CUDA toolkit) and run on a CUDA device",
    "triton": "install triton and use CUDA tensors (or set TRITON_INTERPRET=1 before importing "
    "triton to run on CPU tensors)",
}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


@functools.cache
def _load_provider(backend: str) -> str | None:
    """Import the backend's module; return None on success or the reason it is unavailable."""
    try:
        mod = importlib.import_module(_PROVIDERS[backend])
    except Exception as e:  # a broken optional backend must never break `import vqtok`
        return f"{type(e).__name__}: {e}"
    probe = getattr(mod, "unavailable_reason", None)
    return probe(backend) if probe is not None else None


def unavailable_reason(backend: str) -> str | None:
    """None when ``backend`` can run here, else why not."""
    if backend not in _PROVIDERS:
        return f"unknown backend {backend!r}; choose one of {[b.value for b in Backend]}"
    return _load_provider(backend)


def available_backends() -> list[str]:
    """Backends that can run on this machine, in preference order."""
    return [b for b in ("cpp", "cuda", "triton", "torch") if unavailable_reason(b) is None]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _supports_device(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _interpret())
    return False


_logged: set[tuple[str, str, str]] = set()


def resolve(op: str, backend: str | Backend, device: torch.device) -> Callable:
    """The implementation of ``op`` that runs for ``backend`` on ``device``."""
    name = backend.value if isinstance(backend, Backend) else str(backend)
    impls = _REGISTRY.get(op, {})
    if name != "auto":
        why = unavailable_reason(name)
        if why is not None:
            raise BackendUnavailable(
                f"backend {name!r} is not available ({why}); {_HOW_TO_GET.get(name, '')}".rstrip("; ")
            )
        impls = _REGISTRY.get(op, {})
        if name not in impls:
            raise BackendUnavailable(f"backend {name!r} has no implementation of {op}")
        if not _supports_device(name, device):
            raise BackendUnavailable(f"backend {name!r} cannot run {op} on {device.type} tensors")
        return impls[name]
    for cand in _AUTO_ORDER.get(device.type, ("torch",)):
        if cand == "triton" and device.type == "cpu":
            continue
        if unavailable_reason(cand) is None and cand in _REGISTRY.get(op, {}):
            key = (op, device.type, cand)
            if key not in _logged:
                _logged.add(key)
                log.info("vqtok: %s on %s uses backend %r", op, device.type, cand)
            return _REGISTRY[op][cand]
    return _REGISTRY[op]["torch"]
