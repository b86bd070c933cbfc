"""Every op is a torch.library custom op with a fake kernel: torch.compile traces it whole."""

import pytest
import torch

from vqtok.ops import fsq_indices_to_codes, fsq_quantize, lfq_quantize, nearest_code
from vqtok.ops._checks import check_levels


@pytest.mark.parametrize("compile_backend", ["aot_eager"])
def test_ops_compile_fullgraph(backend, device, compile_backend):
    if backend == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter runs eagerly; compiled Triton needs a GPU")
    torch._dynamo.reset()
    levels = [8, 5, 5, 5]

    def f(x, c, z, b):
        idx, dist = nearest_code(x, c, backend=backend)
        codes, fidx = fsq_quantize(z, levels, backend=backend)
        back = fsq_indices_to_codes(fidx, levels, backend=backend)
        bits, lidx = lfq_quantize(b, backend=backend)
        return idx, dist, codes, fidx, back, bits, lidx

    x, c = torch.randn(37, 12, device=device), torch.randn(50, 12, device=device)
    z = torch.randn(6, 7, 4, device=device, requires_grad=True)
    b = torch.randn(9, 10, device=device, requires_grad=True)
    eager = f(x, c, z, b)
    compiled = torch.compile(f, backend=compile_backend, fullgraph=True)(x, c, z, b)
    for e, k in zip(eager, compiled):
        assert e.dtype == k.dtype and e.shape == k.shape
        assert torch.equal(e, k)
    (compiled[2].sum() + compiled[5].sum()).backward()
    assert z.grad is not None and torch.equal(b.grad, torch.ones_like(b))


def test_fake_kernels_give_shapes_and_dtypes():
    """The meta (fake) implementations agree with the real ones on shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    levels = check_levels([2**16, 2**16 + 1])
    ops = torch.ops.vqtok
    real = ops.fsq_forward(torch.randn(3, 2), levels, "torch")
    with FakeTensorMode():
        fake = ops.fsq_forward(torch.randn(3, 2), levels, "torch")
        fake_nc = ops.nearest_code_l2(torch.randn(5, 4), torch.randn(7, 4), "torch", "exact")
        fake_lfq = ops.lfq_forward(torch.randn(5, 40), "torch")
        fake_dec = ops.fsq_indices_to_codes(torch.zeros(6, dtype=torch.int64), [3, 4], "torch")
    assert fake[1].dtype == real[1].dtype == torch.int64 and fake[0].shape == real[0].shape
    assert fake_nc[0].dtype == torch.int64 and fake_nc[1].dtype == torch.float32 and fake_nc[0].shape == (5,)
    assert fake_lfq[1].dtype == torch.int64 and fake_lfq[1].shape == (5,)
    assert fake_dec.shape == (6, 2) and fake_dec.dtype == torch.float32
