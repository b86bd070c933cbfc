"""Metrics: codebook health (``codebook``), reconstruction (PSNR, SSIM), perceptual (LPIPS),
rFID (``fid``) and their streaming, DDP-aware accumulation (``accumulate``).

Only the light pixel metrics are imported here; LPIPS and FID load their networks on demand.
"""

from .reconstruction import mse, psnr, psnr_from_mse, ssim

__all__ = ["mse", "psnr", "psnr_from_mse", "ssim"]
