"""Quantizer modules: one interface (``forward``/``encode``/``decode``/``codebook_size``) for all.

``build_quantizer(name, **cfg)`` builds one by name for configs and the CLI:

======  =====================================================  ==========================
name    class                                                  required arguments
======  =====================================================  ==========================
vq      VectorQuantizer (EMA/grad codebook, k-means, restarts)  dim, codebook_size
rvq     ResidualVQ (num_quantizers VQ layers, dropout)          dim, codebook_size, num_quantizers
fsq     FSQ (finite scalar quantisation)                        levels
lfq     LFQ (lookup-free, entropy penalty)                      dim
bsq     BSQ (binary spherical)                                  dim
simvq   SimVQ (frozen codebook behind a learned linear map)     dim, codebook_size
======  =====================================================  ==========================
"""

from __future__ import annotations

from .base import Quantizer, QuantizerOutput
from .fsq import FSQ
from .health import CodebookHealth
from .kmeans import kmeans
from .lfq import BSQ, LFQ
from .rvq import ResidualVQ
from .simvq import SimVQ
from .vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "rvq": ResidualVQ,
    "fsq": FSQ,
    "lfq": LFQ,
    "bsq": BSQ,
    "simvq": SimVQ,
}

__all__ = [
    "Quantizer",
    "QuantizerOutput",
    "CodebookHealth",
    "VectorQuantizer",
    "ResidualVQ",
    "FSQ",
    "LFQ",
    "BSQ",
    "SimVQ",
    "QUANTIZERS",
    "build_quantizer",
    "kmeans",
]


def build_quantizer(name: str, **cfg) -> Quantizer:
    """The quantizer called ``name`` (see the table above) built with keyword arguments ``cfg``."""
    if not isinstance(name, str) or name.lower() not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[name.lower()]
    try:
        return cls(**cfg)
    except TypeError as e:
        raise TypeError(f"build_quantizer({name!r}): {e}") from e
