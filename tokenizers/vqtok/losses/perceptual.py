"""LPIPS perceptual loss (Zhang et al., 2018) through the ``lpips`` package, strictly offline.

The linear-head weights ship inside the ``lpips`` package; the backbone (AlexNet/VGG/SqueezeNet)
comes from torchvision's ImageNet weights in the torch hub cache. Nothing is downloaded: when the
backbone file is missing, :func:`check_lpips_weights` raises an error naming the file and where
to put it (there is no silent fallback to random weights).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# torchvision's ImageNet weight files used by lpips.LPIPS(net=...)
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MissingWeightsError(RuntimeError):
    """A pretrained weight file needed offline is not on disk."""


def backbone_path(net: str) -> str:
    """Where torchvision looks for the LPIPS backbone of ``net``: <torch hub dir>/checkpoints/<file>."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"loss.perceptual_net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    return os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[net])


def check_lpips_weights(net: str = "alex") -> str:
    """Return the backbone file path, or raise :class:`MissingWeightsError` saying how to provide it."""
    path = backbone_path(net)
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"LPIPS perceptual loss needs the {net} backbone weights file {BACKBONE_FILES[net]!r}, "
            f"expected at {path} (torch hub cache; set TORCH_HOME to move it). This machine cannot "
            f"download it: copy the file there from a machine with internet access, or disable the "
            f"perceptual loss with --set loss.perceptual_weight=0")
    return path


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance between images in [-1, 1]: [B, 3, H, W] (video [B, 3, T, H, W] is
    folded to frames). Frozen; ``pretrained=False`` builds random weights (tests only)."""

    def __init__(self, net: str = "alex", pretrained: bool = True):
        super().__init__()
        try:
            import lpips
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the perceptual loss needs the 'lpips' package: pip install lpips") from e
        if pretrained:
            check_lpips_weights(net)
        self.lpips = lpips.LPIPS(net=net, pretrained=pretrained, pnet_rand=not pretrained, verbose=False)
        self.lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays in eval mode
        return super().train(False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.dim() == 5:  # video -> frames
            recon = recon.transpose(1, 2).flatten(0, 1)
            target = target.transpose(1, 2).flatten(0, 1)
        return self.lpips(recon.float(), target.float()).mean()
