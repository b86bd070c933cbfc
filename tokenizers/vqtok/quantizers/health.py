"""Codebook health: running usage counts, perplexity, dead codes and a collapse signal.

``CodebookHealth`` is an ``nn.Module`` whose state lives in buffers, so it is saved with the
model, moves with ``.to()`` and round-trips through ``state_dict``. Under ``torch.distributed``
every ``update`` all-reduces the batch counts in exactly one collective that every rank enters,
so all ranks hold identical health state. It lives here (below ``vqtok.metrics`` in the layer
order) because every quantizer owns one; ``vqtok.metrics.codebook`` re-exports it for evaluation.

Definitions, with p the batch's code distribution (counts / tokens) and K the codebook size:

* usage:       fraction of codes used at least once in the batch.
* perplexity:  exp(H(p)) with natural logs; K for a uniform distribution, 1 for full collapse.
* ema_probs:   bias-corrected EMA of p (decay ``decay``).
* dead codes:  codes whose EMA probability is below ``dead_ratio / K`` (a fraction of the uniform
               share). A code never seen since the tracker started has probability exactly 0.
* collapse:    1 when the alive fraction < ``min_usage`` or the EMA perplexity <
               ``min_perplexity * K``; else 0.
* histogram:   cumulative counts since the last ``reset`` (int64), also the basis of ``summary``.

The EMA sees about ``tokens_per_step / (1 - decay)`` tokens; dead codes and the collapse signal
mean something once that is well above K (e.g. a 2^18-code LFQ needs a few hundred thousand
tokens in the horizon before an unused code says more than "not drawn yet").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqtok.ops import _native

from ._common import all_reduce_sum_, is_distributed, keep_fp32

MAX_TRACKED_CODES = 1 << 24  # the histogram costs 16 bytes per code
MOMENTS_RESUM_STEPS = 1024  # the EMA's carried moments are summed afresh from the buffer this often
# and carried only through updates of fewer than K / 4 distinct codes: two x log x per distinct
# code against one per code for the resum (at 1536 tokens and 2^14 codes, over a thousand
# distinct, the resum was about half the update's time in the extension's path)
MOMENTS_CARRY_RATIO = 4


def perplexity_of(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution proportional to counts [..., K] (float64 math, 0 log 0 = 0)."""
    if counts.ndim == 1 and not counts.is_floating_point():
        counts = counts[counts > 0]  # a batch's histogram of a large codebook is mostly zeros
    c = counts.to(torch.float64)
    total = c.sum(-1, keepdim=True)
    p = c / total.clamp_min(1e-300)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # p = 0 gives 0 * log(1e-300) = 0
    return torch.exp(ent)


def weight_moments(w: torch.Tensor) -> tuple[float, float]:
    """(s, E) = (sum w, sum w log w) of non-negative weights ``w``: two reductions over ``w`` in its
    own dtype (``torch.xlogy``: 0 log 0 = 0), each summed in float64."""
    return float(w.sum(dtype=torch.float64)), float(torch.xlogy(w, w).sum(dtype=torch.float64))


def entropy_of_moments(s: float, e: float) -> float:
    """Entropy (nats) of the distribution proportional to weights with moments (s, E) (see
    ``weight_moments``): H = log s - E / s; 0 when every weight is 0."""
    return math.log(s) - e / s if s > 0 else 0.0


def entropy_of_weights(w: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, float64 scalar) of the distribution proportional to the non-negative 1-D
    weights ``w``, from their moments (``weight_moments``): normalising (or copying to float64) K
    floats first would cost more than the training step's quantiser at 2^18 codes."""
    return torch.tensor(entropy_of_moments(*weight_moments(w)), dtype=torch.float64, device=w.device)


class CodebookHealth(nn.Module):
    """Running usage statistics of one codebook of ``codebook_size`` codes.

    Args:
        codebook_size: K.
        decay: EMA decay of the usage distribution.
        dead_ratio: a code is dead when its EMA probability < dead_ratio / K.
        min_usage: collapse fires when the alive fraction of codes falls below this.
        min_perplexity: collapse fires when EMA perplexity < min_perplexity * K.
        sync: all-reduce counts across ranks when torch.distributed is initialised.

    ``native = False`` (on the class or an instance) runs the torch path on CPU too, e.g. to
    compare it with the extension's kernel.
    """

    native = True

    def __init__(
        self,
        codebook_size: int,
        *,
        decay: float = 0.99,
        dead_ratio: float = 0.03,
        min_usage: float = 0.1,
        min_perplexity: float = 0.05,
        sync: bool = True,
    ):
        super().__init__()
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
        if codebook_size > MAX_TRACKED_CODES:
            raise ValueError(f"codebook_size {codebook_size} exceeds the tracked maximum {MAX_TRACKED_CODES}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        for name, v in (("dead_ratio", dead_ratio), ("min_usage", min_usage), ("min_perplexity", min_perplexity)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        self.codebook_size = codebook_size
        self.decay, self.dead_ratio = float(decay), float(dead_ratio)
        self.min_usage, self.min_perplexity, self.sync = float(min_usage), float(min_perplexity), bool(sync)
        self.register_buffer("ema_probs", torch.zeros(codebook_size, dtype=torch.float32))
        self.register_buffer("histogram", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # (sum w, sum w log w) of ema_probs in float64, carried through each update (see _ema_entropy)
        self._moments: tuple[float, float] | None = None
        self._moments_key: tuple | None = None  # which ema_probs, at which version, they describe
        self._moments_age = 0  # updates since they were last summed from the buffer

    def _apply(self, fn, recurse=True):
        # the EMA stays fp32 in a model cast to fp16 / bf16 (see _common.keep_fp32)
        return super()._apply(keep_fp32(fn), recurse)

    # ----------------------------------------------------------------------------------------
    def _valid_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (any shape) -> 1-D int64 ids, negative ids (dropped layers) removed; range-checked."""
        flat = indices.reshape(-1).to(torch.int64)
        if not flat.numel():
            return flat
        lo, hi = torch.aminmax(flat)
        if int(hi) >= self.codebook_size:
            raise ValueError(f"indices must be < codebook_size={self.codebook_size}, got max {int(hi)}")
        return flat if int(lo) >= 0 else flat[flat >= 0]

    def counts_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Batch counts [K] int64 of indices (any shape); negative ids (dropped layers) are ignored."""
        return torch.bincount(self._valid_ids(indices), minlength=self.codebook_size)

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Count ``indices`` (all-reduced over ranks), update the running state, return stats.

        On CPU the whole update is one call into the extension (``_native_step``). Otherwise, in a
        single process (or with ``sync=False``) a batch of fewer than K / 8 ids is counted
        sparsely, as its distinct ids and their counts: the histogram and EMA updates then touch
        only those codes besides the EMA's decay, so a step costs a few passes over K floats."""
        flat = self._valid_ids(indices)
        if self.sync and is_distributed():  # the collective needs dense counts
            return self.update_counts(torch.bincount(flat, minlength=self.codebook_size), reduced=False)
        if flat.numel() and self._native_ok():
            return self._native_step(ids=flat)
        if self.codebook_size <= 8 * flat.numel():  # a small codebook's bincount beats a sort
            return self.update_counts(torch.bincount(flat, minlength=self.codebook_size), reduced=False)
        ids, counts = torch.unique(flat, return_counts=True)
        return self._step(ids, counts)

    @torch.no_grad()
    def update_counts(self, counts: torch.Tensor, *, reduced: bool = False) -> dict[str, torch.Tensor]:
        """Same as ``update`` from batch counts [K]; ``reduced=True`` when already summed over ranks."""
        if counts.shape != (self.codebook_size,):
            raise ValueError(f"counts must have shape ({self.codebook_size},), got {tuple(counts.shape)}")
        counts = counts.to(device=self.histogram.device, dtype=torch.int64)
        if self.sync and not reduced and is_distributed():
            counts = all_reduce_sum_(counts.clone())
        if self._native_ok():
            return self._native_step(counts=counts)
        ids = torch.nonzero(counts).reshape(-1)
        return self._step(ids, counts[ids])

    def _native_ok(self) -> bool:
        """Whether ``_native_step`` can run: CPU state in the tracker's own dtypes, and the kernel
        (not under torch.compile, which traces the torch path as ops)."""
        ema, hist = self.ema_probs, self.histogram
        return (self.native and _native.health_available() and not torch.compiler.is_compiling()
                and ema.device.type == "cpu"
                and hist.device.type == "cpu" and ema.dtype == torch.float32 and hist.dtype == torch.int64
                and ema.is_contiguous() and hist.is_contiguous())

    def _native_step(self, *, ids: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> dict:
        """``_step``'s update and stats in one call into the extension (``kernels/cpu/
        codebook_health.cpp``) from the batch's ids (any order, each in [0, K)) or dense int64
        counts [K]: one pass over K (decay, denormal flush, dead count) plus one over the batch. The
        EMA moments are carried as in ``_step``."""
        d = self.decay
        moments = self._current_moments() if self._moments_age < MOMENTS_RESUM_STEPS else None
        steps = int(self.steps) + 1  # the dead threshold after this update
        threshold = self.dead_ratio / self.codebook_size * (1.0 - d**steps)
        distinct, total, batch_entropy, dead, took, d_sum, d_xlogx = _native.health_step(
            self.ema_probs, self.histogram, ids=ids, counts=counts, decay=d, dead_threshold=threshold,
            moments_below=MOMENTS_CARRY_RATIO if moments is not None else 0)
        if total <= 0:
            return self._stats(torch.zeros(0, dtype=torch.int64))
        torch.autograd.graph.increment_version(self.ema_probs)  # changed through their pointers
        torch.autograd.graph.increment_version(self.histogram)
        self.steps.add_(1)
        if took:
            s, e = moments
            d_log_d = d * math.log(d) if d > 0 else 0.0
            self._set_moments((d * s + d_sum, d * e + d_log_d * s + d_xlogx), self._moments_age + 1)
        batch = (distinct / self.codebook_size, math.exp(batch_entropy))
        return self._stats(None, dead=dead, batch=batch)

    def _step(self, ids: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The running state's update from the batch's used (distinct) ``ids`` and their ``counts``
        (int64, identical on every rank), and its stats. When the batch touches fewer than
        K / ``MOMENTS_CARRY_RATIO`` codes, the EMA's moments (sum w, sum w log w) go along: the
        decay scales them (sum (d w) log(d w) = d sum w log w + d log d sum w) and only the ``ids``
        entries change otherwise, so the EMA perplexity costs no pass over K (they are summed
        from the buffer every ``MOMENTS_RESUM_STEPS`` updates and whenever they are not current)."""
        total = int(counts.sum())
        if total > 0:
            self.histogram.index_add_(0, ids, counts)
            share = counts.to(torch.float32)
            ema, d = self.ema_probs, self.decay
            # carried when the batch touches few of the K codes; else summing the buffer costs less
            few = ids.numel() * MOMENTS_CARRY_RATIO < self.codebook_size
            moments = self._current_moments() if few and self._moments_age < MOMENTS_RESUM_STEPS else None
            ema.mul_(d)
            # a code unused for thousands of steps decays into the denormals, which slow every later
            # pass over the buffer 10-100x on x86 (as in lfq_entropy.flush_threshold): flush to 0
            F.threshold_(ema, torch.finfo(ema.dtype).tiny, 0.0)
            before = ema[ids].to(torch.float64) if moments is not None else None
            ema.index_add_(0, ids, share, alpha=(1.0 - d) / total)
            self.steps.add_(1)
            if moments is not None:
                after = ema[ids].to(torch.float64)
                s, e = moments
                d_log_d = d * math.log(d) if d > 0 else 0.0  # d = 0: the decayed sums are 0
                new_s = d * s + float((after - before).sum())
                new_e = d * e + d_log_d * s + float((torch.xlogy(after, after) - torch.xlogy(before, before)).sum())
                self._set_moments((new_s, new_e), self._moments_age + 1)
        return self._stats(counts)

    def _current_moments(self) -> tuple[float, float] | None:
        """The carried (sum w, sum w log w) when they still describe ``ema_probs`` (the same tensor,
        not modified since: its version counter tells a load_state_dict, reset, .to() or any other
        in-place change), else None."""
        ema = self.ema_probs
        key = (id(ema), ema.data_ptr(), ema._version)
        return self._moments if self._moments is not None and self._moments_key == key else None

    def _set_moments(self, moments: tuple[float, float], age: int) -> None:
        ema = self.ema_probs
        # plain attributes, set past nn.Module.__setattr__ (its checks, a few µs an update, only
        # redirect parameters, buffers and modules, which these are not)
        vars(self).update(_moments=moments, _moments_key=(id(ema), ema.data_ptr(), ema._version), _moments_age=age)

    def _ema_entropy(self) -> float:
        """Entropy (nats) of the EMA usage distribution: from the carried moments, or summed from
        the buffer (every ``MOMENTS_RESUM_STEPS`` updates, and after anything else changed it), as
        ``entropy_of_weights``."""
        moments = self._current_moments()
        if moments is None:
            moments = weight_moments(self.ema_probs)
            self._set_moments(moments, 0)
        return entropy_of_moments(*moments)

    # ----------------------------------------------------------------------------------------
    def corrected_probs(self) -> torch.Tensor:
        """Bias-corrected EMA usage distribution [K] (zeros before the first update)."""
        steps = int(self.steps)
        if steps == 0:
            return torch.zeros_like(self.ema_probs)
        return self.ema_probs / (1.0 - self.decay**steps)

    def _raw_dead_threshold(self) -> float:
        """dead_ratio / K times the bias correction: the raw EMA's dead threshold (no corrected copy)."""
        steps = int(self.steps)
        return self.dead_ratio / self.codebook_size * (1.0 - self.decay**steps if steps else 1.0)

    def dead_mask(self, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Codes below dead_ratio / K of ``probs`` (default: corrected_probs(), compared as the
        raw EMA against the threshold times the bias correction: no corrected copy)."""
        if probs is None:
            return self.ema_probs < self._raw_dead_threshold()
        return probs < self.dead_ratio / self.codebook_size

    def dead_count(self) -> torch.Tensor:
        """``dead_mask().sum()`` (int64 scalar) without the mask: torch's comparison and count cost
        more than this arithmetic on CPU. The rounded difference ``ema - threshold`` is negative
        exactly where ``ema < threshold`` (it keeps its sign and is 0 only at equality), so the
        count is -sum(sign(min(ema - threshold, 0))), summed in fp32: exact up to 2^24 codes."""
        below = (self.ema_probs - self._raw_dead_threshold()).clamp_(max=0.0).sign_()
        return (-below.sum(dtype=torch.float32)).to(torch.int64)

    @torch.no_grad()
    def stats(self, counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Detached stats: batch usage/perplexity (when counts [K] given) and the running state."""
        if counts is None:
            return self._stats(None)
        counts = counts.reshape(-1)
        return self._stats(counts[counts > 0])

    def _stats(self, used: torch.Tensor | None, dead: int | None = None,
               batch: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
        """``stats`` from the batch's nonzero counts ``used`` (any order; None: no batch), or from
        its (usage, perplexity) ``batch``; ``dead``: the dead-code count when already taken. The
        EMA perplexity is that of the raw EMA (the bias correction is a scale, which leaves it
        unchanged). The numbers are Python floats until one tensor holds them all (a tensor op
        per number cost more than the update itself at small K)."""
        k = self.codebook_size
        dev = self.histogram.device
        steps = int(self.steps)
        dead = int(self.dead_count()) if dead is None else int(dead)
        ema_ppl = math.exp(self._ema_entropy()) if steps else 0.0
        alive = 1.0 - dead / k
        collapse = steps > 0 and (alive < self.min_usage or ema_ppl < self.min_perplexity * k)
        names, values = ["ema_usage", "ema_perplexity", "collapse"], [alive, ema_ppl, float(collapse)]
        if batch is None and used is not None:
            batch = (used.numel() / k, float(perplexity_of(used)))
        if batch is not None:
            names += ["usage", "perplexity"]
            values += list(batch)
        floats = dict(zip(names, torch.tensor(values, dtype=torch.float32, device=dev).unbind()))
        out = {"dead_codes": torch.tensor(dead, dtype=torch.int64, device=dev)}
        out.update((name, floats.pop(name)) for name in ("ema_usage", "ema_perplexity", "collapse"))
        out["histogram"] = self.histogram.detach()
        out.update(floats)  # the batch's usage and perplexity
        return out

    def summary(self) -> dict[str, float]:
        """Cumulative numbers since the last reset (e.g. over an evaluation set)."""
        h = self.histogram
        total = int(h.sum())
        ppl = float(perplexity_of(h)) if total else 0.0
        return {
            "tokens": total,
            "codebook_size": self.codebook_size,
            "usage": float((h > 0).sum()) / self.codebook_size,
            "unused_codes": int((h == 0).sum()),
            "perplexity": ppl,
            "entropy_bits": math.log2(ppl) if ppl > 0 else 0.0,
            "normalized_entropy": math.log(ppl) / math.log(self.codebook_size) if ppl > 1 else 0.0,
            "dead_codes": int(self.dead_count()) if int(self.steps) else self.codebook_size,
        }

    @torch.no_grad()
    def reset(self) -> None:
        self.ema_probs.zero_()
        self.histogram.zero_()
        self.steps.zero_()

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, decay={self.decay}, dead_ratio={self.dead_ratio}"


def make_health(codebook_size: int, cfg: dict | None) -> CodebookHealth | None:
    """A tracker for ``codebook_size`` codes configured by ``cfg`` (None: defaults); None when
    the codebook is too large to histogram (e.g. LFQ with more than 2^24 codes)."""
    if codebook_size > MAX_TRACKED_CODES:
        return None
    return CodebookHealth(codebook_size, **(cfg or {}))


@torch.no_grad()
def track(health: CodebookHealth | None, indices: torch.Tensor, codebook_size: int, training: bool) -> dict:
    """Stats of a batch of ``indices``: updates ``health`` when training (all ranks), else reads it.

    Without a tracker (codebooks past 2^24 codes) only the local batch "usage" and "perplexity"
    are reported, from the distinct ids present.
    """
    if health is not None:
        return health.update(indices) if training else health.stats(health.counts_of(indices))
    _, counts = torch.unique(indices.reshape(-1), return_counts=True)
    return {"usage": torch.tensor(counts.numel() / codebook_size),
            "perplexity": perplexity_of(counts).to(torch.float32)}
