"""Shared fixtures: every op test runs on every available backend.

Without a CUDA device, Triton runs on CPU tensors through its interpreter; TRITON_INTERPRET must
be set before triton is first imported, so it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vqtok.ops.dispatch import unavailable_reason  # noqa: E402

ALL_BACKENDS = ("torch", "cpp", "cuda", "triton")


def backend_device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    why = unavailable_reason(request.param)
    if why is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
