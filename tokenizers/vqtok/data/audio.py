"""Audio data: built-in synthetic signals (tones, chirps, noise bursts, harmonic mixtures) and WAV
folders read with ``scipy.io.wavfile``. Waveforms are float32 [1, length] in [-1, 1].

Built-in signal i is drawn from rng([seed, stream, i]) with a separate stream for eval, so the
eval signals are held out from training.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .folders import SkipReport, list_files

KINDS = ("tone", "chirp", "noise_burst", "harmonic")


def synth_signal(rng: np.random.Generator, length: int, sample_rate: int) -> tuple[str, np.ndarray]:
    """One synthetic waveform of ``length`` samples, peak <= 0.9. Returns (kind, float32 [length])."""
    t = np.arange(length) / sample_rate
    kind = KINDS[int(rng.integers(len(KINDS)))]
    nyq = sample_rate / 2
    if kind == "tone":
        f = rng.uniform(60, 0.4 * nyq)
        y = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    elif kind == "chirp":
        f0, f1 = rng.uniform(50, 0.4 * nyq, size=2)
        dur = length / sample_rate
        y = np.sin(2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / dur * t**2))
    elif kind == "noise_burst":
        y = np.zeros(length)
        for _ in range(int(rng.integers(1, 4))):
            start, n = int(rng.integers(length)), int(rng.integers(length // 16, length // 3 + 2))
            seg = rng.standard_normal(min(n, length - start))
            y[start:start + seg.size] += seg * np.hanning(seg.size)
    else:  # harmonic: a fundamental with decaying overtones and an amplitude envelope
        f = rng.uniform(80, 600)
        y = sum((0.6**k) * np.sin(2 * np.pi * f * (k + 1) * t + rng.uniform(0, 6.28))
                for k in range(int(rng.integers(2, 7))) if f * (k + 1) < nyq)
        y = y * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t))
    y = np.asarray(y, dtype=np.float64)
    peak = np.abs(y).max()
    y = y / peak * rng.uniform(0.3, 0.9) if peak > 0 else y
    return kind, y.astype(np.float32)


class BuiltinAudio(Dataset):
    """``num_samples`` synthetic signals of ``length`` samples at ``sample_rate``."""

    def __init__(self, split: str, length: int = 16384, sample_rate: int = 16000, num_samples: int = 4000, seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.split, self.length, self.sr, self.num, self.seed = split, int(length), int(sample_rate), int(num_samples), int(seed)
        self._stream = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.num

    def _make(self, i: int):
        return synth_signal(np.random.default_rng([self.seed, self._stream, i]), self.length, self.sr)

    def key(self, i: int) -> str:
        return f"{self._make(i)[0]}@{i}"

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num:
            raise IndexError(i)
        return torch.from_numpy(self._make(i)[1]).unsqueeze(0)


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    """Mono float32 waveform in [-1, 1] at ``sample_rate`` (polyphase resampling when needed)."""
    from scipy.io import wavfile

    sr, data = wavfile.read(path)
    if data.dtype == np.uint8:
        y = (data.astype(np.float32) - 128) / 128
    elif np.issubdtype(data.dtype, np.integer):
        y = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        y = data.astype(np.float32)
    if y.ndim == 2:
        y = y.mean(axis=1)
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, sample_rate)
        y = resample_poly(y, sample_rate // g, sr // g).astype(np.float32)
    return np.clip(y, -1.0, 1.0)


class WavFolder(Dataset):
    """WAV files under a folder, cropped (train: random start; eval: start) or zero-padded to
    ``length`` samples. ``key(i)`` is the relative path."""

    def __init__(self, root: str, split: str, length: int = 16384, sample_rate: int = 16000, eval_path: str = "",
                 eval_fraction: float = 0.05, seed: int = 0):
        from scipy.io import wavfile

        self.base, rels = list_files(root, {".wav"}, split, eval_path, eval_fraction)
        self.split, self.length, self.sr, self.seed = split, int(length), int(sample_rate), int(seed)
        self.skips, self.files = SkipReport("WAV files"), []
        for rel in rels:
            try:
                wavfile.read(os.path.join(self.base, rel), mmap=True)
                self.files.append(rel)
            except Exception as e:  # noqa: BLE001
                self.skips.add(rel, e)
        self.skips.report(len(rels))
        if not self.files:
            raise ValueError(f"no readable WAV files for split {split!r} under {self.base!r}")

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def __getitem__(self, i: int) -> torch.Tensor:
        y = read_wav(os.path.join(self.base, self.files[i]), self.sr)
        if y.size < self.length:
            y = np.pad(y, (0, self.length - y.size))
        start = int(np.random.default_rng([self.seed, i]).integers(y.size - self.length + 1)) if self.split == "train" else 0
        return torch.from_numpy(np.ascontiguousarray(y[start:start + self.length])).unsqueeze(0)
