"""``Tokenizer``: a trained VQ autoencoder as a tokenizer (encode batches to ids, decode ids back).

    tok = Tokenizer.from_pretrained("runs/demo")        # a run folder, a checkpoint dir, or a saved tokenizer
    ids = tok.encode(images)                            # [B, 3, H, W] in [-1, 1] -> int64 [B, h, w]
    recon = tok.decode(ids)                             # -> [B, 3, H, W] in [-1, 1]
    tok.save_pretrained("my-tokenizer")                 # config.json + model.safetensors (no pickle)

The model is always in eval mode; loading from a run prefers the EMA weights when the checkpoint
has them. ``weights_sha256`` identifies the weights actually used (a hash over the state dict's
names, dtypes, shapes and bytes, independent of the file they came from): token exports record it
so that tokens are never decoded with a different tokenizer by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_SAMPLE_NDIM = {"image": 3, "video": 4, "audio": 2}  # one sample: [C, H, W], [C, T, H, W], [C, T]


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and the raw bytes of each tensor."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Tokenizer:
    """Wraps a :class:`vqtok.models.VQAutoencoder` (eval mode) and the config it was built from.

    Args:
        model: the autoencoder.
        config: the resolved config dict (sections "model", "quantizer", and usually "data").
        device: where the model runs; inputs on another device are moved and results moved back.
    """

    def __init__(self, model: nn.Module, config: dict, device: str | torch.device = "cpu"):
        self.config = config
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self._sha: str | None = None

    # ---------------------------------------------------------------------------------------
    # loading and saving
    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", use_ema: bool = True
    ) -> Tokenizer:
        """Load a saved tokenizer folder (config.json + model.safetensors), a run folder (its latest
        checkpoint) or a checkpoint directory; ``use_ema`` picks the EMA weights when present."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such tokenizer, run folder or checkpoint")
        if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
            return cls._load_saved(path, device)
        if (path / CONFIG_FILE).is_file() and not (path / "checkpoints").exists():
            raise FileNotFoundError(f"{path / WEIGHTS_FILE}: missing (a saved tokenizer folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}; a run folder holds checkpoints/)")
        from vqtok.checkpoint import load_model

        model, cfg = load_model(path, use_ema=use_ema, map_location="cpu")
        return cls(model, cfg, device)

    @classmethod
    def _load_saved(cls, folder: Path, device) -> Tokenizer:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from vqtok.models import build_autoencoder

        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{folder / CONFIG_FILE}: unreadable tokenizer config ({e})") from None
        for section in ("model", "quantizer"):
            if section not in cfg:
                raise ValueError(f"{folder / CONFIG_FILE}: tokenizer config lacks the {section!r} section")
        model = build_autoencoder(cfg)
        try:
            state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{folder / WEIGHTS_FILE}: unreadable weights, truncated or corrupt ({e})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_FILE}: weights do not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return cls(model, cfg, device)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/config.json`` and ``folder/model.safetensors`` (the weights in use)."""
        from safetensors.torch import save

        from vqtok.data.tokens import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        blob = save(state, metadata={"format": "pt", "weights_sha256": self.weights_sha256})
        atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(blob))
        text = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode("utf-8")))
        return folder

    def to(self, device: str | torch.device) -> Tokenizer:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    # ---------------------------------------------------------------------------------------
    # properties
    # ---------------------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.model.modality

    @property
    def codebook_size(self) -> int:
        return int(self.model.quantizer.codebook_size)

    @property
    def weights_sha256(self) -> str:
        if self._sha is None:
            self._sha = state_dict_sha256(self.model)
        return self._sha

    def token_grid(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Token grid of ONE sample of shape ``input_shape`` (no batch axis)."""
        return tuple(self.model.token_grid(tuple(input_shape)))

    # ---------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: a batch [B, C, *S] (or one sample [C, *S]) in [-1, 1] -> int64 ids [B, *grid] ([*grid]).

        Image [B, 3, H, W] -> [B, h, w]; video [B, 3, T, H, W] -> [B, t, h, w]; audio [B, 1, T] -> [B, t];
        residual quantizers add a trailing depth axis. The result is on x's device.
        """
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"encode expects a float tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        nd = _SAMPLE_NDIM[self.modality]
        if x.ndim not in (nd, nd + 1):
            raise ValueError(
                f"{self.modality} tokenizer expects x of {nd + 1} dims [B, C, ...] or {nd} dims, got shape {tuple(x.shape)}"
            )
        single = x.ndim == nd
        xb = x.unsqueeze(0) if single else x
        ids = self.model.encode(xb.to(self.device, torch.float32)).to(x.device)
        return ids[0] if single else ids

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """int ids [B, *grid] (or one sample [*grid]) -> float32 [B, C, *S] in [-1, 1], on the ids' device."""
        if not torch.is_tensor(indices) or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"decode expects an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}), got [{int(indices.min())}, "
                             f"{int(indices.max())}]")
        single = indices.ndim == self._grid_ndim()
        ib = indices.unsqueeze(0) if single else indices
        x = self.model.decode(ib.to(self.device, torch.int64)).float().to(indices.device)
        return x[0] if single else x

    def _grid_ndim(self) -> int:
        depth = 1 if getattr(self.model.quantizer, "num_quantizers", None) else 0
        return {"image": 2, "video": 3, "audio": 1}[self.modality] + depth

    def __repr__(self) -> str:
        return (f"Tokenizer(modality={self.modality!r}, codebook_size={self.codebook_size}, "
                f"device={str(self.device)!r}, weights_sha256={self.weights_sha256[:12]}...)")
