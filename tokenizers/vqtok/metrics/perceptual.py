"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") through the ``lpips`` package, with real weights only.

The lpips linear-layer weights ship inside the ``lpips`` package; the backbone (AlexNet / VGG16 /
SqueezeNet ImageNet weights) comes from torchvision through the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``). Nothing is
downloaded here: when the backbone file is missing, ``load_lpips`` returns an ``Unavailable``
that names the exact file to provide, never a number computed with random weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

__all__ = ["Unavailable", "LPIPSMetric", "load_lpips", "hub_checkpoint_path", "LPIPS_BACKBONE_FILES"]

# torchvision ImageNet weights the lpips backbones load (file names from torchvision's weight URLs)
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed: why, and the file that would make it available."""

    metric: str
    reason: str
    path: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.reason + (f" (provide {self.path})" if self.path else "")


def hub_checkpoint_path(filename: str) -> str:
    """Where torch.hub looks for a cached checkpoint: ``torch.hub.get_dir()/checkpoints/filename``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _frames(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, C, H, W] -> itself; [B, C, T, H, W] -> [B*T, C, H, W] (LPIPS of video = mean over frames)."""
    if x.ndim == 4:
        return x, 1
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t
    raise ValueError(f"LPIPS needs images [B, C, H, W] or video [B, C, T, H, W], got shape {tuple(x.shape)}")


class LPIPSMetric:
    """Per-sample LPIPS distance of batches in [-1, 1]. ``metric(x, y) -> float64 [B]``.

    Wraps an ``lpips.LPIPS`` module. Use ``load_lpips`` to get one with real weights; tests may
    pass ``lpips.LPIPS(pnet_rand=True)`` directly to exercise the code path (``real_weights=False``
    marks such an instance so its numbers are never reported as LPIPS).
    """

    def __init__(self, module: torch.nn.Module, *, net: str = "alex", real_weights: bool = True,
                 chunk: int = 32) -> None:
        self.module = module.eval().requires_grad_(False)
        self.net = net
        self.real_weights = real_weights
        self.chunk = chunk

    def to(self, device) -> "LPIPSMetric":
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx, frames = _frames(x)
        fy, _ = _frames(y)
        if fx.shape[1] == 1:  # grey -> RGB
            fx, fy = fx.expand(-1, 3, -1, -1), fy.expand(-1, 3, -1, -1)
        if fx.shape[1] != 3:
            raise ValueError(f"LPIPS needs 1 or 3 channels, got {fx.shape[1]}")
        dev = self.device
        out = []
        for s in range(0, fx.shape[0], self.chunk):
            a = fx[s : s + self.chunk].to(dev, torch.float32)
            b = fy[s : s + self.chunk].to(dev, torch.float32)
            out.append(self.module(a, b, normalize=False).reshape(-1).to("cpu", torch.float64))
        return torch.cat(out).reshape(-1, frames).mean(1)


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> LPIPSMetric | Unavailable:
    """LPIPS with its real weights, or ``Unavailable`` saying which file is missing.

    Never downloads: the torchvision backbone must already be in the torch hub cache.
    """
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    try:
        import lpips  # noqa: F401
    except ImportError as e:
        return Unavailable("lpips", f"the 'lpips' package is not installed ({e}); pip install lpips")
    path = hub_checkpoint_path(LPIPS_BACKBONE_FILES[net])
    if not os.path.isfile(path):
        return Unavailable(
            "lpips",
            f"LPIPS needs the torchvision {net} ImageNet backbone weights, not found in the torch hub cache",
            path,
        )
    import warnings

    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices inside lpips
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    return LPIPSMetric(module, net=net, real_weights=True).to(device)
