"""The only importer of the compiled extension ``vqtok._C``; registers the ``cpp`` and ``cuda`` backends.

Importing this module never fails: when the extension is missing the backends report why.
"""

from __future__ import annotations

try:
    from vqtok import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: str | None = None
except Exception as e:  # not built, or built for another platform
    _C = None
    _IMPORT_ERROR = f"vqtok._C could not be imported ({type(e).__name__}: {e})"


def unavailable_reason(backend: str) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    if backend == "cuda":
        if not getattr(_C, "with_cuda", False):
            return "vqtok._C was built without CUDA (no nvcc at build time)"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
    return None


def build_info() -> dict:
    """What the extension was built with (for `vqtok info`)."""
    if _C is None:
        return {"built": False, "reason": _IMPORT_ERROR}
    return {"built": True, **dict(_C.build_info())}
