"""Independent float64 oracles for the op tests (deliberately not vqtok.ops.reference)."""

import torch


def nearest_f64(x: torch.Tensor, c: torch.Tensor, chunk: int = 256):
    """Lowest index minimising sum((x - c)^2) in float64, direct form; returns (idx, dist64)."""
    x64, c64 = x.double().cpu(), c.double().cpu()
    idx, dist = [], []
    for r in range(0, x64.shape[0], chunk):
        d = ((x64[r : r + chunk, None, :] - c64[None]) ** 2).sum(-1)
        m = d.min(1, keepdim=True).values
        first = (d == m).to(torch.int8).argmax(1)  # lowest index among exact ties
        idx.append(first)
        dist.append(m[:, 0])
    if not idx:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64)
    return torch.cat(idx), torch.cat(dist)
