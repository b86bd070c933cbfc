"""How many LFQ codes a Gaussian latent can reach when the bits are projected from fewer channels.

LFQ with B bits on a latent of D < B channels projects it by a Linear(D, B): the B bits are
linearly dependent, their sign hyperplanes cut a D-dimensional space, and many of the 2^B codes get
little or no mass. This script draws ``tokens_per_code`` x 2^B standard Gaussian latents of D
channels, quantises them with ``vqtok.quantizers.LFQ(D, bits=B)`` (its own random ``in_proj``,
seeded) and prints the fraction of codes used and the perplexity, for each D, next to D = B (no
projection). The quantizer study's LFQ rows give the latent one channel per bit for this reason.

    python benchmarks/lfq_projection_usage.py --bits 18 --dims 16,17,18 --tokens-per-code 15,100
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch


def usage(dim: int, bits: int, tokens_per_code: int, seed: int = 0, chunk: int = 1 << 20) -> tuple[float, float]:
    """(fraction of the 2^bits codes used, perplexity) of LFQ(dim, bits) on Gaussian latents."""
    from vqtok.quantizers import LFQ

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fewer-channels warning is the point here
        lfq = LFQ(dim, bits=bits, entropy_weight=0.0).eval()
    counts = torch.zeros(2**bits, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed + 1)
    left = tokens_per_code * 2**bits
    while left:
        n = min(chunk, left)
        counts += torch.bincount(lfq.encode(torch.randn(n, dim, generator=g)), minlength=2**bits)
        left -= n
    p = counts[counts > 0].double() / counts.sum()
    return float((counts > 0).double().mean()), math.exp(float(-(p * p.log()).sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=18)
    ap.add_argument("--dims", default="16,17,18", help="comma-separated latent channel counts")
    ap.add_argument("--tokens-per-code", default="15,100", help="comma-separated draws per code")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"{'channels':>8s} {'bits':>4s} {'tokens/code':>11s} {'usage':>6s} {'perplexity':>10s}")
    for per in (int(v) for v in args.tokens_per_code.split(",")):
        for dim in (int(v) for v in args.dims.split(",")):
            u, ppl = usage(dim, args.bits, per, args.seed)
            print(f"{dim:8d} {args.bits:4d} {per:11d} {u:6.3f} {ppl:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
