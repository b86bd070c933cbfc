"""FSQ and LFQ ops on every backend: the paper's semantics, exact round trips, gradients."""

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqtok.ops import fsq_indices_to_codes, fsq_quantize, lfq_indices_to_codes, lfq_quantize

LEVEL_SETS = [[2, 2, 2], [3, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5], [4, 4, 4, 4, 4, 4]]


def paper_fsq(z, levels, eps=1e-3):
    """Independent float64 transcription of the FSQ bound (atanh shift; L=2 split at zero)."""
    z = z.double()
    out = []
    for i, lv in enumerate(levels):
        half_l = (lv - 1) * (1 - eps) / 2
        offset = 0.5 if lv % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l) if offset < half_l else 0.0
        out.append(torch.tanh(z[..., i] + shift) * half_l - offset)
    bound = torch.stack(out, -1)
    q = torch.round(bound)
    return q, bound


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_matches_paper(backend, device, levels):
    z = torch.randn(500, len(levels)) * 2
    codes, idx = fsq_quantize(z.to(device), levels, backend=backend)
    q, _ = paper_fsq(z, levels)
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)
    torch.testing.assert_close(codes.cpu(), (q / half_width).float(), rtol=0, atol=0)
    digits = (q + half_width).long()
    basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    assert torch.equal(idx.cpu().long(), (digits * basis).sum(-1))
    assert idx.dtype == torch.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < math.prod(levels)


def test_fsq_round_half_to_even(backend, device):
    # choose z so that bound lands exactly on x.5 for odd L=5: bound = tanh(z) * half_l
    levels = [5]
    half_l = 4 * (1 - 1e-3) / 2
    targets = torch.tensor([0.5, 1.5, -0.5, -1.5], dtype=torch.float32)
    z = torch.atanh((targets / half_l).double()).float()
    # nudge z until the fp32 bound is exactly the half-integer (the backend computes in fp32)
    for i in range(len(z)):
        for _ in range(64):
            b = torch.tanh(z[i : i + 1].double()).float() * torch.tensor(half_l, dtype=torch.float32)
            if b.item() == targets[i].item():
                break
            z[i] = torch.nextafter(z[i], torch.tensor(float("inf") if b.item() < targets[i] else -float("inf")))
    codes, _ = fsq_quantize(z[:, None].to(device), levels, backend=backend)
    b = torch.tanh(z.double()).float() * torch.tensor(half_l, dtype=torch.float32)  # spec: tanh rounded once
    expect = torch.round(b) / 2  # torch.round is half-to-even
    exact = b == targets
    assert exact.any(), "could not construct an exact half-integer bound"
    assert torch.equal(codes.cpu()[:, 0][exact], expect[exact])
    assert set(torch.round(b[exact]).tolist()) <= {0.0, 2.0, -2.0}


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_every_code_round_trips(backend, device, levels):
    n = math.prod(levels)
    all_idx = torch.arange(n, device=device)
    codes = fsq_indices_to_codes(all_idx, levels, backend=backend)
    # quantizing the codes' pre-images gives back every index exactly
    half_l = torch.tensor([(lv - 1) * (1 - 1e-3) / 2 for lv in levels])
    offset = torch.tensor([0.5 if lv % 2 == 0 else 0.0 for lv in levels])
    half_width = torch.tensor([lv // 2 for lv in levels], dtype=torch.float32)
    shift = torch.where(offset < half_l, torch.atanh(offset / half_l), torch.zeros_like(half_l))
    target = codes.cpu() * half_width + offset  # tanh(z + shift) * half_l = q + offset
    z = torch.atanh((target / half_l).clamp(-0.999999, 0.999999)) - shift
    c2, idx2 = fsq_quantize(z.to(device), levels, backend=backend)
    assert torch.equal(idx2.cpu().long(), all_idx.cpu())
    assert torch.equal(c2.cpu(), codes.cpu())
    assert torch.equal(fsq_indices_to_codes(idx2, levels, backend=backend).cpu(), codes.cpu())


def test_fsq_int64_indices_past_2_31(backend, device):
    levels = [2**16, 2**16 + 1]  # prod >= 2^31
    z = torch.randn(100, 2) * 3
    codes, idx = fsq_quantize(z.to(device), levels, backend=backend)
    assert idx.dtype == torch.int64
    assert int(idx.max()) < math.prod(levels)
    assert torch.equal(fsq_indices_to_codes(idx, levels, backend=backend).cpu(), codes.cpu().float())


def test_fsq_gradient_straight_through(backend, device):
    levels = [8, 5, 5]
    z = (torch.randn(64, 3) * 1.5).to(device).requires_grad_()
    codes, _ = fsq_quantize(z, levels, backend=backend)
    g = torch.randn_like(codes)
    (codes * g).sum().backward()
    _, bound = paper_fsq(z.detach().cpu(), levels)
    zz = z.detach().cpu().double().requires_grad_()
    _, b2 = paper_fsq(zz, levels)
    hw = torch.tensor([lv // 2 for lv in levels], dtype=torch.float64)
    ((b2 / hw) * g.cpu().double()).sum().backward()
    torch.testing.assert_close(z.grad.cpu().double(), zz.grad, rtol=1e-5, atol=1e-6)


def test_backward_fills_no_zero_index_gradient(backend, device):
    """The integer indices never get a gradient; autograd must not build an [M] zero tensor for
    it on every step (ctx.set_materialize_grads(False) in the ops' autograd setup)."""
    from torch.profiler import profile

    z = torch.randn(4096, 4, device=device, requires_grad=True)
    for quantize in (lambda t: fsq_quantize(t, [8, 5, 5, 5], backend=backend), lambda t: lfq_quantize(t, backend=backend)):
        codes, _ = quantize(z)
        g = torch.randn_like(codes)
        with profile(record_shapes=True) as prof:
            (grad,) = torch.autograd.grad(codes, z, g)
        assert grad.shape == z.shape
        fills = [(e.name, e.input_shapes) for e in prof.events()
                 if e.name in ("aten::zeros", "aten::zero_", "aten::fill_") and [4096] in e.input_shapes]
        assert not fills, fills


def _op_events(fn):
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("vqtok::")}


def test_eager_calls_match_the_registered_ops(backend, device):
    """In eager mode the ops call the backend's functions directly (``_Direct``), not through the
    ``torch.library`` custom op; codes, indices and gradients equal the registered op's."""
    levels = [8, 5, 5, 5]
    for op, bits in (("fsq_forward", None), ("lfq_forward", 12)):
        z = (torch.randn(3, 50, bits or len(levels)) * 1.5).to(device)
        quantize = (lambda t: lfq_quantize(t, backend=backend)) if bits else (
            lambda t: fsq_quantize(t, levels, backend=backend))
        args = () if bits else (levels,)
        z1, z2 = z.clone().requires_grad_(), z.reshape(-1, z.shape[-1]).clone().requires_grad_()
        g = torch.randn_like(z)
        seen = _op_events(lambda: torch.autograd.grad(quantize(z1)[0], z1, g))
        assert f"vqtok::{op}" not in seen, seen
        codes, idx = quantize(z1)
        ref_codes, ref_idx = getattr(torch.ops.vqtok, op)(z2, *args, backend)
        assert torch.equal(codes.reshape(-1, z.shape[-1]), ref_codes) and torch.equal(idx.reshape(-1), ref_idx)
        (grad,) = torch.autograd.grad(codes, z1, g)
        (ref_grad,) = torch.autograd.grad(ref_codes, z2, g.reshape(-1, z.shape[-1]))
        assert torch.equal(grad.reshape(-1, z.shape[-1]), ref_grad)
        with torch.no_grad():  # no autograd node: the forward function alone
            assert torch.equal(quantize(z1)[1], idx)
        assert not quantize(z1.detach())[0].requires_grad


def test_fsq_bf16_indices_exact(backend, device):
    levels = [8, 8, 8, 5, 5, 5]  # 64000 codes: bf16 cannot hold these indices
    z = torch.randn(2000, 6)
    _, i32 = fsq_quantize(z.to(device), levels, backend=backend)
    _, i16 = fsq_quantize(z.to(torch.bfloat16).float().to(device), levels, backend=backend)
    _, ib = fsq_quantize(z.to(torch.bfloat16).to(device), levels, backend=backend)
    assert torch.equal(ib.cpu(), i16.cpu())
    assert len(torch.unique(i32)) > 1000


@pytest.mark.parametrize(
    "levels,match",
    [([], "must not be empty"), ([1, 5], r"levels\[0\] must be >= 2"), ([3, 2.5], r"levels\[1\] must be an int"), ("88", "sequence")],
)
def test_fsq_bad_levels(levels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fsq_quantize(torch.randn(4, 2), levels)


def test_fsq_bad_z():
    with pytest.raises(ValueError, match="last dim 3"):
        fsq_quantize(torch.randn(4, 2), [3, 3, 3])
    with pytest.raises(ValueError, match="non-finite"):
        fsq_quantize(torch.tensor([[float("nan"), 0.0]]), [3, 3])
    with pytest.raises(TypeError, match="floating-point"):
        fsq_quantize(torch.ones(4, 2, dtype=torch.int64), [3, 3])


# ----------------------------------------------------------------------------------------------
# LFQ
# ----------------------------------------------------------------------------------------------
def test_lfq_bit_order_lsb_first(backend, device):
    z = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 2.0], [0.5, 0.5, 0.5], [0.0, -0.0, -3.0]])
    codes, idx = lfq_quantize(z.to(device), backend=backend)
    assert idx.cpu().tolist() == [1, 2, 4, 7, 0]  # z == 0 is bit 0 / code -1
    assert codes.cpu()[4].tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize("bits", [1, 5, 10, 18, 31, 40])
def test_lfq_round_trip(backend, device, bits):
    z = torch.randn(300, bits)
    codes, idx = lfq_quantize(z.to(device), backend=backend)
    assert idx.dtype == (torch.int64 if bits >= 31 else torch.int32)
    assert torch.equal(codes.cpu(), torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(lfq_indices_to_codes(idx, bits).cpu(), codes.cpu())
    if bits <= 10:
        allc = lfq_indices_to_codes(torch.arange(2**bits), bits)
        _, back = lfq_quantize(allc.to(device), backend=backend)
        assert torch.equal(back.cpu().long(), torch.arange(2**bits))


def test_lfq_gradient_is_identity(backend, device):
    z = torch.randn(40, 12, device=device, requires_grad=True)
    codes, _ = lfq_quantize(z, backend=backend)
    g = torch.randn_like(codes)
    (codes * g).sum().backward()
    assert torch.equal(z.grad, g)


def test_lfq_leading_dims_and_dtype(backend, device):
    z = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    codes, idx = lfq_quantize(z.to(device), backend=backend)
    assert codes.shape == z.shape and codes.dtype == torch.bfloat16 and idx.shape == (2, 3, 5)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    levels=st.lists(st.integers(2, 9), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_property_fsq_lfq(backend, device, lead, levels, dtype):
    z = (torch.randn(*lead, len(levels)) * 2).to(dtype)
    codes, idx = fsq_quantize(z.to(device), levels, backend=backend)
    assert codes.shape == z.shape and idx.shape == tuple(lead)
    if idx.numel():
        assert int(idx.min()) >= 0 and int(idx.max()) < math.prod(levels)
        torch.testing.assert_close(fsq_indices_to_codes(idx, levels).to(dtype).cpu(), codes.cpu(), rtol=0, atol=0)
    lcodes, lidx = lfq_quantize(z.to(device), backend=backend)
    assert torch.equal(lfq_indices_to_codes(lidx, len(levels)).to(dtype).cpu(), lcodes.cpu())


def test_lfq_bad_input():
    with pytest.raises(ValueError, match="1..62 bits"):
        lfq_quantize(torch.randn(3, 0))
    with pytest.raises(ValueError, match="non-finite"):
        lfq_quantize(torch.tensor([[float("inf")]]))


def test_study_fsq_step_bench_script(tmp_path, capsys):
    """benchmarks/bench_study_fsq_step.py times the study's FSQ step beside the peer's and the op's
    direct call beside the registered op, and writes both to JSON."""
    import json

    from scripts import load_script

    mod = load_script("benchmarks/bench_study_fsq_step.py")
    out = tmp_path / "s.json"
    assert mod.main(["--sizes", "10", "--reps", "2", "--inner", "1", "--batch", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["kind"], r["impl"]) for r in rows}
    assert {("module", "vqtok"), ("train", "vqtok"), ("op", "direct"), ("op", "registered")} <= impls
    for r in rows:
        assert r["levels"] == [8, 5, 5, 5] and r["codes"] == 1000 and r["tokens"] == 128
        assert 0 < r["min_us"] <= r["median_us"] <= r["max_us"] and r["reps"] == 2
    ratios = {(r["kind"], r["impl"]): r.get("ratio") for r in rows}
    assert ratios[("op", "direct")] > 0 and ratios[("op", "registered")] is None
    if ("module", "vector-quantize-pytorch") in impls:
        assert ratios[("module", "vqtok")] > 0 and ratios[("train", "vqtok")] > 0
    assert "8,5,5,5" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--sizes", "12"])
