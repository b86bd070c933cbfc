"""Reconstruction FID (rFID): Fréchet distance between Inception-v3 pool3 features of the
originals and of their reconstructions (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium").

The feature extractor is the FID variant of Inception-v3 (the TensorFlow 2015-12-05 graph ported
to PyTorch, file ``pt_inception-2015-12-05-6726825d.pth``), built here from torchvision's
Inception3 blocks with the FID pooling differences: average pools exclude padding, and the last
block max-pools its pool branch. The weights are read from the torch hub cache only; when they are
missing, ``load_fid_extractor`` returns an ``Unavailable`` naming the file to provide.

Features are accumulated as running mean / covariance (``GaussianAccumulator``), so memory stays
bounded and DDP ranks combine by summing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .accumulate import GaussianAccumulator
from .perceptual import Unavailable, hub_checkpoint_path

__all__ = ["FID_WEIGHTS_FILE", "FIDInceptionV3", "load_fid_extractor", "frechet_distance", "FIDAccumulator"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_FEATURE_DIM = 2048


def _fid_blocks():
    """torchvision Inception blocks with the FID graph's pooling (imported lazily: torchvision is optional)."""
    from torchvision.models import inception as tvi

    class FIDInceptionA(tvi.InceptionA):
        def _forward(self, x):
            pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, pool]

    class FIDInceptionC(tvi.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                          self.branch7x7dbl_4, self.branch7x7dbl_5):
                bd = layer(bd)
            pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return [self.branch1x1(x), b7, bd, pool]

    class FIDInceptionE(tvi.InceptionE):
        """Mixed_7b pools with an average excluding padding; Mixed_7c (max_pool=True) with a max."""

        def __init__(self, in_channels, max_pool: bool = False):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            if self.max_pool:
                pooled = F.max_pool2d(x, 3, stride=1, padding=1)
            else:
                pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]

    return tvi, FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInceptionV3(nn.Module):
    """Inception-v3 up to pool3: x [B, 3, H, W] in [-1, 1] -> features float32 [B, 2048].

    Inputs are resized to 299x299 (bilinear, as pytorch-fid does). The parameter names equal
    torchvision's ``Inception3`` with 1008 classes, which is the layout of the FID weights file.
    Constructed with random weights; ``load_fid_extractor`` loads the real ones.
    """

    def __init__(self) -> None:
        super().__init__()
        tvi, fid_a, fid_c, fid_e = _fid_blocks()
        net = tvi.Inception3(
            num_classes=1008, aux_logits=False, init_weights=False,
            inception_blocks=[tvi.BasicConv2d, fid_a, tvi.InceptionB, fid_c, tvi.InceptionD, fid_e, tvi.InceptionAux],
        )
        net.Mixed_7c = fid_e(2048, max_pool=True)
        for name, child in net.named_children():  # same parameter names as the weights file (fc included)
            self.add_module(name, child)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID features need images [B, 1|3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        n = self
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_fid_extractor(device: str | torch.device = "cpu") -> FIDInceptionV3 | Unavailable:
    """The FID Inception with its real weights from the torch hub cache, or ``Unavailable``."""
    try:
        import torchvision  # noqa: F401
    except ImportError as e:
        return Unavailable("rfid", f"rFID needs torchvision ({e}); pip install torchvision")
    path = hub_checkpoint_path(FID_WEIGHTS_FILE)
    if not os.path.isfile(path):
        return Unavailable("rfid", "rFID needs the FID Inception-v3 weights, not found in the torch hub cache", path)
    model = FIDInceptionV3()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval().to(device)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.t()


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), in float64.

    tr((cov1 cov2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix s1 cov2 s1 (s1 = cov1^(1/2)), which has the same spectrum as cov1 cov2;
    this avoids the complex parts scipy's sqrtm produces on rank-deficient covariances.
    """
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shapes disagree: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    s1 = _sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_covmean = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean)


class FIDAccumulator:
    """Streaming rFID: ``update(real, recon)`` on batches in [-1, 1]; ``compute() -> float``.

    Video batches [B, C, T, H, W] contribute every frame. ``extractor`` maps [n, 3, H, W] to
    [n, dim] features (``FIDInceptionV3`` with real weights in practice).
    """

    def __init__(self, extractor: nn.Module, dim: int = FID_FEATURE_DIM, chunk: int = 32) -> None:
        self.extractor = extractor
        self.real = GaussianAccumulator(dim)
        self.fake = GaussianAccumulator(dim)
        self.chunk = chunk

    def _feats(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        dev = next(self.extractor.parameters()).device
        return torch.cat([self.extractor(x[s : s + self.chunk].to(dev)) for s in range(0, x.shape[0], self.chunk)])

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor) -> None:
        self.real.update(self._feats(real))
        self.fake.update(self._feats(recon))

    @property
    def count(self) -> int:
        return self.real.count

    def all_reduce(self) -> None:
        self.real.all_reduce()
        self.fake.all_reduce()

    def compute(self) -> float:
        mu1, c1 = self.real.compute()
        mu2, c2 = self.fake.compute()
        return frechet_distance(mu1, c1, mu2, c2)
