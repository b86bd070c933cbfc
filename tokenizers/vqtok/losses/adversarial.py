"""Hinge GAN losses and VQGAN's adaptive generator weight (Esser et al., 2021, eq. 7).

The generator's adversarial term is scaled by ``lambda = ||grad_L rec|| / (||grad_L gan|| + 1e-4)``
where L is the decoder's last layer, so neither term dominates; it is off (0) before ``disc_start``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss, averaged over scales: mean(relu(1 - real)) + mean(relu(1 + fake))."""
    terms = [F.relu(1.0 - r.float()).mean() + F.relu(1.0 + f.float()).mean() for r, f in zip(logits_real, logits_fake)]
    return 0.5 * torch.stack(terms).mean()


def hinge_g_loss(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss: -mean(D(fake)), averaged over scales."""
    return -torch.stack([f.float().mean() for f in logits_fake]).mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight], detached.

    Both losses must still have their graphs (this calls autograd.grad with retain_graph=True).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def disc_factor(step: int, disc_start: int) -> float:
    """1.0 once ``step >= disc_start`` else 0.0 (the discriminator start step)."""
    return 1.0 if step >= disc_start else 0.0
