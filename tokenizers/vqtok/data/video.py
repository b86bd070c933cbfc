"""Video data: a built-in offline set of clips panning and zooming across the bundled photos, and
folders of clips (a sub-folder of frame images per clip, or ``.npy`` arrays [T, H, W, 3] uint8).

Clips are float32 [3, T, size, size] in [-1, 1]. Built-in clip i moves a square crop window
linearly from a start box to an end box (position and zoom drawn from rng([seed, i])) over T
frames; train clips come from the training photos, eval clips from the held-out photos.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .folders import IMAGE_EXTS, SkipReport, list_files, resize_short
from .images import EVAL_PHOTOS, TRAIN_PHOTOS, scaled_photo, to_tensor


class BuiltinClips(Dataset):
    """Pan/zoom clips over the bundled photos: ``num_samples`` clips of ``frames`` frames."""

    def __init__(self, split: str, size: int = 64, frames: int = 17, num_samples: int = 2000, seed: int = 0,
                 scale: float = 0.5):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.split, self.size, self.frames, self.seed, self.scale = split, int(size), int(frames), int(seed), float(scale)
        self.photos = TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS
        self.num = int(num_samples)
        # eval clips use a disjoint seed stream so they never coincide with train draws
        self._stream = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.num

    def _draw(self, i: int):
        rng = np.random.default_rng([self.seed, self._stream, i])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        w, h = scaled_photo(photo, self.scale).size
        side = min(w, h)
        boxes = []
        for _ in range(2):  # start and end window: side length and top-left corner
            s = float(rng.uniform(0.35, 0.8)) * side
            boxes.append((s, float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))))
        return photo, boxes

    def key(self, i: int) -> str:
        return f"{self._draw(i)[0]}@clip{i}"

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num:
            raise IndexError(i)
        photo, ((s0, x0, y0), (s1, x1, y1)) = self._draw(i)
        img = scaled_photo(photo, self.scale)
        out = []
        for f in range(self.frames):
            a = f / max(1, self.frames - 1)
            s, x, y = s0 + a * (s1 - s0), x0 + a * (x1 - x0), y0 + a * (y1 - y0)
            frame = img.resize((self.size, self.size), Image.BILINEAR, box=(x, y, x + s, y + s))
            out.append(to_tensor(frame))
        return torch.stack(out, dim=1)  # (3, T, H, W)


class VideoFolder(Dataset):
    """Clips under a folder: leaf sub-folders of frame images (sorted by name) or ``.npy`` arrays
    [T, H, W, 3] uint8. Takes ``frames`` consecutive frames (train: random start; eval: first),
    shorter side resized to ``size`` and centre-cropped. ``key(i)`` is the clip's relative path."""

    def __init__(self, root: str, split: str, size: int = 64, frames: int = 17, eval_path: str = "",
                 eval_fraction: float = 0.05, seed: int = 0):
        self.base, rels = list_files(root, {".npy"}, split, eval_path, eval_fraction, dirs=True)
        self.split, self.size, self.frames, self.seed = split, int(size), int(frames), int(seed)
        self.skips = SkipReport("clips")
        self.clips = []
        for rel in rels:
            try:
                n = self._length(rel)
                if n < self.frames:
                    raise ValueError(f"{n} frames < data.frames={self.frames}")
                self.clips.append(rel)
            except Exception as e:  # noqa: BLE001
                self.skips.add(rel, e)
        self.skips.report(len(rels))
        if not self.clips:
            raise ValueError(f"no usable clips for split {split!r} under {self.base!r}")

    def _frame_files(self, rel: str) -> list[str]:
        d = os.path.join(self.base, rel)
        return sorted(f for f in os.listdir(d) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)

    def _length(self, rel: str) -> int:
        if rel.endswith(".npy"):
            arr = np.load(os.path.join(self.base, rel), mmap_mode="r")
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"expected [T, H, W, 3], got {arr.shape}")
            return arr.shape[0]
        return len(self._frame_files(rel))

    def __len__(self) -> int:
        return len(self.clips)

    def key(self, i: int) -> str:
        return self.clips[i]

    def _crop(self, img: Image.Image) -> torch.Tensor:
        img = resize_short(img, self.size)
        w, h = img.size
        x, y = (w - self.size) // 2, (h - self.size) // 2
        return to_tensor(img.crop((x, y, x + self.size, y + self.size)))

    def __getitem__(self, i: int) -> torch.Tensor:
        rel = self.clips[i]
        n = self._length(rel)
        start = int(np.random.default_rng([self.seed, i]).integers(n - self.frames + 1)) if self.split == "train" else 0
        if rel.endswith(".npy"):
            arr = np.load(os.path.join(self.base, rel), mmap_mode="r")[start:start + self.frames]
            frames = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in arr]
        else:
            names = self._frame_files(rel)[start:start + self.frames]
            frames = [Image.open(os.path.join(self.base, rel, f)).convert("RGB") for f in names]
        return torch.stack([self._crop(f) for f in frames], dim=1)
