"""Training configuration: dataclass sections, presets by name, YAML files, ``--set`` overrides.

A config has five sections — model, quantizer, data, train, loss. ``quantizer`` is a dict
{"name": ..., **kwargs of vqtok.quantizers.build_quantizer}; its keys are checked by building the
quantizer. Every other key is a dataclass field below, with its default and meaning.

    cfg = load_config(preset="demo", yaml_path=None, overrides=["train.steps=100"])
    cfg.to_dict()   # {"model": {...}, "quantizer": {...}, "data": {...}, "train": {...}, "loss": {...}}

Unknown keys and wrong types raise :class:`ConfigError` naming the key, before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration key or value; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    modality: str = "image"  # image | video | audio
    in_channels: int = 0  # 0: 3 for image/video, 1 for audio
    channels: int = 64  # base width of the encoder/decoder
    channel_mult: list[int] = field(default_factory=list)  # per-level width multipliers; []: 1,1,2,2,4,...
    num_res_blocks: int = 1  # ResNet blocks per level (image/video)
    downsample: int = 8  # spatial down-sampling f (image/video): 4, 8, 16
    time_downsample: int = 4  # temporal down-sampling (video): T = 1 + 4k frames -> 1 + k
    strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])  # audio hop = prod(strides)
    latent_dim: int = 64  # encoder output channels (projected to the quantizer's dim)
    attention: bool = False  # mid-block self-attention (image/video)


@dataclass
class DataConfig:
    modality: str = ""  # filled from model.modality
    source: str = "builtin"  # builtin (offline photos / clips / synthetic audio) | folder
    path: str = ""  # folder of training files (source=folder)
    eval_path: str = ""  # folder of eval files; "": a hashed eval_fraction of `path`
    eval_fraction: float = 0.05
    size: int = 64  # crop side (image/video)
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0])  # built-in photo rescale factors
    frames: int = 17  # clip length (video)
    length: int = 16384  # samples per clip (audio)
    sample_rate: int = 16000  # audio
    train_samples: int = 0  # virtual train set size (built-in data / folders); 0: default
    eval_samples: int = 0  # cap on eval samples; 0: all (built-in images) or a default
    seed: int = 0  # seed of the crop / clip / signal draws
    num_workers: int = 0  # DataLoader workers


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # per process
    lr: float = 2e-4  # peak learning rate (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    # module path -> multiple of the learning rate, e.g. {"quantizer.proj": 3.0}: SimVQ's linear map
    # at 3x (the quantizer study's setting); every other parameter trains at the schedule's rate
    lr_scales: dict[str, float] = field(default_factory=dict)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0: off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a GradScaler)
    ema_decay: float = 0.0  # EMA of weights; 0: off
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0: torch default
    log_every: int = 10  # steps between train lines in metrics.jsonl
    eval_every: int = 0  # steps between held-out evals; 0: only at the end
    eval_batches: int = 0  # cap on eval batches; 0: the whole eval set
    ckpt_every: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    disc_lr: float = 0.0  # discriminator lr; 0: same as lr
    tensorboard: bool = True  # also log to RUN/tb when tensorboard is installed
    deterministic: bool = True  # torch.use_deterministic_algorithms (CPU runs are bitwise repeatable)


@dataclass
class LossConfig:
    rec: str = "l1"  # l1 | l2
    rec_weight: float = 1.0
    perceptual_weight: float = 0.0  # LPIPS (needs the backbone in the torch hub cache)
    perceptual_net: str = "alex"  # alex | vgg | squeeze
    stft_weight: float = 0.0  # multi-resolution STFT (audio)
    quantizer_weight: float = 1.0  # multiplies the quantizer's own (already weighted) loss
    adv_weight: float = 0.0  # hinge GAN; 0: no discriminator
    disc_start: int = 0  # step at which the discriminator starts
    adaptive_weight: bool = True  # VQGAN's adaptive generator weight
    disc_channels: int = 64
    disc_layers: int = 3


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "loss": LossConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: dict = field(default_factory=lambda: {"name": "fsq", "levels": [8, 5, 5, 5]})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "quantizer": copy.deepcopy(self.quantizer),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
                "loss": dataclasses.asdict(self.loss)}


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # Offline image tokenizer for 2 CPU cores (~3.5 min of CPU time): f8 conv autoencoder, VQ with
    # 1024 codes in an 8-d code space (k-means init, EMA codebook, dead-code restarts), 32x32 crops,
    # no LPIPS (weights are not available offline), no GAN. Scales include 1.0 so that the held-out
    # set (3750 tiles = 60k tokens, ~59 per code) can show every code it uses: with 0.25/0.5 only it
    # has 13.8k tokens and usage cannot approach 1. dead_code_threshold is an EMA count per step:
    # a step sees 256 tokens, 0.25 per code on average, so codes under 1/5 of the mean restart.
    # One thread: runs are bitwise repeatable and the time predictable; at these tensor sizes a
    # second thread gains little and, on a loaded machine, its OpenMP threads stall each other
    # (12x slower per step in the README's measurement, "The demo").
    "demo": {
        "model": {"modality": "image", "channels": 16, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                  "downsample": 8, "latent_dim": 32},
        "quantizer": {"name": "vq", "dim": 8, "codebook_size": 1024, "kmeans_init": True,
                      "dead_code_threshold": 0.05},
        "data": {"size": 32, "scales": [0.25, 0.5, 1.0], "train_samples": 200000},
        "train": {"steps": 1500, "batch_size": 16, "lr": 2e-3, "warmup_steps": 50, "min_lr_ratio": 0.05,
                  "ema_decay": 0.0, "ckpt_every": 500, "log_every": 25, "eval_every": 500, "threads": 1},
        "loss": {"rec": "l1", "perceptual_weight": 0.0, "adv_weight": 0.0},
    },
    # VQGAN / LlamaGen-style f8 and f16 image tokenizers (GPU scale).
    "image-f8": {
        "model": {"modality": "image", "channels": 128, "channel_mult": [1, 1, 2, 4], "num_res_blocks": 2,
                  "downsample": 8, "latent_dim": 256, "attention": True},
        "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16384, "metric": "cosine",
                      "kmeans_init": True, "dead_code_threshold": 1.0},
        "data": {"size": 256, "scales": [0.5, 1.0]},
        "train": {"steps": 100000, "batch_size": 16, "lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.999,
                  "precision": "bf16", "ckpt_every": 5000, "eval_every": 5000},
        "loss": {"perceptual_weight": 1.0, "adv_weight": 0.5, "disc_start": 20000},
    },
    "image-f16": {
        "model": {"modality": "image", "channels": 128, "channel_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                  "downsample": 16, "latent_dim": 256, "attention": True},
        "quantizer": {"name": "vq", "dim": 8, "codebook_size": 16384, "metric": "cosine",
                      "kmeans_init": True, "dead_code_threshold": 1.0},
        "data": {"size": 256, "scales": [0.5, 1.0]},
        "train": {"steps": 100000, "batch_size": 16, "lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.999,
                  "precision": "bf16", "ckpt_every": 5000, "eval_every": 5000},
        "loss": {"perceptual_weight": 1.0, "adv_weight": 0.5, "disc_start": 20000},
    },
    # MAGVIT-v2-style causal video tokenizer with LFQ (2^18 codes).
    "video": {
        "model": {"modality": "video", "channels": 64, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 2,
                  "downsample": 8, "time_downsample": 4, "latent_dim": 128},
        "quantizer": {"name": "lfq", "dim": 18},
        "data": {"size": 128, "frames": 17},
        "train": {"steps": 100000, "batch_size": 4, "lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.999,
                  "precision": "bf16", "ckpt_every": 5000, "eval_every": 5000},
        "loss": {"perceptual_weight": 0.1, "adv_weight": 0.1, "disc_start": 20000},
    },
    # SoundStream/DAC-style audio codec: hop 320 at 16 kHz (50 tokens/s), residual VQ.
    "audio": {
        "model": {"modality": "audio", "channels": 32, "strides": [2, 4, 5, 8], "latent_dim": 64},
        "quantizer": {"name": "rvq", "dim": 64, "num_quantizers": 8, "codebook_size": 1024, "kmeans_init": True,
                      "dead_code_threshold": 1.0},
        "data": {"length": 16000, "sample_rate": 16000},
        "train": {"steps": 100000, "batch_size": 16, "lr": 3e-4, "warmup_steps": 1000, "ema_decay": 0.999,
                  "ckpt_every": 5000, "eval_every": 5000},
        "loss": {"rec": "l1", "rec_weight": 0.1, "stft_weight": 1.0, "adv_weight": 1.0, "disc_start": 10000,
                 "disc_channels": 32},
    },
}


# --------------------------------------------------------------------------------------------
# typed assignment
# --------------------------------------------------------------------------------------------
_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[int|float],
    dict[str, float])."""
    origin = typing.get_origin(tp)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {kt.__name__} to {vt.__name__}, got {value!r}")
        return {_coerce(f"{key} key", k, kt): _coerce(f"{key}[{k!r}]", v, vt) for k, v in value.items()}
    if origin is list:
        (elem,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {elem.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    section = parts[0]
    if section == "quantizer":
        if len(parts) != 2 or not re.fullmatch(r"[A-Za-z_]\w*", parts[1]):
            raise ConfigError(f"{key}: quantizer keys are 'quantizer.<name>'")
        cfg.quantizer[parts[1]] = value
        return
    if section not in SECTIONS:
        raise ConfigError(f"{key}: unknown section {section!r}; sections are model, quantizer, data, train, loss")
    if len(parts) != 2:
        raise ConfigError(f"{key}: expected '<section>.<field>'")
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if parts[1] not in hints:
        raise ConfigError(f"{key}: unknown key; {section} keys are {', '.join(sorted(hints))}")
    setattr(obj, parts[1], _coerce(key, value, hints[parts[1]]))


def update_from_dict(cfg: Config, d: dict, replace_quantizer: bool = True) -> Config:
    """Apply a nested dict {section: {key: value}} onto ``cfg`` (in place); returns cfg."""
    if not isinstance(d, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(d).__name__}")
    for section, values in d.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping, got {values!r}")
        if section == "quantizer" and replace_quantizer and "name" in values:
            cfg.quantizer = {}
        for k, v in values.items():
            _set(cfg, f"{section}.{k}", v)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=100' -> ("train.steps", 100); the value is parsed as YAML (so [8,5,5], true, 1e-3)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def preset(name: str) -> Config:
    """A fresh Config from the named preset (demo, image-f8, image-f16, video, audio)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return update_from_dict(Config(), copy.deepcopy(PRESETS[name]))


def load_config(preset_name: str | None = None, yaml_path: str | None = None, overrides: list[str] = (),
                base: dict | None = None) -> Config:
    """Preset (or ``base`` dict, or defaults) <- YAML file <- ``--set`` overrides, then validated."""
    cfg = preset(preset_name) if preset_name else Config()
    if base is not None:
        update_from_dict(cfg, base)
    if yaml_path:
        with open(yaml_path) as f:
            try:
                d = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{yaml_path}: invalid YAML: {e}") from None
        update_from_dict(cfg, d)
    for o in overrides:
        k, v = parse_override(o)
        if k == "quantizer.name":
            cfg.quantizer = {}
        _set(cfg, k, v)
    validate(cfg)
    return cfg


def from_dict(d: dict) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a run's config.json), validated."""
    cfg = update_from_dict(Config(), d)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")


def _positive(cfg: Config, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        s, f = key.split(".")
        v = getattr(getattr(cfg, s), f)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def validate(cfg: Config) -> None:
    """Value checks that need no model; quantizer kwargs are checked by :func:`check_quantizer`."""
    m, d, t, lo = cfg.model, cfg.data, cfg.train, cfg.loss
    _choice("model.modality", m.modality, ("image", "video", "audio"))
    if d.modality and d.modality != m.modality:
        raise ConfigError(f"data.modality: {d.modality!r} does not match model.modality {m.modality!r}")
    d.modality = m.modality
    _choice("data.source", d.source, ("builtin", "folder"))
    _choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("loss.rec", lo.rec, ("l1", "l2"))
    _choice("loss.perceptual_net", lo.perceptual_net, ("alex", "vgg", "squeeze"))
    _positive(cfg, "model.channels", "model.latent_dim", "model.num_res_blocks", "model.downsample",
              "model.time_downsample", "data.size", "data.frames", "data.length", "data.sample_rate",
              "train.steps", "train.batch_size", "train.lr", "train.ckpt_every", "train.keep_last", "train.log_every")
    _positive(cfg, "train.warmup_steps", "train.weight_decay", "train.grad_clip", "train.eval_every",
              "train.eval_batches", "train.threads", "train.disc_lr", "loss.perceptual_weight", "loss.stft_weight",
              "loss.adv_weight", "loss.disc_start", "data.num_workers", "model.in_channels", allow_zero=True)
    for path, scale in t.lr_scales.items():
        if not path or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"train.lr_scales[{path!r}]: expected a module path and a positive multiple, got {scale}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if m.modality == "audio" and lo.perceptual_weight > 0:
        raise ConfigError("loss.perceptual_weight: must be 0 for audio (LPIPS is an image loss)")
    if m.modality == "audio" and (not m.strides or min(m.strides) < 1):
        raise ConfigError(f"model.strides: expected positive integers, got {m.strides}")
    if m.modality == "video" and (d.frames - 1) % m.time_downsample:
        raise ConfigError(f"data.frames: {d.frames} must be 1 + a multiple of model.time_downsample={m.time_downsample}")
    if m.modality in ("image", "video") and d.size % m.downsample:
        raise ConfigError(f"data.size: {d.size} must be a multiple of model.downsample={m.downsample}")
    if "name" not in cfg.quantizer or not isinstance(cfg.quantizer["name"], str):
        raise ConfigError("quantizer.name: required (vq, rvq, fsq, lfq, bsq, simvq)")


def check_quantizer(cfg: Config):
    """Build the quantizer once to check its keys; returns it. Errors name ``quantizer.<key>``."""
    from vqtok.quantizers import build_quantizer

    q = dict(cfg.quantizer)
    name = q.pop("name")
    try:
        return build_quantizer(name, **q)
    except TypeError as e:
        m = re.search(r"keyword argument '(\w+)'", str(e))
        key = f"quantizer.{m.group(1)}" if m else "quantizer"
        raise ConfigError(f"{key}: {e} (quantizer {name!r})") from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"quantizer: {e} (quantizer {name!r})") from None
