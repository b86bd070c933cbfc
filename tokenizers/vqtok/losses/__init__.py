"""Training losses: reconstruction (L1/L2), perceptual (LPIPS, offline), hinge GAN with VQGAN's
adaptive weight and a discriminator start step, and the multi-resolution STFT loss for audio."""

from .adversarial import adaptive_weight, disc_factor, hinge_d_loss, hinge_g_loss
from .objective import TokenizerObjective
from .perceptual import MissingWeightsError, PerceptualLoss, backbone_path, check_lpips_weights
from .reconstruction import multi_resolution_stft_loss, reconstruction_loss

__all__ = [
    "TokenizerObjective", "reconstruction_loss", "multi_resolution_stft_loss", "PerceptualLoss",
    "MissingWeightsError", "check_lpips_weights", "backbone_path", "hinge_d_loss", "hinge_g_loss",
    "adaptive_weight", "disc_factor",
]
