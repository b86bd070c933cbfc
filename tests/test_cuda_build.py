"""The CUDA part of vqtok._C: built whenever nvcc is present, importable without a GPU, and
correct on a device (those cases skip here without one)."""

import shutil

import pytest
import torch

from oracle import nearest_f64
from vqtok.ops import fsq_quantize, lfq_quantize, nearest_code
from vqtok.ops import _native
from vqtok.ops.dispatch import _REGISTRY, unavailable_reason

_C = _native._C
needs_ext = pytest.mark.skipif(_C is None, reason=f"vqtok._C not built: {_native._IMPORT_ERROR}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_FUNCS = ("cuda_nearest_l2_top2", "cuda_rescore_f64", "cuda_fsq_forward", "cuda_fsq_backward",
              "cuda_fsq_indices_to_codes", "cuda_lfq_forward")


@needs_ext
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the extension is built without CUDA")
def test_built_with_cuda_when_nvcc_present():
    assert _C.with_cuda is True, (
        "vqtok._C was built without CUDA although nvcc is on PATH (built with VQTOK_CUDA=OFF?); run `make build`"
    )
    assert _C.build_info()["cuda"] is True
    missing = [f for f in CUDA_FUNCS if not hasattr(_C, f)]
    assert not missing, f"CUDA bindings missing: {missing}"
    for op in ("nearest_code_l2", "fsq_forward", "fsq_backward", "fsq_indices_to_codes", "lfq_forward"):
        assert "cuda" in _REGISTRY[op], f"cuda backend does not register {op}"


@needs_ext
def test_cuda_backend_reason_without_device():
    why = unavailable_reason("cuda")
    if torch.cuda.is_available() and _C.with_cuda:
        assert why is None
    elif not _C.with_cuda:
        assert "without CUDA" in why
    else:
        assert "no CUDA device" in why


@needs_ext
@pytest.mark.skipif(_C is None or not getattr(_C, "with_cuda", False), reason="built without CUDA")
def test_bindings_check_arguments_before_touching_the_device():
    # argument errors are raised on the host, so they are testable without a GPU
    with pytest.raises(ValueError, match="k must be in"):
        _C.cuda_nearest_l2_top2(0, 0, 0, 1, 0, 4, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="feature dim"):
        _C.cuda_fsq_forward(0, 1, 0, 0, 0, 0, 0, 0, 0, 0, False, 0)
    with pytest.raises(ValueError, match="rows must be >= 0"):
        _C.cuda_lfq_forward(0, -1, 4, 0, 0, False, 0)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (100, 5000, 8), (3000, 70, 33), (7, 100000, 16), (257, 1000, 256)])
def test_cuda_nearest_matches_oracle(n, k, d):
    x, c = torch.randn(n, d), torch.randn(k, d)
    c[-1] = x[0]
    idx, dist = nearest_code(x.cuda(), c.cuda(), backend="cuda")
    ref_idx, ref_dist = nearest_f64(x, c)
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.gpu
def test_cuda_fsq_lfq_match_torch_on_gpu():
    z = torch.randn(100000, 5, device="cuda") * 2
    levels = [8, 5, 5, 5, 7]
    codes, idx = fsq_quantize(z, levels, backend="cuda")
    rc, ri = fsq_quantize(z, levels, backend="torch")
    assert torch.equal(codes, rc) and torch.equal(idx, ri)
    lc, li = lfq_quantize(z, backend="cuda")
    rlc, rli = lfq_quantize(z, backend="torch")
    assert torch.equal(lc, rlc) and torch.equal(li, rli)
