"""Built-in offline image data: random crops of the RGB photos bundled with scikit-image and
scikit-learn, with whole photos held out for evaluation.

Split (documented in the README):
  train  astronaut, chelsea, coffee, hubble_deep_field, immunohistochemistry, rocket, china (sklearn)
  eval   retina, motorcycle_left, motorcycle_right (skimage stereo pair), flower (sklearn)

Train sample i is a crop drawn by ``numpy.random.default_rng([seed, i])`` (photo, scale, position,
flip), so a sample depends only on its index: workers, resume and DDP need no RNG plumbing.
Eval samples are the non-overlapping tiles of the held-out photos at each scale.
Tensors are float32 [3, size, size] in [-1, 1].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "china")
EVAL_PHOTOS = ("retina", "motorcycle_left", "motorcycle_right", "flower")


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled RGB photo as uint8 [H, W, 3] (offline: scikit-image / scikit-learn data)."""
    import skimage.data as skd

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skd.stereo_motorcycle()
        img = left if name.endswith("left") else right
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        img = load_sample_images().images[0 if name == "china" else 1]
    elif name in TRAIN_PHOTOS + EVAL_PHOTOS:
        img = getattr(skd, name)()
    else:
        raise ValueError(f"unknown built-in photo {name!r}; available: {TRAIN_PHOTOS + EVAL_PHOTOS}")
    return np.ascontiguousarray(img[..., :3])


@lru_cache(maxsize=64)
def scaled_photo(name: str, scale: float) -> Image.Image:
    """The photo resized by ``scale`` (bicubic, antialiased)."""
    img = Image.fromarray(load_photo(name))
    if scale != 1.0:
        w, h = img.size
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return img


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (PIL or numpy) -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class BuiltinImages(Dataset):
    """Crops of the bundled photos.

    Args:
        split: "train" (random crops, ``num_samples`` of them) or "eval" (tiles of held-out photos,
            at most ``num_samples`` spread evenly when > 0).
        size: crop side in pixels.
        scales: photo rescale factors (train: one drawn per sample; eval: every scale).
        seed: base seed of the crop draws.
    """

    def __init__(self, split: str, size: int = 64, num_samples: int = 10000, scales: tuple[float, ...] = (0.5, 1.0),
                 seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.split, self.size, self.scales, self.seed = split, int(size), tuple(float(s) for s in scales), int(seed)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"data.scales must be positive, got {scales}")
        if split == "train":
            self.photos = TRAIN_PHOTOS
            usable = [p for p in self.photos if min(scaled_photo(p, max(self.scales)).size) >= self.size]
            if not usable:
                raise ValueError(f"data.size={size} is larger than every training photo at scales {self.scales}")
            self.photos = tuple(usable)
            self.num = int(num_samples)
            self.tiles: list[tuple[str, float, int, int]] = []
        else:
            self.tiles = [(p, s, y, x) for p in EVAL_PHOTOS for s in self.scales for (y, x) in self._grid(p, s)]
            if not self.tiles:
                raise ValueError(f"data.size={size} is larger than every held-out photo at scales {self.scales}")
            if 0 < num_samples < len(self.tiles):
                pick = np.linspace(0, len(self.tiles) - 1, int(num_samples)).round().astype(int)
                self.tiles = [self.tiles[i] for i in pick]
            self.num = len(self.tiles)

    def _grid(self, photo: str, scale: float) -> list[tuple[int, int]]:
        w, h = scaled_photo(photo, scale).size
        s = self.size
        return [(y, x) for y in range(0, h - s + 1, s) for x in range(0, w - s + 1, s)]

    def __len__(self) -> int:
        return self.num

    def _draw(self, i: int) -> tuple[str, float, int, int, bool]:
        rng = np.random.default_rng([self.seed, i])
        photo = self.photos[int(rng.integers(len(self.photos)))]
        scales = [s for s in self.scales if min(scaled_photo(photo, s).size) >= self.size]
        scale = scales[int(rng.integers(len(scales)))]
        w, h = scaled_photo(photo, scale).size
        y, x = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
        return photo, scale, y, x, bool(rng.integers(2))

    def key(self, i: int) -> str:
        """Stable id: "astronaut@17" (train) or "retina@0.5:128,256" (eval: photo@scale:y,x)."""
        if self.split == "train":
            return f"{self._draw(i)[0]}@{i}"
        p, s, y, x = self.tiles[i]
        return f"{p}@{s:g}:{y},{x}"

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num:
            raise IndexError(i)
        if self.split == "train":
            photo, scale, y, x, flip = self._draw(i)
        else:
            (photo, scale, y, x), flip = self.tiles[i], False
        crop = scaled_photo(photo, scale).crop((x, y, x + self.size, y + self.size))
        t = to_tensor(crop)
        return t.flip(-1) if flip else t
