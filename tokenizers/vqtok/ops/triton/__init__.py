"""The ``triton`` backend: Triton kernels for nearest-code search, FSQ and LFQ.

Runs on CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``
was set before triton was first imported. Importing this package never fails and never touches
CUDA: when triton is missing the backend reports why through :func:`unavailable_reason`.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as e:  # not installed, or broken
    _IMPORT_ERROR = f"triton could not be imported ({type(e).__name__}: {e})"


def unavailable_reason(backend: str = "triton") -> str | None:
    """None when the triton backend can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU tensors)"
    return None


if _IMPORT_ERROR is None:
    from ..dispatch import register
    from . import fsq, lfq, nearest

    @register("nearest_code_l2", "triton")
    def _nearest_code_l2(x, codebook, precision="exact"):
        return nearest.search(x, codebook, precision)

    register("fsq_forward", "triton")(fsq.fsq_forward)
    register("fsq_backward", "triton")(fsq.fsq_backward)
    register("fsq_indices_to_codes", "triton")(fsq.fsq_indices_to_codes)
    register("lfq_forward", "triton")(lfq.lfq_forward)
