"""Triton-specific paths: multi-tile and split-K launches, strides, the fast-mode certificate on
adversarial data, FSQ/LFQ edge cases. On a CPU-only machine these run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1); GPU-only cases are marked and skip with a reason."""

import math

import pytest
import torch

from oracle import nearest_f64
from vqtok.ops import reference as ref
from vqtok.ops.dispatch import unavailable_reason

_why = unavailable_reason("triton")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"triton backend unavailable: {_why}")

if _why is None:
    from vqtok.ops.triton import _certify, fsq, lfq, nearest

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _search_matches_oracle(x, c, precision, **kw):
    stats = {}
    idx, dist = nearest.search(x.to(DEV), c.to(DEV), precision, stats=stats, **kw)
    ref_idx, ref_dist = nearest_f64(x.float(), c.float())
    bad = (idx.cpu() != ref_idx).nonzero().squeeze(1)
    assert bad.numel() == 0, f"{precision} {kw}: {bad.numel()} rows differ, e.g. {bad[:5].tolist()}"
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-5, atol=1e-5 * (1 + ref_dist.max().item()))
    return stats


# ----------------------------------------------------------------------------------------------
# launch shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["exact", "fast"])
@pytest.mark.parametrize("split_k", [None, 3, 16])
def test_multi_tile_and_split_k(precision, split_k):
    # small blocks: 3 row tiles x 13 code tiles; split-K merges up to 13 partial lists per row
    x, c = torch.randn(40, 19), torch.randn(410, 19)
    _search_matches_oracle(x, c, precision, block_n=16, block_k=32, split_k=split_k)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_duplicates_across_tiles_and_splits(precision):
    # the same best code at both ends of a tile edge and of a split edge: lowest index wins
    c = torch.randn(256, 8) * 3
    best = torch.randn(8)
    for p in (31, 32, 127, 128, 200):
        c[p] = best
    x = best[None] + 1e-3 * torch.randn(20, 8)
    stats = _search_matches_oracle(x, c, precision, block_n=16, block_k=32, split_k=4)
    assert stats[f"redo_{precision}"] > 0  # exact ties are never certified: they are re-decided
    idx, _ = nearest.search(x, c, precision, block_k=32, split_k=4)
    assert (idx == 31).all()


def test_feature_dim_past_one_chunk():
    # D = 300 > BLOCK_D: the dot accumulates over several masked D chunks (fast: one bf16 MMA)
    x, c = torch.randn(9, 300), torch.randn(70, 300)
    _search_matches_oracle(x, c, "exact")
    _search_matches_oracle(x, c, "fast")
    _search_matches_oracle(x, c, "fast", operands="bf16x3")


def test_topk_knob_and_validation():
    x, c = torch.randn(33, 12), torch.randn(100, 12)
    for t, op in ((1, "bf16x3"), (2, "bf16"), (8, "bf16")):
        _search_matches_oracle(x, c, "fast", topk=t, operands=op)
    with pytest.raises(ValueError, match="topk must be a power of two"):
        nearest.search(x, c, "fast", topk=3)
    with pytest.raises(ValueError, match="precision"):
        nearest.search(x, c, "bf16")
    with pytest.raises(ValueError, match="operands"):
        nearest.search(x, c, "fast", operands="fp8")


def test_autotune_configs_fit_the_shape():
    cfgs = nearest.autotune_configs(100, 50, 8)
    assert cfgs and all(cf.kwargs["BLOCK_N"] <= 128 and cf.kwargs["BLOCK_K"] <= 64 for cf in cfgs)
    big = nearest.autotune_configs(1 << 18, 1 << 16, 256)
    assert {cf.kwargs["BLOCK_N"] for cf in big} == {64, 128}
    assert all(cf.kwargs["BLOCK_K"] <= 128 for cf in big)  # large D: smaller code tiles


# ----------------------------------------------------------------------------------------------
# strides and offsets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_strided_inputs_are_not_copied(precision):
    base = torch.randn(80, 64)
    x = base[::2, 1::3]  # row stride 128, column stride 3
    c = torch.randn(21, 150).t()  # [150, 21] column-major
    c_rep = torch.randn(1, 21).expand(40, 21)  # stride 0 between codes: all ties -> index 0
    assert x.stride() == (128, 3) and c.stride() == (1, 150)
    _search_matches_oracle(x, c, precision)
    idx, _ = nearest.search(x, c_rep, precision)
    assert (idx == 0).all()


def test_int64_offsets_in_split_merge():
    # the split reduction addresses split * N + row: checked here with many splits on few rows
    x, c = torch.randn(3, 4), torch.randn(800, 4)
    _search_matches_oracle(x, c, "exact", block_k=16, split_k=50)


@needs_gpu
@pytest.mark.gpu
def test_int64_offsets_past_2_31_elements():
    # x holds > 2^31 elements: row offsets overflow int32 unless computed in int64
    n, d = (1 << 22) + 3, 512
    x = torch.zeros(n, d, dtype=torch.float16, device="cuda")
    c = torch.randn(300, d, device="cuda").half()
    x[-1] = c[123]
    x[-2] = c[7]
    idx, _ = nearest.search(x, c, "exact")
    assert idx[-1].item() == 123 and idx[-2].item() == 7


# ----------------------------------------------------------------------------------------------
# certified fast mode on adversarial data
# ----------------------------------------------------------------------------------------------
def _near_tie_data(n=64, k=512, d=16):
    """Codes in pairs that differ below bf16 resolution, and rows between the two of a pair."""
    torch.manual_seed(1)
    base = torch.randn(k // 2, d)
    eps = torch.randn(k // 2, d) * 1e-5
    c = torch.stack([base + eps, base - eps], 1).reshape(k, d)
    pick = torch.randint(0, k // 2, (n,))
    x = base[pick] + 0.3 * eps[pick] + 1e-5 * torch.randn(n, d)
    return x, c


@pytest.mark.parametrize("operands", ["bf16", "bf16x3"])
def test_fast_mode_near_ties_are_exact(operands):
    x, c = _near_tie_data()
    # one candidate: the twin code is evicted within the error bound, so the row is re-decided
    stats = _search_matches_oracle(x, c, "fast", topk=1, operands=operands)
    assert stats["redo_fast"] > 0
    # four candidates: both twins are kept and the float64 re-scoring separates them
    _search_matches_oracle(x, c, "fast", topk=4, operands=operands)


def test_fast_mode_large_offsets_and_duplicates():
    torch.manual_seed(2)
    x = 1000 + torch.randn(80, 32)
    c = 1000 + torch.randn(300, 32)
    c[100] = c[7]  # duplicate code: index 7 must win wherever it is the nearest
    x[:5] = c[7]
    _search_matches_oracle(x, c, "fast")


def test_fast_mode_certifies_well_separated_rows():
    # clear nearest codes: the certificate must accept them (no wasted exact re-search)
    torch.manual_seed(3)
    c = torch.randn(1000, 24)
    x = c[torch.randint(0, 1000, (100,))] + 1e-3 * torch.randn(100, 24)
    stats = _search_matches_oracle(x, c, "fast")
    assert stats["redo_fast"] == 0


def test_certificate_is_what_makes_fast_mode_exact(monkeypatch):
    # with the error bound zeroed, the same adversarial data yields wrong codes: the data really
    # defeats bf16 ranking, and the certificate (not luck) is what keeps the answer exact
    x, c = _near_tie_data()
    ref_idx, _ = nearest_f64(x, c)
    def zero(x, cn, operands, inputs_bf16=False):
        z = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return z, z

    monkeypatch.setattr(_certify, "row_bounds", zero)
    idx, _ = nearest.search(x, c, "fast", topk=1, operands="bf16")
    assert (idx != ref_idx).any()


def test_bounds_cover_observed_fp32_error():
    # the exact-mode bound is an upper bound of the kernel's actual score error
    torch.manual_seed(4)
    x, c = 50 + torch.randn(40, 64), 50 + torch.randn(200, 64)
    cn = c.square().sum(1)
    s64 = c.double().square().sum(1)[None] - 2 * (x.double() @ c.double().t())

    def observed(xs, cs):  # the score error of fp32 products of xs, cs against float64
        return ((cn[None] - 2 * (xs @ cs.t())).double() - s64).abs().amax(1)

    b16 = lambda t: t.bfloat16().float()  # noqa: E731
    err = {op: _certify.row_bounds(x, cn, op)[0] for op in _certify.OPERANDS}
    assert (observed(x, c) <= err["fp32"]).all()
    assert (observed(b16(x), b16(c)) <= err["bf16"]).all()
    xh, ch = b16(x), b16(c)
    x3 = torch.cat([xh, xh, b16(x - xh)], 1)
    c3 = torch.cat([ch, b16(c - ch), ch], 1)
    assert (observed(x3, c3) <= err["bf16x3"]).all()
    assert (err["fp32"] < err["bf16x3"]).all() and (err["bf16x3"] < err["bf16"] / 50).all()
    with pytest.raises(ValueError, match="operands"):
        _certify.row_bounds(x, cn, "fp16")


# ----------------------------------------------------------------------------------------------
# FSQ / LFQ kernels
# ----------------------------------------------------------------------------------------------
def test_fsq_forward_bit_exact_on_many_values():
    torch.manual_seed(5)
    levels = [8, 5, 5, 5, 7, 2]
    z = torch.randn(60000, 6) * 3
    z[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])  # zeros, subnormal-ish, saturation
    codes, idx = fsq.fsq_forward(z.to(DEV), levels)
    rc, ri = ref.fsq_forward(z.to(DEV), levels)
    assert torch.equal(codes.cpu(), rc.cpu()) and torch.equal(idx.cpu(), ri.cpu())
    # the sign of zero follows the reference's round()
    assert torch.equal(torch.signbit(codes.cpu()), torch.signbit(rc.cpu()))


def test_fsq_backward_and_decode():
    levels = [4, 3, 2**16 + 1, 2**16]  # prod >= 2^31: int64 indices, int64 decode arithmetic
    z = torch.randn(3000, 4) * 2
    g = torch.randn(3000, 4)
    # error against float64 at most 2x torch's own (1 - tanh^2 amplifies tanh's last ulp)
    hl, _, shift, hw = ref.fsq_constants(levels, dtype=torch.float64)
    truth = g.double() * (1 - torch.tanh(z.double() + shift.float().double()) ** 2) * (hl / hw)
    err_triton = (fsq.fsq_backward(g, z, levels).double() - truth).abs().max()
    err_torch = (ref.fsq_backward(g, z, levels).double() - truth).abs().max()
    assert err_triton <= 2 * err_torch + 1e-12
    codes, idx = fsq.fsq_forward(z, levels)
    assert idx.dtype == torch.int64 and int(idx.max()) < math.prod(levels)
    assert torch.equal(fsq.fsq_indices_to_codes(idx, levels), codes)
    assert torch.equal(fsq.fsq_indices_to_codes(idx.to(torch.int64), levels), ref.fsq_indices_to_codes(idx, levels))


def test_lfq_sign_of_zero_and_62_bits():
    z = torch.randn(500, 62)
    z[0] = 0.0
    z[1] = -0.0
    z[2, :] = 1e-40  # subnormal positives are > 0
    codes, idx = lfq.lfq_forward(z.to(DEV))
    rc, ri = ref.lfq_forward(z.to(DEV))
    assert torch.equal(codes.cpu(), rc.cpu()) and torch.equal(idx.cpu(), ri.cpu())
    assert idx[0] == 0 and idx[1] == 0 and idx[2] == 2**62 - 1


def test_empty_inputs():
    codes, idx = fsq.fsq_forward(torch.empty(0, 3), [3, 3, 3])
    assert codes.shape == (0, 3) and idx.shape == (0,)
    codes, idx = lfq.lfq_forward(torch.empty(0, 5))
    assert codes.shape == (0, 5) and idx.shape == (0,)


# ----------------------------------------------------------------------------------------------
# GPU only: Triton against the other GPU backends at sizes the interpreter cannot afford
# ----------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [8, 32, 256])
def test_gpu_large_matches_oracle(d):
    x = torch.randn(4096, d, device="cuda")
    c = torch.randn(8192, d, device="cuda")
    for precision in ("exact", "fast"):
        idx, _ = nearest.search(x, c, precision)
        ref_idx, _ = ref.nearest_code_l2(x, c)
        assert torch.equal(idx, ref_idx)


# ----------------------------------------------------------------------------------------------
# the GPU benchmark's measurement code, run at a tiny size on this device
# ----------------------------------------------------------------------------------------------
def test_gpu_bench_rows_and_roofline():
    from vqtok.bench import gpu

    rows = gpu.measure(gpu.GpuBenchConfig.tiny(), DEV, progress=False)
    assert [r["method"] for r in rows] == ["triton_exact", "triton_fast", "torch_addmm"]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["agree"] == 1.0
        assert r["pairs_per_s"] == pytest.approx(512 * 300 / (r["ms"] * 1e-3))
    assert "redo_fast" in rows[1] and "redo_exact" in rows[0]
    # D = 8: the fast path is epilogue-bound; D = 256: GEMM-bound (bf16 tensor cores)
    n, k = 1 << 18, 65536
    assert gpu.roofline_pairs_per_s("triton_fast", n, k, 8) == pytest.approx(gpu.R_CORE / gpu.C_EPI)
    assert gpu.roofline_pairs_per_s("triton_fast", n, k, 256) == pytest.approx(989e12 / 512)
    assert gpu.roofline_pairs_per_s("triton_exact", n, k, 256) == pytest.approx(gpu.R_CORE / 260)


# ----------------------------------------------------------------------------------------------
# the kernels compile for the GPU (sm_90 / sm_80) even on a machine without one
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from vqtok.ops.triton import fsq, lfq, nearest

def build(fn, types, consts, arch=90, **opts):
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts).asm["ptx"]

f32, s64 = "*fp32", {f"stride_{a}": "i64" for a in ("xn", "xd", "ck", "cd")}
st = {"x_ptr": "*fp32", "c_ptr": "*fp32", "cn_ptr": f32, "out_v_ptr": f32, "out_i_ptr": "*i32", "out_e_ptr": f32,
      **s64}
meta = {"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 64, "INTERPRET": False}
out = {
    "exact90": build(nearest._search_kernel, st, {**meta, "TOPK": 1, "MODE": 0}, num_warps=8),
    "fast90": build(nearest._search_kernel, st, {**meta, "TOPK": 4, "MODE": 1}, num_warps=8),
    "fast80": build(nearest._search_kernel, st, {**meta, "TOPK": 2, "MODE": 2}, arch=80, num_warps=8),
    "merge": build(nearest._merge_splits_kernel, {"v_ptr": f32, "i_ptr": "*i32", "e_ptr": f32, "out_v_ptr": f32,
                   "out_i_ptr": "*i32", "out_e_ptr": f32}, {"BLOCK_N": 64, "TOPK": 4}),
    "fsq": build(fsq._fsq_fwd_kernel, {"z_ptr": f32, "hl_ptr": f32, "off_ptr": f32, "shift_ptr": f32, "hw_ptr": f32,
                 "basis_ptr": "*i64", "codes_ptr": f32, "idx_ptr": "*i32"},
                 {"BLOCK_M": 256, "BLOCK_D": 8, "INTERPRET": False}, enable_fp_fusion=False),
}
info = {k: {"mma": "mma" in v, "div_rn": "div.rn.f32" in v, "approx_tanh": "tanh.approx" in v} for k, v in out.items()}
json.dump(info, sys.stdout)
"""


@pytest.mark.slow
def test_kernels_compile_for_gpu_with_the_intended_precision():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas to compile Triton kernels for the GPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert not info["exact90"]["mma"]  # exact: fp32 FMA on CUDA cores, no TF32 tensor cores
    assert info["fast90"]["mma"] and info["fast80"]["mma"]  # fast: bf16 tensor cores
    assert info["fsq"]["div_rn"] and not info["fsq"]["approx_tanh"]  # IEEE division, libdevice (not approx) tanh
