"""The cpp nearest-code kernel under every SIMD level this CPU has, in exact and certified fast
mode (with each bf16 scoring kernel the CPU has: AMX-BF16, AVX512-BF16), against the float64
oracle, plus the argument checks of its pybind11 binding."""

import pytest
import torch

from oracle import nearest_f64
from vqtok.ops import nearest_code
from vqtok.ops.dispatch import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("cpp") is not None, reason="cpp backend not built")

_LEVELS = ("scalar", "avx2", "avx512")


def _isa_levels():
    if unavailable_reason("cpp") is not None:
        return []
    from vqtok import _C

    best = _LEVELS.index(_C.detected_isa())
    return list(_LEVELS[: best + 1])


@pytest.fixture(params=_isa_levels() or ["none"])
def isa(request, monkeypatch):
    from vqtok import _C

    monkeypatch.setenv("VQTOK_ISA", request.param)
    assert _C.active_isa() == request.param  # the variable is read at call time
    return request.param


def _fast_kernels():
    """The certified fast mode's bf16 kernels this CPU runs (each is tested), or ["none"]."""
    if unavailable_reason("cpp") is not None:
        return ["none"]
    from vqtok import _C

    return list(_C.nearest_fast_kernels()) or ["none"]


@pytest.fixture(params=["exact"] + [f"fast-{k}" for k in _fast_kernels()])
def precision(request, monkeypatch):
    # the bf16 path even for the small shapes here (by default they run the fp32 kernel), with
    # each kernel this CPU has (AMX CPUs also have AVX512-BF16)
    monkeypatch.setenv("VQTOK_NEAREST_FAST", "always")
    if request.param == "exact":
        return "exact"
    monkeypatch.setenv("VQTOK_NEAREST_FAST_KERNEL", request.param.removeprefix("fast-"))
    return "fast"


def _fast_isa():
    from vqtok import _C

    return _C.nearest_fast_isa()


def _raw(x, c, fast=False):
    """Calls the binding directly: returns (idx, dist, rows re-decided, isa that ran)."""
    from vqtok import _C

    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
    x, c = x.contiguous(), c.contiguous()
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    dist = torch.empty(x.shape[0], dtype=torch.float32)
    redo, ran = _C.nearest_code_l2(
        x.data_ptr(), c.data_ptr(), x.shape[0], c.shape[0], x.shape[1], code, fast, idx.data_ptr(), dist.data_ptr()
    )
    return idx, dist, redo, ran


def _check(x, c, isa, precision="exact"):
    idx, dist = nearest_code(x, c, backend="cpp", precision=precision)
    ref_idx, ref_dist = nearest_f64(x.float(), c.float())
    bad = (idx != ref_idx).nonzero().squeeze(1)
    assert bad.numel() == 0, f"[{isa}] {bad.numel()} rows differ, e.g. rows {bad[:5].tolist()}: got {idx[bad[:5]].tolist()} want {ref_idx[bad[:5]].tolist()}"
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5 * (1 + ref_dist.abs().max().item()))
    return idx


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (9, 47, 33), (53, 1000, 8), (23, 700, 16), (17, 130, 257), (13, 65537, 2)])
def test_shapes(isa, precision, n, k, d):
    _check(torch.randn(n, d), torch.randn(k, d), isa, precision)


@pytest.mark.parametrize("k", [64 * 24, 64 * 24 + 1, 5000])
def test_both_lane_update_variants(isa, precision, k):
    # d=24 (rows packed at AVX-512): up to k = 64 d the lanes carry each code group's index,
    # above it the winning group of every improved row is recomputed afterwards, rows side by
    # side in fours (53 rows: a short last batch). Codes 5 / 21 / 37 / 53 are lane 5 of the four
    # groups of AVX-512's first 64-code chunk: rows near code 21 must get 21 (no tie), rows on
    # the duplicates of code 5 the lowest index, and the random rows the oracle's answer.
    d = 24
    c = torch.randn(k, d)
    c[37] = c[53] = c[5]
    x = torch.randn(53, d)
    x[:10] = c[21] + 1e-2 * torch.randn(10, d)
    x[10:20] = c[37] + 1e-3 * torch.randn(10, d)
    idx = _check(x, c, isa, precision)
    assert (idx[:10] == 21).all() and (idx[10:20] == 5).all()
    # a wrong recomputation would not change the answer (the row is then re-decided in the
    # direct form), only its cost: only the 10 rows on duplicates may be re-decided
    assert _raw(x, c)[2] == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 256])
def test_duplicate_codes_are_searched_once(isa, precision, dtype, d):
    # Exact duplicates (every code twice, and 100 zero codes as in an untouched codebook) tie
    # exactly, and the lowest index wins. When 64 rows or more are left to re-decide, the exact
    # search looks for duplicate codes and searches those rows again without the copies, so only
    # genuine near-ties are re-decided. In fast mode the 100 zero codes exceed a row's 64
    # candidates: those rows go to the exact search, copies set aside. Rows 32.. are small enough
    # to be nearest to the zero codes.
    k = 700
    c = torch.randn(k, d)
    c[1::2] = c[0::2]
    c[100:200] = 0.0
    x = 0.1 * torch.randn(96, d)
    pairs = 300 + 2 * torch.arange(32)
    x[:32] = c[pairs] + 1e-3 * torch.randn(32, d)
    x, c = x.to(dtype), c.to(dtype)
    idx = _check(x, c, isa, precision)
    assert (idx[:32] == pairs).all() and (idx[32:] == 100).all()
    assert _raw(x, c)[2] <= 2  # the exact search's re-decided rows (fast mode: the answer above)
    # with fewer than 64 rows to re-decide, the copies stay: the same answer, each tied row re-decided
    assert (_check(x[:40], c, isa, precision) == idx[:40]).all()
    assert _raw(x[:40], c)[2] >= 32


def _layout(n, k, d):
    from vqtok import _C

    return _C.nearest_layout(n, k, d)


def test_multi_panel_ties_across_panel_edge(isa, precision):
    # d=64 packs ~1 MiB of codes per panel (4096 or 4080 codes by the level's chunk width): K=9000
    # spans three panels; identical codes on both sides of each panel edge take the lower index
    k, d = 9000, 64
    p = _layout(37, k, d)["codes_per_panel"]
    assert 2 * p < k
    c = torch.randn(k, d)
    best = torch.randn(d)
    for i in (p - 1, p, 2 * p - 1, 2 * p):
        c[i] = best
    x = best + 1e-3 * torch.randn(37, d)
    idx = _check(x, c, isa, precision)
    assert (idx == p - 1).all()


@pytest.mark.parametrize("d", [8, 16, 40])
def test_ties_across_every_chunk_edge(isa, precision, d):
    # a copy of code m*w - 1 at m*w for every chunk edge m (w codes per chunk) up to 1600 codes,
    # which crosses the small-d kernels' L1 runs of the panel too; query m sits on its pair
    k = 1700
    w = _layout(64, k, d)["codes_per_chunk"]
    c = torch.randn(k, d)
    edges = list(range(w, 1600, w))
    for e in edges:
        c[e] = c[e - 1]
    x = torch.stack([c[e - 1] for e in edges]) + 1e-4 * torch.randn(len(edges), d)
    idx = _check(x, c, isa, precision)
    assert idx.tolist() == [e - 1 for e in edges]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_rows_over_super_blocks_and_panels(isa, dtype):
    # d=2048: small row blocks, ~128-code panels, and (past d=128 with several panels) rows packed
    # once per super-block of ~1000 rows; the rows x 300 codes cross both kinds of edge. Rows on
    # duplicated codes at the panel edges must take the lowest index, in either super-block.
    k, d = 300, 2048
    L = _layout(1100, k, d)
    p, mb, sb = L["codes_per_panel"], L["rows_per_block"], L["rows_per_super_block"]
    assert 2 * p < k and 0 < sb < 1100 and sb % mb == 0
    n = sb + 92
    c = torch.randn(k, d)
    for i in (p, 2 * p - 1, 2 * p):
        c[i] = c[p - 1]
    x = torch.randn(n, d)
    near = [0, mb - 1, mb, sb - 1, sb, n - 1]  # first/last rows of blocks and of both super-blocks
    x[near] = c[p - 1] + 1e-3 * torch.randn(len(near), d)
    x, c = x.to(dtype), c.to(dtype)
    idx = _check(x, c, isa)
    assert (idx[near] == p - 1).all()


def test_layout_binding():
    from vqtok import _C

    L = _layout(100, 5000, 32)
    assert L["codes_per_panel"] % L["codes_per_chunk"] == 0 and L["rows_per_block"] % L["rows_per_tile"] == 0
    assert L["rows_per_super_block"] == 0  # d <= 128
    small = _layout(3, 10, 8)  # fewer codes than a panel holds: one panel of whole chunks
    assert small["codes_per_panel"] == small["codes_per_chunk"] * -(-10 // small["codes_per_chunk"])
    with pytest.raises(ValueError, match="k >= 1"):
        _C.nearest_layout(5, 0, 8)


def test_distances_same_bits_at_every_isa(monkeypatch):
    """The winner's direct-form distance runs the same operations (sixteen partial sums, no FMA)
    at every SIMD level, so every CPU returns the same distance bits."""
    levels = _isa_levels()
    if len(levels) < 2:
        pytest.skip("one SIMD level on this machine")
    g = torch.Generator().manual_seed(5)
    outs = {}
    for d in (5, 8, 16, 29, 37, 300):  # below, at and past the 8- and 16-wide steps, with tails
        x, c = torch.randn(500, d, generator=g) * 3, torch.randn(70, d, generator=g) * 3
        for level in levels:
            monkeypatch.setenv("VQTOK_ISA", level)
            outs.setdefault(d, []).append(_raw(x, c)[:2])
        for idx, dist in outs[d][1:]:
            assert torch.equal(idx, outs[d][0][0]) and torch.equal(dist, outs[d][0][1]), d


def test_near_ties_are_redecided(isa, precision):
    # integer grids tie exactly in fp32 scores: every such row must go through the re-decision
    # (more rows than one re-decision block, so several blocks run)
    x = torch.randint(-2, 3, (150, 5)).float()
    c = torch.randint(-2, 3, (300, 5)).float()
    _check(x, c, isa, precision)
    _, _, redo, ran = _raw(x, c)
    assert ran == isa and redo > 40  # the exact mode re-decides them


def test_large_offset_and_huge_values(isa, precision):
    x = 1000 + torch.randn(40, 32)
    c = 1000 + torch.randn(90, 32)
    _check(x, c, isa, precision)
    # values past the range the fp32 bound covers take the plain direct-form scan
    x2, c2 = torch.randn(5, 3) * 5e17, torch.randn(20, 3) * 5e17
    c2[0, 0] = 2e18
    _check(x2, c2, isa, precision)
    assert _raw(x2, c2)[2] == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(isa, precision, dtype):
    x, c = torch.randn(41, 19).to(dtype), torch.randn(333, 19).to(dtype)
    c[7] = c[300]  # a duplicate pair: the lower index wins
    x[0] = c[300]
    idx = _check(x, c, isa, precision)
    assert idx[0] == 7


def _clustered(d=16, k=2048, n=3000, seed=0):
    """Codes dense around the latents (a trained codebook) plus one far code that sets max |c|:
    the 2E test's bound is orders of magnitude above a typical row's own; rows sit near codes,
    200 of them on near-bisectors of code pairs."""
    g = torch.Generator().manual_seed(seed)
    c = 0.03 * torch.randn(k, d, generator=g)
    c[k // 2] = 60.0 / d**0.5  # norm 60
    pick = torch.randint(0, k, (n,), generator=g)
    x = c[pick] + 0.01 * torch.randn(n, d, generator=g)
    # near-bisectors of close pairs: ties within and just past the sharper test's reach
    a, b = torch.randint(0, k // 2, (2, 200), generator=g)
    b = torch.where(a == b, a + 1, b)
    t = 0.5 + torch.logspace(-7, -2, 200).mul(torch.where(torch.rand(200, generator=g) < 0.5, -1, 1))
    x[:200] = c[a] + t[:, None] * (c[b] - c[a])
    x[200] = c[3]  # exactly on a code, with a rival 1e-4 away
    c[4] = c[3] + 1e-4
    return x, c


def test_sharper_certificate_gives_the_oracle_answer(isa):
    # the per-row test certifies most rows the 2E test would re-decide; every answer is still the
    # float64 oracle's (several seeds, d with and without packed rows, a large offset)
    for seed, d, off in ((0, 16, 0.0), (1, 16, 0.0), (2, 40, 0.0), (3, 8, 100.0)):
        x, c = _clustered(d=d, seed=seed)
        _check(x + off, c + off, isa)


def test_sharper_certificate_redecides_fewer_rows(isa, monkeypatch):
    x, c = _clustered()
    idx, dist, redo, ran = _raw(x, c)
    monkeypatch.setenv("VQTOK_NEAREST_REFINE", "0")  # the 2E test alone
    idx0, dist0, redo0, _ = _raw(x, c)
    assert ran == isa and torch.equal(idx, idx0) and torch.equal(dist, dist0)
    # only the nearest ties among the 200 near-bisector rows are left to re-decide, against most
    # rows without it
    assert redo0 > 2000 and redo < 100, (redo, redo0)


def test_fast_mode_gives_the_exact_answer(isa, fast_always):
    x, c = torch.randn(64, 24), torch.randn(500, 24)
    _check(x, c, isa, precision="fast")
    ran = _raw(x, c, fast=True)[3]
    assert ran == (fast_always if isa == "avx512" and fast_always != "none" else isa)


def test_fast_kernel_choice_follows_the_environment(monkeypatch):
    from vqtok import _C

    kernels = _C.nearest_fast_kernels()
    assert set(kernels) <= {"amx-bf16", "avx512-bf16"}
    assert _C.build_info()["avx512_bf16"] == ("avx512-bf16" in kernels)
    monkeypatch.delenv("VQTOK_ISA", raising=False)
    monkeypatch.delenv("VQTOK_NEAREST_FAST_KERNEL", raising=False)
    assert _fast_isa() == (kernels[0] if kernels else "")  # AMX first where both run
    for name in kernels:
        monkeypatch.setenv("VQTOK_NEAREST_FAST_KERNEL", name)
        assert _fast_isa() == name
    monkeypatch.setenv("VQTOK_NEAREST_FAST_KERNEL", "no-such-kernel")
    assert _fast_isa() == ""
    monkeypatch.setenv("VQTOK_NEAREST_FAST", "always")
    x, c = torch.randn(5, 8), torch.randn(70, 8)
    assert _raw(x, c, fast=True)[3] == _C.active_isa()  # no kernel: the exact path
    monkeypatch.delenv("VQTOK_NEAREST_FAST_KERNEL")
    monkeypatch.setenv("VQTOK_ISA", "avx2")
    assert _fast_isa() == ""


@pytest.fixture(params=_fast_kernels())
def fast_always(request, monkeypatch):
    monkeypatch.setenv("VQTOK_NEAREST_FAST", "always")
    if request.param != "none":
        monkeypatch.setenv("VQTOK_NEAREST_FAST_KERNEL", request.param)
    return request.param


def _need_fast(isa):
    if isa != "avx512" or not _fast_isa():
        pytest.skip("no certified fast kernel at this level (the fast mode runs the exact path)")


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (33, 65, 3), (70, 200, 17), (40, 100, 33), (37, 300, 64), (20, 90, 257)])
def test_fast_tile_shapes(isa, fast_always, n, k, d):
    # odd d (a zero feature pads the last bf16 pair), d2 > 16 padded to whole tile steps, rows and
    # codes not multiples of the 16-row tile, the 32-code step or the 64-code chunk
    _need_fast(isa)
    x, c = torch.randn(n, d), torch.randn(k, d)
    _check(x, c, isa, "fast")
    assert _raw(x, c, fast=True)[2] == 0  # certified without the exact fallback


def test_fast_duplicates_across_step_chunk_and_panel_edges(isa, fast_always):
    # d=8 packs 32768 codes per panel: copies of one code at both sides of a 32-code step, a
    # 64-code chunk and the panel edge all land inside the bf16 band; the lowest index wins
    _need_fast(isa)
    k, d = 33000, 8
    c = torch.randn(k, d) * 3
    best = torch.randn(d)
    for p in (31, 32, 63, 64, 32767, 32768):
        c[p] = best
    x = best + 1e-3 * torch.randn(50, d)
    idx = _check(x, c, isa, "fast")
    assert (idx == 31).all()


def test_fast_overflowing_candidates_take_the_exact_path(isa, fast_always):
    # 100 identical nearest codes: more than the 64 candidates a row keeps, so the rows go to
    # the exact search; the answer is still the lowest index
    _need_fast(isa)
    c = torch.randn(500, 12)
    c[200:300] = c[123]
    x = c[123] + 1e-4 * torch.randn(30, 12)
    idx, _, sent, ran = _raw(x, c, fast=True)
    assert ran == _fast_isa() and sent == 30
    assert (idx == 123).all()
    _check(x, c, isa, "fast")


def test_fast_mode_picks_the_kernel_by_size(isa, monkeypatch):
    _need_fast(isa)
    monkeypatch.delenv("VQTOK_NEAREST_FAST", raising=False)
    x = torch.randn(20, 8)
    assert _raw(x, torch.randn(1024, 8), fast=True)[3] == "avx512"  # k d^2 < 2^19: the fp32 kernel
    assert _raw(x, torch.randn(8192, 8), fast=True)[3] == _fast_isa()
    assert _raw(x[:, :7], torch.randn(1024, 7), fast=False)[3] == "avx512"


def test_fast_many_rows_in_super_blocks(isa, fast_always):
    # d=256 keeps ~5k rows of candidate state at a time: 6000 rows need two super-blocks
    _need_fast(isa)
    x, c = torch.randn(6000, 256), torch.randn(40, 256)
    _check(x, c, isa, "fast")


def test_tiny_scale(isa, precision):
    _check(torch.randn(30, 12) * 1e-20, torch.randn(80, 12) * 1e-20, isa, precision)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=-1), "n \\(rows of x\\) must be >= 0"),
        (dict(k=0), "k \\(codes\\) must be in \\[1, 2\\^31\\)"),
        (dict(k=2**31), "k \\(codes\\) must be in"),
        (dict(d=0), "d \\(feature dim\\) must be in"),
        (dict(dtype=3), "dtype code must be 0 \\(float32\\), 1 \\(float16\\) or 2 \\(bfloat16\\), got 3"),
        (dict(codebook=0), "codebook pointer is null"),
        (dict(x=0), "x, out_idx and out_dist pointers must be non-null"),
        (dict(out_idx=0), "x, out_idx and out_dist pointers must be non-null"),
    ],
)
def test_binding_rejects_bad_arguments(kwargs, match):
    from vqtok import _C

    x, c = torch.randn(4, 3), torch.randn(5, 3)
    idx, dist = torch.empty(4, dtype=torch.int64), torch.empty(4)
    args = dict(x=x.data_ptr(), codebook=c.data_ptr(), n=4, k=5, d=3, dtype=0, fast=False,
                out_idx=idx.data_ptr(), out_dist=dist.data_ptr())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        _C.nearest_code_l2(**args)


def test_backend_rejects_mismatched_dtypes():
    from vqtok.ops.dispatch import resolve

    impl = resolve("nearest_code_l2", "cpp", torch.device("cpu"))
    with pytest.raises(TypeError, match="one dtype"):
        impl(torch.randn(3, 2), torch.randn(4, 2, dtype=torch.float64), "exact")


def test_duplicates_in_sibling_groups_are_redecided(isa, precision):
    # codes 5, 13 and 21 sit in the same lane of neighbouring SIMD groups (W = 8 or 16): the
    # kernel keeps one minimum per lane, so the certificate must still see the duplicate
    c = torch.randn(64, 8) * 2
    c[13] = c[5]
    c[21] = c[5]
    x = c[5] + 1e-3 * torch.randn(20, 8)
    idx = _check(x, c, isa, precision)
    assert (idx == 5).all()
    assert _raw(x, c)[2] == x.shape[0]  # every row has an exact tie: all re-decided


def test_norms_past_fp32_range(isa, precision):
    # |c|^2 ~ 2000 * (5e17)^2 overflows fp32 although every value and every distance fits: the
    # search must still be exact (these rows take the direct-form path)
    c = torch.randn(10, 2000) * 5e17
    x = c[[3, 7, 3]] + 1e15 * torch.randn(3, 2000)
    idx = _check(x, c, isa, precision)
    assert idx.tolist() == [3, 7, 3]
