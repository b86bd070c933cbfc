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


# --------------------------------------------------------------------------------------------
# FSQ / LFQ (cpp): kernels/cpu/fsq_lfq*.cpp
# --------------------------------------------------------------------------------------------
if _C is not None and hasattr(_C, "fsq_forward"):
    import torch

    from . import reference as _ref
    from .dispatch import register

    _FSQ_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def _fsq_lfq_input(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """CPU, contiguous, and fp32/fp16/bf16 (float64 is rounded to fp32 as the reference does)."""
        if t.device.type != "cpu":
            raise ValueError(f"cpp backend runs on CPU tensors, got {name} on {t.device}")
        if t.dtype not in _FSQ_DTYPE_CODE:
            t = t.to(torch.float32)
        return t.contiguous(), _FSQ_DTYPE_CODE[t.dtype]

    @register("fsq_forward", "cpp")
    def _fsq_forward_cpp(z, levels):
        """z [M, d] -> (codes float32 [M, d], indices [M] int32, int64 when prod(levels) >= 2^31)."""
        z, code = _fsq_lfq_input("z", z)
        m = z.shape[0]
        idx_dtype = _ref.fsq_index_dtype(levels)
        codes = torch.empty((m, len(levels)), dtype=torch.float32)
        idx = torch.empty(m, dtype=idx_dtype)
        _C.fsq_forward(z.data_ptr(), m, list(levels), code, codes.data_ptr(), idx.data_ptr(), idx_dtype == torch.int64)
        return codes, idx

    @register("fsq_backward", "cpp")
    def _fsq_backward_cpp(grad_codes, z, levels):
        """grad_codes [M, d], z [M, d] -> grad_z float32 [M, d] (straight-through rounding)."""
        z, code = _fsq_lfq_input("z", z)
        g = grad_codes.to(device="cpu", dtype=torch.float32).contiguous()
        if g.shape != z.shape:
            raise ValueError(f"grad_codes must have z's shape {tuple(z.shape)}, got {tuple(g.shape)}")
        out = torch.empty(z.shape, dtype=torch.float32)
        _C.fsq_backward(g.data_ptr(), z.data_ptr(), z.shape[0], list(levels), code, out.data_ptr())
        return out

    @register("fsq_indices_to_codes", "cpp")
    def _fsq_indices_to_codes_cpp(indices, levels):
        """indices [M] (any integer dtype) -> codes float32 [M, d]."""
        if indices.device.type != "cpu":
            raise ValueError(f"cpp backend runs on CPU tensors, got indices on {indices.device}")
        if indices.dtype not in (torch.int32, torch.int64):
            indices = indices.to(torch.int64)
        indices = indices.contiguous()
        m = indices.shape[0]
        codes = torch.empty((m, len(levels)), dtype=torch.float32)
        _C.fsq_indices_to_codes(indices.data_ptr(), m, indices.dtype == torch.int64, list(levels), codes.data_ptr())
        return codes

    @register("lfq_forward", "cpp")
    def _lfq_forward_cpp(z):
        """z [M, B] -> (codes float32 +-1 [M, B], indices [M]: bit b = z[:, b] > 0, LSB first)."""
        z, code = _fsq_lfq_input("z", z)
        m, bits = z.shape
        idx_dtype = _ref.lfq_index_dtype(bits)
        codes = torch.empty((m, bits), dtype=torch.float32)
        idx = torch.empty(m, dtype=idx_dtype)
        _C.lfq_forward(z.data_ptr(), m, bits, code, codes.data_ptr(), idx.data_ptr(), idx_dtype == torch.int64)
        return codes, idx
