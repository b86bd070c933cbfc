"""C++ FSQ/LFQ kernels at every SIMD level against ops/reference.py, bit for bit.

Sizes are chosen to hit SIMD tails (rows not a multiple of 8/16/64) and the OpenMP split. tanh is
the one place the kernels do not call torch: they evaluate it in double and round once, which is
``torch.tanh(x.double()).float()``; torch's own fp32 tanh (MKL) is within one ulp of that, so the
FSQ codes and indices equal the reference's exactly for ordinary level counts, and every output
equals the reference formula evaluated with the correctly rounded tanh. For very large L (half_l * ulp(tanh) near 1) a one-ulp
tanh difference moves codes, so there only the correctly rounded oracle is exact.
"""

import math

import numpy as np
import pytest
import torch

from vqtok.ops import reference as ref
from vqtok.ops.dispatch import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpp") is not None, reason=f"cpp backend: {unavailable_reason('cpp')}"
)

if unavailable_reason("cpp") is None:
    from vqtok import _C
    from vqtok.ops import _native

_LEVELS = ("scalar", "avx2", "avx512")
_RANK = {name: i for i, name in enumerate(_LEVELS)}


def _isas():
    if unavailable_reason("cpp") is not None:
        return list(_LEVELS)
    best = _C.detected_isa()
    return [i for i in _LEVELS if _RANK[i] <= _RANK[best]]


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("VQTOK_ISA", request.param)
    assert _C.active_isa() == request.param
    return request.param


def _z(m, d, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, d, generator=g) * scale).to(dtype)


def _tanh_cr(x):
    """fp32 tanh rounded once from double: what the kernels compute."""
    return torch.tanh(x.double()).float()


def _fsq_forward_cr(z, levels):
    """ops/reference.fsq_forward with the correctly rounded tanh, same fp32 operation order."""
    half_l, offset, shift, half_width = ref.fsq_constants(levels)
    q = torch.round(_tanh_cr(z.float() + shift) * half_l - offset)
    idx = ((q + half_width).to(torch.int64) * ref.fsq_basis(levels)).sum(-1)
    return q / half_width, idx.to(ref.fsq_index_dtype(levels))


def _fsq_backward_cr(g, z, levels):
    """ops/reference.fsq_backward with the correctly rounded tanh, same fp32 operation order."""
    half_l, _, shift, half_width = ref.fsq_constants(levels)
    t = _tanh_cr(z.float() + shift)
    return g.float() * (1 - t * t) * (half_l / half_width)


def test_tanh_bits(isa):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([
        torch.randn(50_000, generator=g) * 3,
        torch.rand(20_000, generator=g) * 24 - 12,  # through the rounds-to-one range (~9.01)
        torch.randn(5_000, generator=g) * 1e-3,
        torch.randn(1_000, generator=g) * 1e-30,
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 9.0, 9.01, 9.02, 10.0, -10.0, 1e30, -3.4e38]),
    ])
    out = torch.empty_like(x)
    _C.tanh_f32(x.data_ptr(), x.numel(), out.data_ptr())
    expect = _tanh_cr(x)
    assert torch.equal(out, expect)
    assert torch.equal(out.signbit(), expect.signbit())  # tanh(-0) = -0
    # torch's fp32 tanh is within one ulp of it
    diff = (out.view(torch.int32) - torch.tanh(x).view(torch.int32)).abs()
    assert int(diff.max()) <= 1


def _tanh_fast_and_exact(x):
    fast, exact = torch.empty_like(x), torch.empty_like(x)
    _C.tanh_f32(x.data_ptr(), x.numel(), fast.data_ptr())
    _C.tanh_f32(x.data_ptr(), x.numel(), exact.data_ptr(), exact=True)
    return fast, exact


def test_tanh_fast_path_gives_the_exact_bits(isa):
    """The grid + rounding-test tanh against the plain double evaluation, bit for bit: a stride
    through every fp32 bit pattern up to 10.5, the neighbourhoods of the 1/64 grid points, inputs
    whose tanh lies near an fp32 rounding midpoint (where the fallback must take over), specials."""
    g = torch.Generator().manual_seed(2)
    sweep = torch.arange(0, 0x41280000, 97, dtype=torch.int32).view(torch.float32)  # [0, 10.5]
    grid = torch.arange(1, 641, dtype=torch.float32) / 64
    near_grid = (grid.view(torch.int32)[:, None] + torch.arange(-2048, 2049, 16, dtype=torch.int32)).view(torch.float32)
    cand = torch.rand(1 << 22, generator=g) * 9.5
    t = torch.tanh(cand.double()).view(torch.int64)
    dropped = t & ((1 << 29) - 1)  # the bits fp32 rounding drops; 2^28 is the halfway point
    near_mid = cand[(dropped - (1 << 28)).abs() < (1 << 17)]
    assert near_mid.numel() > 500
    specials = torch.tensor([0.0, 1e-45, 1e-40, 2.0**-126, 1e-30, 2.0**-27, 2.0**-12, 9.01, 10.0, 10.5,
                             1e30, 3.4e38, float("inf")])
    x = torch.cat([sweep, near_grid.flatten(), specials])
    x = torch.cat([x, -x, near_mid, -near_mid])
    fast, exact = _tanh_fast_and_exact(x)
    assert torch.equal(fast.view(torch.int32), exact.view(torch.int32))
    # away from midpoints both are torch's double tanh rounded once (near them the ~1e-16 error of
    # either double evaluation may decide the rounding: there the exact evaluation is the definition)
    ordinary = x.numel() - 2 * near_mid.numel()
    assert torch.equal(fast[:ordinary], _tanh_cr(x[:ordinary]))
    nan = torch.tensor([float("nan"), -float("nan")] * 8)  # not finite: whatever the exact path gives
    fast, exact = _tanh_fast_and_exact(nan)
    assert torch.equal(fast.view(torch.int32), exact.view(torch.int32))


@pytest.mark.parametrize(
    "levels",
    [[8, 5, 5, 5], [2, 3], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [3] * 8, [4] * 9, [3] * 16, [3] * 33, [2**30 + 3]],
)
@pytest.mark.parametrize("m", [1, 15, 17, 63, 1031])
def test_fsq_forward_bits(isa, levels, m):
    z = _z(m, len(levels), seed=m)
    codes, idx = _native._fsq_forward_cpp(z, levels)
    oc, oi = _fsq_forward_cr(z, levels)
    assert idx.dtype == oi.dtype == ref.fsq_index_dtype(levels)
    assert torch.equal(codes, oc) and torch.equal(idx, oi)
    if max(levels) <= 256:
        # torch's fp32 tanh differs by an ulp on ~0.6% of inputs; that moves a code only when
        # half_l * ulp(t) reaches a rounding boundary: never seen for small L (huge L: see above)
        rc, ri = ref.fsq_forward(z, levels)
        assert torch.equal(codes, rc) and torch.equal(idx, ri)


def _float_key(x):
    """fp32 -> int64 keys in the floats' order (-0 and +0 share 0)."""
    b = x.view(torch.int32).to(torch.int64)
    return torch.where(b < 0, -(b & 0x7FFFFFFF), b)


def _key_float(k):
    b = torch.where(k < 0, (-k) | (1 << 31), k)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _code_steps(levels):
    """Per column, the exact fp32 z where the oracle's code goes q -> q + 1 (smallest z with code
    >= q + 1), found by bisecting the ordered floats with _fsq_forward_cr."""
    steps = []
    for j, lv in enumerate(levels):
        def code_j(z):
            zz = torch.zeros(z.numel(), len(levels))
            zz[:, j] = z
            return _fsq_forward_cr(zz, levels)[0][:, j]

        hw = lv // 2
        target = (torch.arange(1, lv, dtype=torch.float32) - hw) / hw  # codes just above each step
        lo = torch.full((lv - 1,), int(_float_key(torch.tensor([-3e38]))), dtype=torch.int64)
        hi = torch.full((lv - 1,), int(_float_key(torch.tensor([3e38]))), dtype=torch.int64)
        while bool((hi - lo > 1).any()):
            mid = lo + (hi - lo) // 2
            up = code_j(_key_float(mid)) >= target
            hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
        steps.append(_key_float(hi))
    return steps


def _near_code_steps(levels, ulps=12):
    """fp32 z at every code step of every column (_code_steps) and the `ulps` floats on each side."""
    cols = []
    for z0 in _code_steps(levels):
        around, up, down = [z0], z0, z0
        for _ in range(ulps):
            up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
            around += [up, down]
        cols.append(torch.cat(around))
    n = max(c.numel() for c in cols)
    return torch.stack([c.repeat(n // c.numel() + 1)[:n] for c in cols], 1)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [32, 31, 2], [16, 4, 7], [6] * 5, [33, 8]])
def test_fsq_forward_at_code_steps(isa, levels):
    """The forward decides codes by per-column thresholds (kernels/cpu/fsq_lfq.cpp) wherever a
    column has at most 31 code steps ([33, 8] runs the direct tanh path): every float next to a
    step gets the oracle's code, in fp32 and after the fp16/bf16 loads."""
    z = _near_code_steps(levels)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        zd = z.to(dtype)
        codes, idx = _native._fsq_forward_cpp(zd, levels)
        oc, oi = _fsq_forward_cr(zd, levels)
        assert torch.equal(codes, oc) and torch.equal(idx, oi), dtype
    # the sweep does cross every step: each column shows all of its codes
    codes, _ = _native._fsq_forward_cpp(z, levels)
    for j, lv in enumerate(levels):
        assert codes[:, j].unique().numel() == lv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fsq_half_inputs(isa, dtype):
    levels = [8, 8, 8, 5, 5, 5]
    z = _z(517, 6, dtype=dtype)
    z[0, :3] = torch.tensor([0.0, -0.0, 6e-8]).to(dtype)  # zeros and an fp16 subnormal
    codes, idx = _native._fsq_forward_cpp(z, levels)
    rc, ri = ref.fsq_forward(z, levels)
    assert torch.equal(codes, rc) and torch.equal(idx, ri)
    g = _z(517, 6, seed=3)
    assert torch.equal(_native._fsq_backward_cpp(g, z, levels), _fsq_backward_cr(g, z, levels))


@pytest.mark.parametrize("m", [1, 16, 33, 1031])
def test_fsq_backward_bits(isa, m):
    levels = [8, 5, 5, 5, 3]
    z, g = _z(m, 5, scale=3.0, seed=m), _z(m, 5, seed=m + 1)
    out = _native._fsq_backward_cpp(g, z, levels)
    assert torch.equal(out, _fsq_backward_cr(g, z, levels))
    # against torch's fp32 tanh: a one-ulp change of t moves 1 - t^2 by <= 2 ulp(1) absolute
    expect = ref.fsq_backward(g, z, levels)
    half_l, _, _, half_width = ref.fsq_constants(levels)
    bound = 4 * 2.0**-24 * g.abs() * (half_l / half_width) + 2.0**-22 * expect.abs()
    assert bool(((out - expect).abs() <= bound).all())


def test_fsq_int64_indices(isa):
    for levels in ([2**16, 2**16 + 1], [2**40, 3]):  # prod >= 2^31; the second has digits past 2^31
        z = _z(77, 2, scale=3.0)
        codes, idx = _native._fsq_forward_cpp(z, levels)
        oc, oi = _fsq_forward_cr(z, levels)
        assert idx.dtype == torch.int64 and torch.equal(idx, oi) and torch.equal(codes, oc)
        assert torch.equal(_native._fsq_indices_to_codes_cpp(idx, levels), ref.fsq_indices_to_codes(idx, levels))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_fsq_indices_to_codes(dtype):
    levels = [8, 5, 5]
    idx = torch.arange(math.prod(levels)).to(dtype)
    assert torch.equal(_native._fsq_indices_to_codes_cpp(idx, levels), ref.fsq_indices_to_codes(idx, levels))
    neg = torch.tensor([-1, -7, -200], dtype=torch.int64)  # out of range: floor semantics as the reference
    assert torch.equal(_native._fsq_indices_to_codes_cpp(neg, levels), ref.fsq_indices_to_codes(neg, levels))


def test_check_tanh_bits_script(isa):
    """benchmarks/check_tanh_bits.py walks every fp32 pattern below its limit, both signs."""
    from scripts import load_script

    mod = load_script("benchmarks/check_tanh_bits.py")
    res = mod.check(1e-38, progress=False)
    top = int(torch.tensor([1e-38]).view(torch.int32))
    assert res["isa"] == isa and res["inputs"] == 2 * top and res["mismatches"] == 0


def test_fsq_constants_match_reference():
    for levels in ([2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 255, 256, 1000], [65536, 65537], [2**40]):
        got = _C.fsq_constants(levels)
        for ours, theirs in zip(got[:4], ref.fsq_constants(levels)):
            assert torch.equal(torch.tensor(ours, dtype=torch.float32), theirs)
        half_l, _, _, half_width = ref.fsq_constants(levels)
        assert torch.equal(torch.tensor(got[4], dtype=torch.float32), half_l / half_width)
        assert got[5] == ref.fsq_basis(levels).tolist()


@pytest.mark.parametrize("bits", [1, 5, 8, 18, 31, 40, 56, 57, 62])
@pytest.mark.parametrize("m", [3, 64, 200])
def test_lfq_forward_bits(isa, bits, m):
    z = _z(m, bits, seed=bits)
    z[0, 0] = 0.0
    z[-1, -1] = -0.0
    codes, idx = _native._lfq_forward_cpp(z)
    rc, ri = ref.lfq_forward(z)
    assert torch.equal(codes, rc)
    assert idx.dtype == ri.dtype and torch.equal(idx, ri)


def test_lfq_half_inputs(isa):
    for dtype in (torch.float16, torch.bfloat16):
        z = _z(130, 18, dtype=dtype)
        codes, idx = _native._lfq_forward_cpp(z)
        rc, ri = ref.lfq_forward(z)
        assert torch.equal(codes, rc) and torch.equal(idx, ri)


def test_millions_of_values_threaded():
    """4M FSQ values and 2M LFQ values through the OpenMP path, at the default SIMD level."""
    levels = [8, 5, 5, 5]
    z = _z((1 << 20) + 5, 4, scale=2.5, seed=7)
    codes, idx = _native._fsq_forward_cpp(z, levels)
    rc, ri = ref.fsq_forward(z, levels)
    assert torch.equal(codes, rc) and torch.equal(idx, ri)
    g = _z(z.shape[0], 4, seed=8)
    assert torch.equal(_native._fsq_backward_cpp(g, z, levels), _fsq_backward_cr(g, z, levels))
    zl = _z((1 << 17) + 3, 18, seed=9)
    lc, li = _native._lfq_forward_cpp(zl)
    rlc, rli = ref.lfq_forward(zl)
    assert torch.equal(lc, rlc) and torch.equal(li, rli)


def test_binding_validation():
    with pytest.raises(ValueError, match=r"levels\[1\] must be >= 2"):
        _C.fsq_forward(0, 0, [3, 1], 0, 0, 0, False)
    with pytest.raises(ValueError, match="levels must not be empty"):
        _C.fsq_indices_to_codes(0, 0, False, [], 0)
    with pytest.raises(ValueError, match="dtype code"):
        _C.fsq_backward(0, 0, 0, [3], 7, 0)
    with pytest.raises(ValueError, match="z pointer is null"):
        _C.fsq_forward(0, 4, [3], 0, 1, 1, False)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 62\]"):
        _C.lfq_forward(0, 0, 63, 0, 0, 0, True)
    with pytest.raises(ValueError, match="need int64 indices"):
        _C.lfq_forward(0, 0, 40, 0, 0, 0, False)
    with pytest.raises(ValueError, match="grad_codes must have z's shape"):
        _native._fsq_backward_cpp(torch.zeros(3, 2), torch.zeros(4, 2), [3, 3])


def test_fma_peak_positive():
    assert _C.fma_peak_gflops(0.02) > 0.0
    with pytest.raises(ValueError, match="seconds"):
        _C.fma_peak_gflops(-1.0)


@pytest.mark.parametrize("iters", [0, 1, 2000])
def test_fma_peak_loop_runs_every_chain(isa, iters):
    """The peak counts 2 x lanes x 12 chains flops a round: the loop it times must compute all 12
    (a chain the compiler drops would overstate the peak by 12/11). Its chains' values after
    `iters` rounds equal x <- fma(x, 0.999999, 1e-6) from 1 + 0.01 c, summed over c."""
    got = _C.fma_peak_chain_sum(iters)
    if isa == "scalar":
        assert got == 0.0  # no FMA loop without AVX2
        return
    x = np.float32(1.0) + np.float32(0.01) * np.arange(12, dtype=np.float32)
    m, b = np.float32(0.999999), np.float32(1e-6)
    for _ in range(iters):  # the fp32 product is exact in float64, then one rounding (fma up to ties)
        x = (x.astype(np.float64) * float(m) + float(b)).astype(np.float32)
    assert got == pytest.approx(float(x.astype(np.float64).sum()), abs=1e-4)
    assert abs(got - float(x[:11].astype(np.float64).sum())) > 0.5  # 11 chains would be far off
    with pytest.raises(ValueError, match="iters"):
        _C.fma_peak_chain_sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_count_nonfinite(isa, dtype):
    """The forward kernels count NaN/Inf in their one pass over z (SIMD blocks, tails, threads):
    the public ops raise on them without a separate check of z."""
    levels = [8, 5, 5]
    for m in (5, 70, 40003):  # scalar tail only, one SIMD block + tail, OpenMP chunks
        for put in ([], [0], [m * 3 - 1], [0, 7, m * 3 - 2, m * 3 - 1]):
            z = _z(m, 3, dtype=dtype, seed=m).reshape(-1)
            for i, pos in enumerate(put):
                z[pos] = (float("nan"), float("inf"), -float("inf"))[i % 3]
            z = z.reshape(m, 3)
            n_bad = len(put)
            m3 = z.shape[0]
            out_c, out_i = torch.empty(m3, 3), torch.empty(m3, dtype=torch.int32)
            code = _native._FSQ_DTYPE_CODE[dtype]
            assert _C.fsq_forward(z.data_ptr(), m3, levels, code, out_c.data_ptr(), out_i.data_ptr(), False) == n_bad
            zl = z  # LFQ with 3 bits
            lc, li = torch.empty(zl.shape), torch.empty(zl.shape[0], dtype=torch.int32)
            assert _C.lfq_forward(zl.data_ptr(), zl.shape[0], zl.shape[1], code, lc.data_ptr(), li.data_ptr(),
                                  False) == n_bad
            if n_bad:
                with pytest.raises(ValueError, match=f"z contains {n_bad} non-finite"):
                    _native._fsq_forward_cpp(z, levels)
                with pytest.raises(ValueError, match=f"z contains {n_bad} non-finite"):
                    _native._lfq_forward_cpp(zl)


def test_large_outputs_use_huge_page_buffers():
    """Outputs of 2 MiB and more come from 2 MiB-aligned HostBuffers that live as long as the tensor."""
    z = _z(1 << 16, 18)
    codes, idx = _native._lfq_forward_cpp(z)
    assert codes.data_ptr() % (2 << 20) == 0
    assert codes.untyped_storage().nbytes() >= codes.numel() * 4
    rc, ri = ref.lfq_forward(z)
    del z
    assert torch.equal(codes, rc) and torch.equal(idx, ri)  # still readable: the buffer is owned
    small, _ = _native._lfq_forward_cpp(_z(4, 18))
    assert small.shape == (4, 18)
    buf = _C.HostBuffer(3 << 20)
    assert buf.nbytes == 3 << 20
    t = torch.frombuffer(buf, dtype=torch.float32, count=(3 << 20) // 4)
    del buf
    t.fill_(2.0)
    assert float(t.sum()) == 2.0 * t.numel()
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        _C.HostBuffer(-1)


def test_host_buffers_are_recycled_within_the_cache_cap():
    _C.release_host_buffers()
    assert _C.host_buffer_cached_bytes() == 0
    a = _C.HostBuffer((5 << 20) + 1)  # 6 MiB mapped
    assert not a.recycled
    del a
    assert _C.host_buffer_cached_bytes() == 6 << 20
    b = _C.HostBuffer(6 << 20)  # same mapped size: recycled
    assert b.recycled and _C.host_buffer_cached_bytes() == 0
    c = _C.HostBuffer(8 << 20)  # another size: fresh
    assert not c.recycled
    del b, c
    big = [_C.HostBuffer(100 << 20) for _ in range(3)]  # 14 + 300 MiB freed: the cap evicts the oldest
    del big
    assert _C.host_buffer_cached_bytes() == 200 << 20
    _C.release_host_buffers()
    assert _C.host_buffer_cached_bytes() == 0


def test_lfq_backward_passes_the_gradient_through():
    """The straight-through LFQ backward is the identity: the incoming gradient tensor itself."""
    from vqtok.ops import lfq_quantize

    z = _z(4096, 18).requires_grad_()
    g = _z(4096, 18, seed=3)
    codes, _ = lfq_quantize(z, backend="cpp")
    (gz,) = torch.autograd.grad(codes, z, g)
    assert gz.data_ptr() == g.data_ptr()
