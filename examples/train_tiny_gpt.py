"""Train a tiny next-token model (a GPT) on tokens exported by ``vqtok encode``.

    vqtok encode --checkpoint runs/demo --input builtin:images --output tokens/ --limit 2000
    python examples/train_tiny_gpt.py --tokens tokens/ --steps 300

The tokens are read through ``vqtok.data.TokenDataset``'s flattened view: every sample's token
grid flattened in C order and concatenated in row order, ``offsets[i]`` marking where sample i
starts. Training windows are ``block_size + 1`` tokens at random offsets of that stream (they may
span two samples, as in nanoGPT's train.bin); ``--per-sample`` instead starts every window at a
sample boundary with a BOS token, the setting an image/audio generator would use.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vqtok.data import TokenDataset


class TinyGPT(nn.Module):
    """Token + position embeddings -> causal pre-norm Transformer -> logits [B, T, vocab]."""

    def __init__(self, vocab: int, block_size: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(block_size, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():  # small init (GPT-2): the first loss is close to log(vocab)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx (B, T) -> (B, T, vocab)
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.blocks(self.tok(idx) + self.pos[:t], mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(ds: TokenDataset, block: int, batch: int, per_sample: bool, bos: int, rng: np.random.Generator):
    """Endless (x, y) int64 batches [batch, block] of next-token pairs."""
    while True:
        if per_sample:  # BOS + the first `block` tokens of random samples
            rows = rng.integers(len(ds), size=batch)
            seq = [np.concatenate([[bos], ds.stream(ds.offsets[r], ds.offsets[r + 1])])[: block + 1] for r in rows]
        else:  # random windows of the flat stream
            starts = rng.integers(ds.num_tokens - block, size=batch)
            seq = [ds.stream(s, s + block + 1) for s in starts]
        seq = torch.from_numpy(np.stack(seq))
        yield seq[:, :-1], seq[:, 1:]


def train(tokens: str, steps: int = 200, block_size: int = 64, batch_size: int = 16, dim: int = 64, layers: int = 2,
          heads: int = 4, lr: float = 3e-3, per_sample: bool = False, seed: int = 0, device: str = "cpu",
          log_every: int = 25) -> list[float]:
    """Train and return the loss of every step."""
    ds = TokenDataset(tokens, flat=True)
    vocab = ds.codebook_size + (1 if per_sample else 0)  # the extra id is BOS
    if per_sample:
        block_size = min(block_size, ds.tokens_per_sample)
    if ds.num_tokens < block_size + 2:
        raise ValueError(f"{tokens}: {ds.num_tokens} tokens is too few for --block-size {block_size}")
    torch.manual_seed(seed)
    model = TinyGPT(vocab, block_size, dim, layers, heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    data = batches(ds, block_size, batch_size, per_sample, ds.codebook_size, np.random.default_rng(seed))
    print(f"{len(ds)} samples x {ds.grid} = {ds.num_tokens} tokens, vocab {vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters; uniform loss {math.log(vocab):.3f}")
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x, y = next(data)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.to(device).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            tps = (step + 1) * batch_size * block_size / (time.perf_counter() - t0)
            print(f"step {step:5d}  loss {losses[-1]:.4f}  {tps:,.0f} tokens/s")
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", required=True, help="token folder written by `vqtok encode`")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--block-size", type=int, default=64, help="context length in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up 20 steps, cosine decay)")
    p.add_argument("--per-sample", action="store_true", help="windows start at sample boundaries with a BOS token")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and the window draws")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    losses = train(a.tokens, a.steps, a.block_size, a.batch_size, a.dim, a.layers, a.heads, a.lr, a.per_sample,
                   a.seed, a.device)
    k = max(1, len(losses) // 10)
    print(f"mean loss of the first {k} steps {np.mean(losses[:k]):.4f} -> last {k} steps {np.mean(losses[-k:]):.4f}")
    return losses


if __name__ == "__main__":
    main()
