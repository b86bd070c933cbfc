"""Registers ops/reference.py as the ``torch`` backend."""

from __future__ import annotations

from . import reference as ref
from .dispatch import register



@register("nearest_code_l2", "torch")
def _nearest_code_l2(x, codebook, precision="exact"):
    return ref.nearest_code_l2(x, codebook)  # the reference is exact in every precision mode


register("fsq_forward", "torch")(ref.fsq_forward)
register("fsq_backward", "torch")(ref.fsq_backward)
register("fsq_indices_to_codes", "torch")(ref.fsq_indices_to_codes)
register("lfq_forward", "torch")(ref.lfq_forward)


def unavailable_reason(backend: str) -> str | None:
    return None
