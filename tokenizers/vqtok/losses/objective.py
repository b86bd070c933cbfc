"""The tokenizer objective: reconstruction + perceptual + STFT + quantizer + adaptive hinge GAN.

``TokenizerObjective.generator_loss`` returns the autoencoder's loss and a dict of detached terms;
``discriminator_loss`` returns the discriminator's hinge loss. Weights come from the "loss"
config section (see :class:`vqtok.config.LossConfig`).
"""

from __future__ import annotations

import torch
from torch import nn

from .adversarial import adaptive_weight, disc_factor, hinge_d_loss, hinge_g_loss
from .perceptual import PerceptualLoss
from .reconstruction import multi_resolution_stft_loss, reconstruction_loss


class TokenizerObjective(nn.Module):
    """Args mirror LossConfig: rec ("l1"|"l2"), rec_weight, perceptual_weight, perceptual_net,
    stft_weight, quantizer_weight, adv_weight, disc_start, adaptive_weight (bool)."""

    def __init__(self, modality: str, rec: str = "l1", rec_weight: float = 1.0, perceptual_weight: float = 0.0,
                 perceptual_net: str = "alex", stft_weight: float = 0.0, quantizer_weight: float = 1.0,
                 adv_weight: float = 0.0, disc_start: int = 0, adaptive_weight: bool = True,
                 perceptual_pretrained: bool = True):
        super().__init__()
        self.modality, self.rec, self.rec_weight = modality, rec, rec_weight
        self.perceptual_weight, self.stft_weight, self.quantizer_weight = perceptual_weight, stft_weight, quantizer_weight
        self.adv_weight, self.disc_start, self.use_adaptive = adv_weight, disc_start, adaptive_weight
        self.perceptual = None
        if perceptual_weight > 0:
            if modality == "audio":
                raise ValueError("loss.perceptual_weight must be 0 for audio (LPIPS is an image loss)")
            self.perceptual = PerceptualLoss(perceptual_net, pretrained=perceptual_pretrained)

    @property
    def uses_discriminator(self) -> bool:
        return self.adv_weight > 0

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, quant_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None, discriminator: nn.Module | None = None):
        """x, recon [B, C, *S]; quant_loss scalar. Returns (loss, {name: float tensor})."""
        rec = reconstruction_loss(recon, x, self.rec)
        nll = self.rec_weight * rec
        logs = {"rec_loss": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(recon, x)
            nll = nll + self.perceptual_weight * p
            logs["perceptual_loss"] = p.detach()
        if self.stft_weight > 0:
            s = multi_resolution_stft_loss(recon, x)
            nll = nll + self.stft_weight * s
            logs["stft_loss"] = s.detach()
        loss = nll + self.quantizer_weight * quant_loss.float()
        logs["quant_loss"] = quant_loss.detach().float()
        if self.uses_discriminator and discriminator is not None and disc_factor(step, self.disc_start) > 0:
            g = hinge_g_loss(discriminator(recon))
            if self.use_adaptive and last_layer is not None and torch.is_grad_enabled():
                w = adaptive_weight(nll, g, last_layer)
            else:
                w = torch.ones((), device=g.device)
            loss = loss + self.adv_weight * w * g
            logs["g_loss"], logs["adaptive_weight"] = g.detach(), w
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module, step: int) -> torch.Tensor | None:
        """Hinge loss on real x vs detached recon; None before ``disc_start``."""
        if not self.uses_discriminator or disc_factor(step, self.disc_start) == 0:
            return None
        return hinge_d_loss(discriminator(x.detach()), discriminator(recon.detach()))
