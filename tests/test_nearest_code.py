"""nearest_code on every backend against an independent float64 oracle: exact indices."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import nearest_f64
from vqtok.ops import BackendUnavailable, nearest_code


def _check(x, c, backend, device, metric="l2"):
    idx, dist = nearest_code(x.to(device), c.to(device), metric=metric, backend=backend)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == (x.shape[0],) and dist.shape == (x.shape[0],)
    ref_idx, ref_dist = nearest_f64(x.float(), c.float())
    idx, dist = idx.cpu(), dist.cpu()
    bad = (idx != ref_idx).nonzero().squeeze(1)
    assert bad.numel() == 0, f"{bad.numel()} rows differ, e.g. row {bad[:5].tolist()}: got {idx[bad[:5]].tolist()} want {ref_idx[bad[:5]].tolist()}"
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5 * (1 + ref_dist.abs().max().item()))
    return idx, dist


@pytest.mark.parametrize(
    "n,k,d",
    [(1, 1, 1), (5, 1, 8), (97, 130, 33), (129, 257, 8), (64, 1000, 16), (33, 511, 3), (17, 300, 256), (70, 64, 100)],
)
def test_random_fp32(backend, device, n, k, d):
    x, c = torch.randn(n, d), torch.randn(k, d)
    _check(x, c, backend, device)


def test_k_past_uint16(backend, device):
    x, c = torch.randn(7, 4), torch.randn(65537, 4)
    x[0] = c[65536]  # the very last code must be reachable
    idx, _ = _check(x, c, backend, device)
    assert idx[0] == 65536


@pytest.mark.parametrize("pos", [(31, 32), (63, 64), (127, 128), (255, 256), (511, 512), (1023, 1024)])
def test_duplicates_across_tile_edges(backend, device, pos):
    k, d = 1100, 8
    c = torch.randn(k, d) * 3
    best = torch.randn(d)
    for p in pos:
        c[p] = best
    x = best[None] + 1e-3 * torch.randn(40, d)
    idx, _ = _check(x, c, backend, device)
    assert (idx == pos[0]).all()


def test_large_common_offset(backend, device):
    # |x|^2 + |c|^2 ~ 3e7 swamps distances of ~1 in fp32: the expanded form alone gets this wrong
    x = 1000 + torch.randn(200, 32)
    c = 1000 + torch.randn(300, 32)
    _check(x, c, backend, device)


def test_integer_valued_ties(backend, device):
    x = torch.randint(-3, 4, (300, 6)).float()
    c = torch.randint(-3, 4, (200, 6)).float()
    _check(x, c, backend, device)


def test_non_contiguous(backend, device):
    x = torch.randn(60, 40)[:, ::2]
    c = torch.randn(20, 150).t()  # [150, 20], column-major
    assert not x.is_contiguous() and not c.is_contiguous()
    _check(x, c, backend, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, device, dtype):
    x, c = torch.randn(90, 24).to(dtype), torch.randn(333, 24).to(dtype)
    _check(x, c, backend, device)


def test_mixed_dtypes_upcast(backend, device):
    x, c = torch.randn(50, 16), torch.randn(70, 16).to(torch.bfloat16)
    _check(x, c, backend, device)


def test_cosine_with_zero_vectors(backend, device):
    x, c = torch.randn(60, 12), torch.randn(80, 12)
    x[3] = 0
    c[5] = 0
    idx, dist = nearest_code(x.to(device), c.to(device), metric="cosine", backend=backend)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    cn = torch.nn.functional.normalize(c.double(), dim=1)
    ref_idx, _ = nearest_f64(xn.float(), cn.float())
    assert torch.equal(idx.cpu(), ref_idx)
    cos = (xn * cn[idx.cpu()]).sum(1)
    torch.testing.assert_close(dist.cpu().double(), 1 - cos, rtol=1e-5, atol=1e-5)
    # documented: a zero input has cos 0 to every code -> distance 1
    assert dist[3].item() == pytest.approx(1.0)


def test_empty_input(backend, device):
    idx, dist = nearest_code(torch.empty(0, 8, device=device), torch.randn(5, 8, device=device), backend=backend)
    assert idx.shape == (0,) and dist.shape == (0,) and idx.dtype == torch.int64


@pytest.mark.parametrize(
    "x,c,match",
    [
        (torch.randn(4, 3), torch.full((5, 3), float("nan")), "codebook.*non-finite"),
        (torch.tensor([[float("inf"), 0.0]]), torch.randn(5, 2), "x.*non-finite"),
        (torch.randn(4), torch.randn(5, 4), "x must be 2-D"),
        (torch.randn(4, 3), torch.randn(5, 3, 1), "codebook must be 2-D"),
        (torch.randn(4, 3), torch.randn(5, 4), "same feature dim"),
        (torch.randn(4, 3), torch.randn(0, 3), "K=0"),
        (torch.ones(4, 3, dtype=torch.int64), torch.randn(5, 3), "x must be a floating-point"),
        (torch.randn(4, 3), torch.ones(5, 3, dtype=torch.int32), "codebook must be a floating-point"),
        (torch.randn(4, 3), torch.randn(5, 3, device="meta"), "same device"),
    ],
)
def test_bad_input(backend, device, x, c, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nearest_code(x if x.device.type == "meta" else x.to(device), c if c.device.type == "meta" else c.to(device), backend=backend)


def test_bad_metric_and_backend():
    with pytest.raises(ValueError, match="metric"):
        nearest_code(torch.randn(2, 2), torch.randn(2, 2), metric="l1")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        nearest_code(torch.randn(2, 2), torch.randn(2, 2), backend="nope")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 70),
    k=st.integers(1, 300),
    d=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
)
def test_property_matches_oracle(backend, device, n, k, d, dtype, scale):
    x = (torch.randn(n, d) * scale).to(dtype)
    c = (torch.randn(k, d) * scale).to(dtype)
    if n == 0:
        idx, _ = nearest_code(x.to(device), c.to(device), backend=backend)
        assert idx.numel() == 0
        return
    _check(x, c, backend, device)
