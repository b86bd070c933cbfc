"""The only importer of the compiled extension ``vqtok._C``; registers the ``cpp`` and ``cuda`` backends.

Importing this module never fails: when the extension is missing the backends report why.
"""

from __future__ import annotations

import math

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


def _index_input(indices):
    """Any integer tensor -> contiguous int32/int64, the index types the kernels read."""
    import torch

    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.to(torch.int64)
    return indices.contiguous()


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
    # Outputs of at least one huge page live in vqtok._C.HostBuffers (2 MiB pages, recycled through
    # a 256 MiB cache): glibc maps every block above 32 MiB fresh from the OS, and its first write
    # then costs one page fault per 4 KiB, as much as the kernel's own work; recycled huge pages
    # cost no fault and fewer TLB misses.
    _HUGE_PAGE_MIN_BYTES = 2 << 20

    def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor; from 2 MiB up, a recycled huge-page HostBuffer."""
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if nbytes < _HUGE_PAGE_MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(_C.HostBuffer(nbytes), dtype=dtype, count=count).view(shape)

    def _raise_nonfinite(bad: int) -> None:
        if bad:
            raise ValueError(f"z contains {bad} non-finite value(s) (NaN or Inf)")

    def _fsq_lfq_input(name: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """CPU, contiguous, and fp32/fp16/bf16 (float64 is rounded to fp32 as the reference does)."""
        if t.device.type != "cpu":
            raise ValueError(f"cpp backend runs on CPU tensors, got {name} on {t.device}")
        if t.dtype not in _FSQ_DTYPE_CODE:
            t = t.to(torch.float32)
        return t.contiguous(), _FSQ_DTYPE_CODE[t.dtype]

    @register("fsq_forward", "cpp")
    def _fsq_forward_cpp(z, levels):
        """z [M, d] -> (codes float32 [M, d], indices [M] int32, int64 when prod(levels) >= 2^31).

        Raises ValueError when z holds NaN or Inf (counted by the kernel in the same pass)."""
        z, code = _fsq_lfq_input("z", z)
        m = z.shape[0]
        idx_dtype = _ref.fsq_index_dtype(levels)
        codes = _empty((m, len(levels)), torch.float32)
        idx = _empty((m,), idx_dtype)
        _raise_nonfinite(_C.fsq_forward(z.data_ptr(), m, list(levels), code, codes.data_ptr(), idx.data_ptr(),
                                        idx_dtype == torch.int64))
        return codes, idx

    _fsq_forward_cpp.checks_finite = True

    @register("fsq_backward", "cpp")
    def _fsq_backward_cpp(grad_codes, z, levels):
        """grad_codes [M, d], z [M, d] -> grad_z float32 [M, d] (straight-through rounding)."""
        z, code = _fsq_lfq_input("z", z)
        g = grad_codes.to(device="cpu", dtype=torch.float32).contiguous()
        if g.shape != z.shape:
            raise ValueError(f"grad_codes must have z's shape {tuple(z.shape)}, got {tuple(g.shape)}")
        out = _empty(tuple(z.shape), torch.float32)
        _C.fsq_backward(g.data_ptr(), z.data_ptr(), z.shape[0], list(levels), code, out.data_ptr())
        return out

    @register("fsq_indices_to_codes", "cpp")
    def _fsq_indices_to_codes_cpp(indices, levels):
        """indices [M] (any integer dtype) -> codes float32 [M, d]."""
        if indices.device.type != "cpu":
            raise ValueError(f"cpp backend runs on CPU tensors, got indices on {indices.device}")
        indices = _index_input(indices)
        m = indices.shape[0]
        codes = torch.empty((m, len(levels)), dtype=torch.float32)
        _C.fsq_indices_to_codes(indices.data_ptr(), m, indices.dtype == torch.int64, list(levels), codes.data_ptr())
        return codes

    @register("lfq_forward", "cpp")
    def _lfq_forward_cpp(z):
        """z [M, B] -> (codes float32 +-1 [M, B], indices [M]: bit b = z[:, b] > 0, LSB first).

        Raises ValueError when z holds NaN or Inf (counted by the kernel in the same pass)."""
        z, code = _fsq_lfq_input("z", z)
        m, bits = z.shape
        idx_dtype = _ref.lfq_index_dtype(bits)
        codes = _empty((m, bits), torch.float32)
        idx = _empty((m,), idx_dtype)
        _raise_nonfinite(_C.lfq_forward(z.data_ptr(), m, bits, code, codes.data_ptr(), idx.data_ptr(),
                                        idx_dtype == torch.int64))
        return codes, idx

    _lfq_forward_cpp.checks_finite = True


# --------------------------------------------------------------------------------------------
# cuda: kernels/cuda/*.cu on device pointers, launched on torch's current stream
# --------------------------------------------------------------------------------------------
if _C is not None and getattr(_C, "with_cuda", False) and hasattr(_C, "cuda_nearest_l2_top2"):
    import torch

    from . import reference as _cref
    from .dispatch import register

    _CUDA_ROW_TILE = 64  # rows per block of kernels/cuda/nearest.cu
    _CUDA_SPLIT_TARGET = 264  # ~2 waves of blocks on a 132-SM H100

    def _stream(t: torch.Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream

    def _cuda_f32(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            raise ValueError(f"cuda backend runs on CUDA tensors, got {name} on {t.device}")
        return t.to(torch.float32).contiguous()

    @register("nearest_code_l2", "cuda")
    def _nearest_code_l2_cuda(x, codebook, precision="exact"):
        """x [N, D], codebook [K, D] on one CUDA device -> (int64 [N], float32 [N]), certified exact.

        The CUDA kernel has one (fp32) path: ``precision="fast"`` runs it too."""
        from .triton import _certify  # pure torch; importing it never needs triton

        xf, cf = _cuda_f32("x", x), _cuda_f32("codebook", codebook)
        n, d = xf.shape
        k = cf.shape[0]
        dev = xf.device
        with torch.cuda.device(dev):
            cn = cf.square().sum(1)
            tiles = -(-n // _CUDA_ROW_TILE)
            splits = max(1, min(-(-_CUDA_SPLIT_TARGET // tiles), k // 512)) if tiles < _CUDA_SPLIT_TARGET else 1
            scratch = torch.empty(splits * n * 3 if splits > 1 else 1, dtype=torch.int32, device=dev)
            best = torch.empty(n, dtype=torch.float32, device=dev)
            cand = torch.empty(n, dtype=torch.int32, device=dev)
            second = torch.empty(n, dtype=torch.float32, device=dev)
            s = _stream(xf)
            _C.cuda_nearest_l2_top2(xf.data_ptr(), cf.data_ptr(), cn.data_ptr(), n, k, d, splits, scratch.data_ptr(),
                                    best.data_ptr(), cand.data_ptr(), second.data_ptr(), s)
            idx = torch.empty(n, dtype=torch.int64, device=dev)
            dist = torch.empty(n, dtype=torch.float32, device=dev)
            score = torch.empty(n, dtype=torch.float64, device=dev)
            _C.cuda_rescore_f64(xf.data_ptr(), cf.data_ptr(), cand.data_ptr(), n, k, d, idx.data_ptr(),
                                dist.data_ptr(), score.data_ptr(), s)
            err, e64 = _certify.row_bounds(xf, cn, "fp32")
            redo = (~_certify.certified(second, score, err, e64)).nonzero().squeeze(1)
            if redo.numel():
                ri, rd = _cref.nearest_code_l2(x.index_select(0, redo), codebook)
                idx[redo] = ri
                dist[redo] = rd
        return idx, dist

    def _fsq_tables(levels, dev):
        hl, off, shift, hw = _cref.fsq_constants(list(levels), device=dev)
        lv = torch.tensor(list(levels), dtype=torch.int64, device=dev)
        return hl, off, shift, hw, _cref.fsq_basis(list(levels), dev), lv

    @register("fsq_forward", "cuda")
    def _fsq_forward_cuda(z, levels):
        """z [M, d] -> (codes float32 [M, d], indices [M] int32/int64), bit-identical to torch on the GPU."""
        zf = _cuda_f32("z", z)
        m, d = zf.shape
        hl, off, shift, hw, basis, _ = _fsq_tables(levels, zf.device)
        codes = torch.empty(m, d, dtype=torch.float32, device=zf.device)
        idx = torch.empty(m, dtype=_cref.fsq_index_dtype(levels), device=zf.device)
        with torch.cuda.device(zf.device):
            _C.cuda_fsq_forward(zf.data_ptr(), m, d, hl.data_ptr(), off.data_ptr(), shift.data_ptr(), hw.data_ptr(),
                                basis.data_ptr(), codes.data_ptr(), idx.data_ptr(), idx.dtype == torch.int64,
                                _stream(zf))
        return codes, idx

    @register("fsq_backward", "cuda")
    def _fsq_backward_cuda(grad_codes, z, levels):
        """Straight-through FSQ backward: [M, d] float32."""
        zf, g = _cuda_f32("z", z), _cuda_f32("grad_codes", grad_codes)
        if g.shape != zf.shape:
            raise ValueError(f"grad_codes must have z's shape {tuple(zf.shape)}, got {tuple(g.shape)}")
        hl, _, shift, hw, _, _ = _fsq_tables(levels, zf.device)
        out = torch.empty_like(zf)
        with torch.cuda.device(zf.device):
            _C.cuda_fsq_backward(g.data_ptr(), zf.data_ptr(), zf.shape[0], zf.shape[1], hl.data_ptr(),
                                 shift.data_ptr(), hw.data_ptr(), out.data_ptr(), _stream(zf))
        return out

    @register("fsq_indices_to_codes", "cuda")
    def _fsq_indices_to_codes_cuda(indices, levels):
        """indices [M] (any integer dtype) -> codes float32 [M, d]."""
        if indices.device.type != "cuda":
            raise ValueError(f"cuda backend runs on CUDA tensors, got indices on {indices.device}")
        indices = _index_input(indices)
        _, _, _, _, basis, lv = _fsq_tables(levels, indices.device)
        codes = torch.empty(indices.shape[0], len(levels), dtype=torch.float32, device=indices.device)
        with torch.cuda.device(indices.device):
            _C.cuda_fsq_indices_to_codes(indices.data_ptr(), indices.dtype == torch.int64, indices.shape[0],
                                         len(levels), lv.data_ptr(), basis.data_ptr(), codes.data_ptr(),
                                         _stream(indices))
        return codes

    @register("lfq_forward", "cuda")
    def _lfq_forward_cuda(z):
        """z [M, B] -> (codes float32 +-1 [M, B], indices [M]: bit b = z[:, b] > 0, LSB first)."""
        zf = _cuda_f32("z", z)
        m, bits = zf.shape
        codes = torch.empty(m, bits, dtype=torch.float32, device=zf.device)
        idx = torch.empty(m, dtype=_cref.lfq_index_dtype(bits), device=zf.device)
        with torch.cuda.device(zf.device):
            _C.cuda_lfq_forward(zf.data_ptr(), m, bits, codes.data_ptr(), idx.data_ptr(), idx.dtype == torch.int64,
                                _stream(zf))
        return codes, idx


def health_step(ema, hist, *, ids=None, counts=None, decay: float, dead_threshold: float, moments_below: int):
    """One ``CodebookHealth`` update in the extension (``kernels/cpu/codebook_health.cpp``; check
    ``health_available()`` first): ema [K] float32 and hist [K] int64, contiguous CPU tensors,
    updated in place from ``ids`` (int64, each in [0, K)) or dense ``counts`` [K] int64. Returns
    (distinct, total, batch entropy, dead, moments taken, d sum w, d sum w log w)."""
    import torch

    k = ema.numel()
    if ids is not None:
        if not ids.numel():
            return 0, 0, 0.0, 0, False, 0.0, 0.0
        ids = ids.to(torch.int64).contiguous()
        return _C.health_step(ema.data_ptr(), hist.data_ptr(), k, ids.data_ptr(), ids.numel(), 0, decay,
                              dead_threshold, moments_below)
    counts = counts.to(torch.int64).contiguous()
    return _C.health_step(ema.data_ptr(), hist.data_ptr(), k, 0, 0, counts.data_ptr(), decay, dead_threshold,
                          moments_below)


def health_available() -> bool:
    """Whether the extension has the codebook-health kernel (``health_step``)."""
    return _C is not None and hasattr(_C, "health_step")
