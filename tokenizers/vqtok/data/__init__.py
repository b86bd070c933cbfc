"""Datasets: built-in offline images / video clips / synthetic audio and folder datasets.

Contract: ``build_dataset(data_cfg, split)`` with split "train" or "eval" returns a Dataset whose
items are float32 tensors in [-1, 1] — image [3, H, W], video [3, T, H, W], audio [1, T] — and
whose ``key(i)`` is a stable id of sample i (e.g. "astronaut@0" or a relative file path).
Token shards live in :mod:`vqtok.data.tokens`.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .audio import BuiltinAudio, WavFolder
from .folders import ImageFolder
from .images import EVAL_PHOTOS, TRAIN_PHOTOS, BuiltinImages
from .tokens import TokenDataset, TokenFormatError, verify_tokens
from .video import BuiltinClips, VideoFolder

__all__ = ["build_dataset", "BuiltinImages", "ImageFolder", "BuiltinClips", "VideoFolder", "BuiltinAudio",
           "WavFolder", "TRAIN_PHOTOS", "EVAL_PHOTOS",
           "TokenDataset", "TokenFormatError", "verify_tokens"]


def build_dataset(data_cfg: dict, split: str) -> Dataset:
    """The dataset of ``split`` described by the "data" config section (see vqtok.config.DataConfig):
    modality (image|video|audio), source (builtin|folder), path, eval_path, eval_fraction, size,
    scales, frames, length, sample_rate, train_samples, eval_samples, seed."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    c = dict(data_cfg)
    modality, source = c.get("modality", "image"), c.get("source", "builtin")
    seed = int(c.get("seed", 0))
    n = int(c.get("train_samples" if split == "train" else "eval_samples", 0))
    folder = {"eval_path": c.get("eval_path", ""), "eval_fraction": float(c.get("eval_fraction", 0.05))}
    if source not in ("builtin", "folder"):
        raise ValueError(f"data.source must be 'builtin' or 'folder', got {source!r}")
    if source == "folder" and not c.get("path"):
        raise ValueError("data.path is required when data.source='folder'")
    if modality == "image":
        if source == "builtin":
            return BuiltinImages(split, c.get("size", 64), n or (10000 if split == "train" else 0),
                                 tuple(c.get("scales", (0.5, 1.0))), seed)
        return ImageFolder(c["path"], split, c.get("size", 256), num_samples=n, seed=seed, **folder)
    if modality == "video":
        if source == "builtin":
            return BuiltinClips(split, c.get("size", 64), c.get("frames", 17), n or (2000 if split == "train" else 64), seed)
        return VideoFolder(c["path"], split, c.get("size", 64), c.get("frames", 17), seed=seed, **folder)
    if modality == "audio":
        if source == "builtin":
            return BuiltinAudio(split, c.get("length", 16384), c.get("sample_rate", 16000),
                                n or (4000 if split == "train" else 64), seed)
        return WavFolder(c["path"], split, c.get("length", 16384), c.get("sample_rate", 16000), seed=seed, **folder)
    raise ValueError(f"data.modality must be image, video or audio, got {modality!r}")
