"""``VQAutoencoder``: encoder -> 1x1 projection -> quantizer -> 1x1 projection -> decoder.

The same class serves the three modalities; only the encoder/decoder pair differs:

=========  ====================  ============================  ============================
modality   input x               indices (``encode``)          encoder
=========  ====================  ============================  ============================
image      [B, 3, H, W]          [B, H/f, W/f]                 2-D VQGAN (models/image.py)
video      [B, 3, T, H, W]       [B, 1+(T-1)/ft, H/f, W/f]      causal 3-D (models/video.py)
audio      [B, 1, T]             [B, T/hop]                    1-D SoundStream (models/audio.py)
=========  ====================  ============================  ============================

Residual quantizers append a depth axis to the indices. Inputs and outputs are in [-1, 1].
The quantizer always runs in fp32, also under autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vqtok.quantizers.base import Quantizer, QuantizerOutput

from .audio import audio_token_grid
from .image import image_token_grid
from .video import video_token_grid

MODALITIES = ("image", "video", "audio")


@dataclass
class AutoencoderOutput:
    """recon: same shape as the input; quant: the quantizer's output on the latent map."""

    recon: torch.Tensor
    quant: QuantizerOutput


class VQAutoencoder(nn.Module):
    """A discrete autoencoder.

    Args:
        modality: "image" | "video" | "audio".
        encoder: [B, C, *S] -> [B, latent_dim, *s].
        decoder: [B, latent_dim, *s] -> [B, C, *S]; must expose ``conv_out`` (its last layer).
        quantizer: a :class:`vqtok.quantizers.base.Quantizer` of dimension ``quantizer.dim``.
        latent_dim: channels of the encoder output / decoder input.
        grid: dict of the geometry used by :meth:`token_grid` (downsample, time_downsample, strides).
    """

    def __init__(self, modality: str, encoder: nn.Module, decoder: nn.Module, quantizer: Quantizer,
                 latent_dim: int, grid: dict):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.modality = modality
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        dims = {"image": 2, "video": 3, "audio": 1}[modality]
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.quant_conv = conv(latent_dim, quantizer.dim, 1)
        self.post_quant_conv = conv(quantizer.dim, latent_dim, 1)
        self.grid = dict(grid)

    # ---------------------------------------------------------------------------------------
    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantizer(z.float())

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        """x [B, C, *S] in [-1, 1] -> AutoencoderOutput(recon [B, C, *S], quant)."""
        quant = self._quantize(self._latent(x))
        recon = self.decoder(self.post_quant_conv(quant.quantized))
        return AutoencoderOutput(recon=recon, quant=quant)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, *S] -> int64 indices [B, *token_grid]."""
        z = self._latent(x)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantizer.encode(z.float()).long()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """int indices [B, *token_grid] -> x [B, C, *S] (clamped to [-1, 1])."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            q = self.quantizer.decode(indices.long())
        return self.decoder(self.post_quant_conv(q.to(self.post_quant_conv.weight.dtype))).clamp(-1, 1)

    def token_grid(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``encode``'s output for ONE sample of shape ``input_shape`` (no batch axis):
        image (C, H, W) -> (h, w); video (C, T, H, W) -> (t, h, w); audio (C, T) -> (t,);
        residual quantizers add a trailing depth axis."""
        shape = tuple(int(s) for s in input_shape)
        if self.modality == "image":
            grid = image_token_grid(shape, self.grid["downsample"])
        elif self.modality == "video":
            grid = video_token_grid(shape, self.grid["downsample"], self.grid["time_downsample"])
        else:
            grid = audio_token_grid(shape, self.grid["strides"])
        depth = getattr(self.quantizer, "num_quantizers", None)
        return tuple(grid) + ((int(depth),) if depth else ())

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output convolution (for the adaptive adversarial weight)."""
        layer = self.decoder.conv_out
        return layer.weight if isinstance(layer, nn.modules.conv._ConvNd) else layer.conv.weight
