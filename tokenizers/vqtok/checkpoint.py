"""Run-folder checkpoints: atomic writes, keep-last-N, ``latest`` pointer, exact resume, loading.

Layout (only rank 0 writes)::

    RUN/checkpoints/step_00001000/model.safetensors   autoencoder weights (state_dict)
                                 /ema.safetensors     EMA weights (when train.ema_decay > 0)
                                 /state.pt            optimizer, scheduler, scaler, discriminator,
                                                      RNG states, step (torch.load(weights_only=True))
                                 /meta.json           step, time, resolved config, file sizes
    RUN/checkpoints/latest                            name of the newest complete checkpoint dir

A checkpoint is written into a temporary sibling directory and renamed into place, then
``latest`` is replaced atomically, so a kill at any moment leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_FILE, EMA_FILE, STATE_FILE, META_FILE, LATEST = "model.safetensors", "ema.safetensors", "state.pt", "meta.json", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, state: dict, config: dict,
                    ema: dict[str, torch.Tensor] | None = None, keep_last: int = 3) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically, update ``latest``, prune to ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_dict(model), str(tmp / MODEL_FILE))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
    torch.save(state, tmp / STATE_FILE)
    files = {f.name: f.stat().st_size for f in tmp.iterdir()}
    meta = {"step": step, "time": time.time(), "files": files, "has_ema": ema is not None, "config": config}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST, name + "\n")
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder -> its latest checkpoint dir; a checkpoint dir -> itself."""
    p = Path(path)
    if (p / META_FILE).is_file() or (p / MODEL_FILE).is_file():
        return p
    latest = p / "checkpoints" / LATEST
    if not latest.is_file():
        raise CheckpointError(f"{p}: not a checkpoint directory and no run checkpoint pointer {latest}")
    name = latest.read_text().strip()
    ck = p / "checkpoints" / name
    if not ck.is_dir():
        raise CheckpointError(f"{latest} points to {name!r}, which does not exist")
    return ck


def read_meta(ckpt: Path) -> dict:
    f = ckpt / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: missing (incomplete checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt or truncated JSON ({e})") from None
    for name, size in meta.get("files", {}).items():
        g = ckpt / name
        if g.is_file() and g.stat().st_size != size:
            raise CheckpointError(f"{g}: truncated or modified ({g.stat().st_size} bytes, expected {size})")
    return meta


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def load_state(ckpt: Path, map_location="cpu") -> dict:
    f = ckpt / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad bytes
        raise CheckpointError(f"{f}: corrupt or truncated ({type(e).__name__}: {e})") from None


def load_into(module: nn.Module, file: Path) -> None:
    """Load a safetensors state dict into ``module`` (strict); errors name the file."""
    sd = load_tensors(file)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: does not match the model ({e})") from None


def load_model(path: str | os.PathLike, use_ema: bool = True, map_location="cpu"):
    """Load a trained autoencoder. ``path``: a run folder (its latest checkpoint) or a checkpoint
    dir. Returns (model.eval(), config dict). EMA weights are used when present and ``use_ema``."""
    from vqtok.models import build_autoencoder

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{ckpt / META_FILE}: has no 'config' section")
    model = build_autoencoder(cfg)
    load_into(model, ckpt / (EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else MODEL_FILE))
    return model.to(map_location).eval(), cfg
