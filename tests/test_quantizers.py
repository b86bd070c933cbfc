"""Quantizer modules: the shared interface, estimators, EMA maths, k-means, AMP, compile, state."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from vqtok.quantizers import (
    BSQ,
    FSQ,
    LFQ,
    QuantizerOutput,
    ResidualVQ,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
    kmeans,
)
from vqtok.quantizers._common import rotation_grad
from vqtok.quantizers.lfq import _entropy_op

HAS_ENTROPY = _entropy_op() is not None

# name -> (config, a tolerance-free equality is expected between decode(encode(z)) and forward)
CONFIGS = {
    "vq-ema": ("vq", dict(dim=12, codebook_size=37)),
    "vq-grad-cos-lowdim": ("vq", dict(dim=12, codebook_size=37, codebook_dim=5, metric="cosine", learning="grad",
                                      estimator="rotation")),
    "vq-kmeans-restart": ("vq", dict(dim=12, codebook_size=37, kmeans_init=True, kmeans_iters=3,
                                     dead_code_threshold=0.5)),
    "rvq": ("rvq", dict(dim=12, codebook_size=19, num_quantizers=3)),
    "rvq-shared": ("rvq", dict(dim=12, codebook_size=19, num_quantizers=2, shared_codebook=True, learning="grad")),
    "fsq": ("fsq", dict(levels=[5, 4, 3], dim=12)),
    "fsq-nodim": ("fsq", dict(levels=[8, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])),
    "lfq": ("lfq", dict(dim=12, bits=9, entropy_weight=0.1 if HAS_ENTROPY else 0.0)),
    "bsq": ("bsq", dict(dim=12, entropy_weight=0.1 if HAS_ENTROPY else 0.0)),
    "simvq": ("simvq", dict(dim=12, codebook_size=37)),
}
SHAPES = [(50, 12), (2, 12, 9), (2, 12, 5, 3), (1, 12, 2, 3, 4)]


def _build(key):
    name, cfg = CONFIGS[key]
    return build_quantizer(name, **cfg)


def _depth(m):
    return m.num_quantizers if isinstance(m, ResidualVQ) else None


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_interface_invariants(key, shape):
    m = _build(key)
    z = torch.randn(*shape, requires_grad=True)
    out = m(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    lead = (shape[0],) + tuple(shape[2:])
    expect = lead + ((m.num_quantizers,) if _depth(m) else ())
    assert out.indices.shape == expect and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < m.codebook_size
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    tracked = getattr(m, "health", None) is not None or isinstance(m, ResidualVQ)
    keys = ("usage", "perplexity", "dead_codes", "collapse", "histogram") if tracked else ("usage", "perplexity")
    for k in keys:
        assert k in out.stats, k
    assert 0 < float(out.stats["usage"]) <= 1 and float(out.stats["perplexity"]) >= 1
    # gradients reach the encoder through the estimator
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # eval mode: decode(encode(z)) == forward(z).quantized, bit for bit
    m.eval()
    with torch.no_grad():
        q = m(z).quantized
        idx = m.encode(z)
        assert torch.equal(idx, m(z).indices)
        assert torch.equal(m.decode(idx), q)


def test_build_quantizer_errors():
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        build_quantizer("nope", dim=4)
    with pytest.raises(TypeError, match="build_quantizer\\('vq'\\)"):
        build_quantizer("vq", dim=4, codebook_size=8, not_an_option=1)
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(4, 8, metric="dot")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(4, 0)
    m = VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match="4 channels in dim 1"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="indices must lie in"):
        m.decode(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="depth axis of size 2"):
        ResidualVQ(4, 8, 2).decode(torch.zeros(3, 3, dtype=torch.int64))


def test_codebook_sizes():
    assert FSQ([8, 5, 5, 5]).codebook_size == 1000
    assert LFQ(4, bits=18).codebook_size == 2**18
    assert BSQ(16).codebook_size == 2**16
    assert ResidualVQ(4, 8, 3).codebook_size == 8
    assert SimVQ(4, 8).codebook_size == 8
