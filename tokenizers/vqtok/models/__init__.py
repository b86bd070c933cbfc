"""Encoders, decoders and discriminators for images (2-D), video (causal 3-D) and audio (1-D).

``build_autoencoder(cfg)`` builds a :class:`VQAutoencoder` from a resolved config dict with
"model" and "quantizer" sections (see :mod:`vqtok.config`).
"""

from __future__ import annotations

from .audio import Decoder1d, Encoder1d
from .autoencoder import MODALITIES, AutoencoderOutput, VQAutoencoder
from .blocks import default_channel_mult
from .discriminators import PatchDiscriminator, STFTDiscriminator, build_discriminator
from .image import Decoder2d, Encoder2d, check_downsample
from .video import Decoder3d, Encoder3d

__all__ = [
    "AutoencoderOutput", "VQAutoencoder", "build_autoencoder", "build_discriminator",
    "PatchDiscriminator", "STFTDiscriminator", "Encoder2d", "Decoder2d", "Encoder3d", "Decoder3d",
    "Encoder1d", "Decoder1d",
]


def build_autoencoder(cfg: dict) -> VQAutoencoder:
    """Build the autoencoder described by ``cfg["model"]`` with the quantizer ``cfg["quantizer"]``.

    ``cfg["model"]`` keys (defaults in :class:`vqtok.config.ModelConfig`): modality, in_channels,
    channels, channel_mult, num_res_blocks, downsample, time_downsample, strides, latent_dim,
    attention. ``cfg["quantizer"]``: {"name": ..., **kwargs of vqtok.quantizers.build_quantizer}.
    """
    from vqtok.quantizers import build_quantizer

    m = dict(cfg["model"])
    q = dict(cfg["quantizer"])
    quantizer = build_quantizer(q.pop("name"), **q)
    modality = m["modality"]
    c_in, ch, dim = int(m.get("in_channels") or (1 if modality == "audio" else 3)), int(m["channels"]), int(m["latent_dim"])
    if modality == "audio":
        strides = [int(s) for s in m["strides"]]
        enc, dec = Encoder1d(c_in, ch, strides, dim), Decoder1d(c_in, ch, strides, dim)
        grid = {"strides": strides}
    else:
        down = int(m["downsample"])
        mult = list(m.get("channel_mult") or []) or default_channel_mult(down.bit_length())
        check_downsample(down, mult)
        nres, attn = int(m["num_res_blocks"]), bool(m.get("attention", False))
        if modality == "image":
            enc = Encoder2d(c_in, ch, mult, nres, dim, attn)
            dec = Decoder2d(c_in, ch, mult, nres, dim, attn)
            grid = {"downsample": down}
        elif modality == "video":
            td = int(m.get("time_downsample", 4))
            enc = Encoder3d(c_in, ch, mult, nres, dim, td, attn)
            dec = Decoder3d(c_in, ch, mult, nres, dim, td, attn)
            grid = {"downsample": down, "time_downsample": td}
        else:
            raise ValueError(f"model.modality must be one of {MODALITIES}, got {modality!r}")
    return VQAutoencoder(modality, enc, dec, quantizer, dim, grid)
