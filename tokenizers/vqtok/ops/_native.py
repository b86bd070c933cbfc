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


# --------------------------------------------------------------------------------------------
# nearest-code search (cpp): kernels/cpu/nearest_*.cpp
# --------------------------------------------------------------------------------------------
if _C is not None and hasattr(_C, "nearest_code_l2"):
    import torch

    from .dispatch import register

    _NEAREST_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    @register("nearest_code_l2", "cpp")
    def _nearest_code_l2_cpp(x, codebook, precision="exact"):
        """x [N, D], codebook [K, D] (same dtype: f32/f16/bf16, CPU) -> (int64 [N], float32 [N])."""
        if x.dtype != codebook.dtype or x.dtype not in _NEAREST_DTYPE_CODE:
            raise TypeError(
                f"cpp nearest_code_l2 needs x and codebook of one dtype in float32/float16/bfloat16, "
                f"got {x.dtype} and {codebook.dtype}"
            )
        if x.device.type != "cpu" or codebook.device.type != "cpu":
            raise ValueError(f"cpp nearest_code_l2 runs on CPU tensors, got {x.device} and {codebook.device}")
        x, codebook = x.contiguous(), codebook.contiguous()
        n, d = x.shape
        k = codebook.shape[0]
        idx = torch.empty(n, dtype=torch.int64)
        dist = torch.empty(n, dtype=torch.float32)
        _C.nearest_code_l2(
            x.data_ptr(), codebook.data_ptr(), n, k, d, _NEAREST_DTYPE_CODE[x.dtype],
            precision == "fast", idx.data_ptr(), dist.data_ptr(),
        )
        return idx, dist
