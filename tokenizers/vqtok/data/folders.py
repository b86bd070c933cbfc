"""Folder datasets: images in any format PIL reads, plus the file listing and the deterministic
train/eval split shared by the video and audio folder datasets.

Split: when ``eval_path`` is given it is the eval set; otherwise each file goes to eval when a
hash of its relative path falls below ``eval_fraction`` (stable when files are added or removed).
Unreadable files are skipped, counted and reported once (``skipped``, ``report()``).
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import to_tensor

IMAGE_EXTS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _hash_fraction(rel: str) -> float:
    return int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "little") / 2**64


def list_files(root: str, exts: set[str] | None, split: str, eval_path: str = "", eval_fraction: float = 0.05,
               dirs: bool = False) -> tuple[str, list[str]]:
    """Sorted relative paths under the folder of ``split``: files with an extension in ``exts``
    (and, with ``dirs=True``, leaf directories too). Returns (base_dir, rel_paths)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    base = eval_path if (split == "eval" and eval_path) else root
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"data folder {base!r} does not exist (data.path / data.eval_path)")
    out = []
    for d, subdirs, files in os.walk(base, followlinks=True):
        subdirs.sort()
        rel_d = os.path.relpath(d, base)
        if dirs and not subdirs and d != base:
            out.append(rel_d)
        for f in sorted(files):
            if exts is None or os.path.splitext(f)[1].lower() in exts:
                out.append(os.path.normpath(os.path.join(rel_d, f)))
    if not eval_path:  # no separate eval folder: split by a hash of the relative path
        keep_eval = split == "eval"
        out = [r for r in out if (_hash_fraction(r) < eval_fraction) == keep_eval]
    return base, sorted(out)


class SkipReport:
    """Counts unreadable files and prints one summary line to stderr."""

    def __init__(self, what: str):
        self.what, self.skipped = what, []

    def add(self, rel: str, err: Exception) -> None:
        self.skipped.append((rel, f"{type(err).__name__}: {err}"))

    def report(self, total: int) -> None:
        if self.skipped:
            rel, why = self.skipped[0]
            print(f"[vqtok.data] skipped {len(self.skipped)} of {total} unreadable {self.what} "
                  f"(first: {rel}: {why})", file=sys.stderr)


def resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)


class ImageFolder(Dataset):
    """Images under a folder -> float [3, size, size] in [-1, 1].

    train: shorter side resized to ``size``, random crop + flip drawn from rng([seed, i]);
    eval: shorter side resized to ``size``, centre crop. ``num_samples`` > 0 gives the train split
    that many (virtual) samples cycling over the files. ``key(i)`` is the relative path.
    """

    def __init__(self, root: str, split: str, size: int = 256, eval_path: str = "", eval_fraction: float = 0.05,
                 num_samples: int = 0, seed: int = 0):
        self.base, rels = list_files(root, IMAGE_EXTS, split, eval_path, eval_fraction)
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.skips = SkipReport("image files")
        self.files = []
        for rel in rels:
            try:
                with Image.open(os.path.join(self.base, rel)) as im:
                    im.verify()
                self.files.append(rel)
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
                self.skips.add(rel, e)
        self.skips.report(len(rels))
        if not self.files:
            raise ValueError(f"no readable images for split {split!r} under {self.base!r}")
        self.num = int(num_samples) if (split == "train" and num_samples > 0) else len(self.files)

    @property
    def skipped(self) -> int:
        return len(self.skips.skipped)

    def __len__(self) -> int:
        return self.num

    def key(self, i: int) -> str:
        return self.files[i % len(self.files)]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num:
            raise IndexError(i)
        rel = self.files[i % len(self.files)]
        try:
            with Image.open(os.path.join(self.base, rel)) as im:
                img = resize_short(im.convert("RGB"), self.size)
        except Exception as e:  # noqa: BLE001
            raise OSError(f"cannot decode image {os.path.join(self.base, rel)}: {e}") from e
        w, h = img.size
        s = self.size
        if self.split == "train":
            rng = np.random.default_rng([self.seed, i])
            y, x, flip = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1)), bool(rng.integers(2))
        else:
            y, x, flip = (h - s) // 2, (w - s) // 2, False
        t = to_tensor(img.crop((x, y, x + s, y + s)))
        return t.flip(-1) if flip else t
