"""`vqtok train`: every preset at tiny sizes, run-folder layout, load_model, config and checkpoint errors."""

import json

import pytest
import torch
import yaml

from vqtok.checkpoint import CheckpointError, load_model
from vqtok.cli import main
from vqtok.config import ConfigError, load_config
from vqtok.train import lr_at, param_groups, train

COMMON = ["train.steps=2", "train.batch_size=2", "train.ckpt_every=1", "train.keep_last=1", "train.log_every=1",
          "train.eval_batches=1", "train.threads=1", "data.train_samples=8", "data.eval_samples=2",
          "train.tensorboard=false"]
TINY = {
    "demo": ["model.channels=4", "data.size=16"],
    "image-f8": ["model.channels=4", "data.size=16", "model.num_res_blocks=1", "quantizer.codebook_size=32",
                 "loss.perceptual_weight=0", "loss.disc_start=1", "loss.disc_channels=4", "loss.disc_layers=2",
                 "train.ema_decay=0.9"],
    "image-f16": ["model.channels=4", "data.size=32", "model.num_res_blocks=1", "quantizer.codebook_size=32",
                  "loss.perceptual_weight=0", "loss.adv_weight=0"],
    "video": ["model.channels=4", "data.size=16", "data.frames=5", "model.num_res_blocks=1", "loss.perceptual_weight=0",
              "loss.disc_start=1", "loss.disc_channels=4", "loss.disc_layers=2", "quantizer.dim=6"],
    "audio": ["model.channels=2", "data.length=640", "quantizer.codebook_size=16", "quantizer.num_quantizers=2",
              "loss.disc_start=1", "loss.disc_channels=4"],
}


@pytest.mark.parametrize("preset", list(TINY))
def test_preset_trains_tiny(preset, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(preset, None, COMMON + TINY[preset])
    res = train(cfg, run, progress=False)
    assert res["step"] == 2 and 0 < res["usage"] <= 1 and res["perplexity"] >= 1 and res["psnr"] > 0
    assert ("ssim" in res) == (preset != "audio")
    ck = run / "checkpoints" / "step_00000002"
    assert (run / "checkpoints" / "latest").read_text().strip() == ck.name and res["checkpoint"] == str(ck)
    assert not (run / "checkpoints" / "step_00000001").exists()  # keep_last=1
    assert (ck / "ema.safetensors").exists() == (cfg.train.ema_decay > 0)
    state = torch.load(ck / "state.pt", weights_only=True)
    assert state["step"] == 2 and ("discriminator" in state) == (cfg.loss.adv_weight > 0)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2]
    for key in ("loss", "rec_loss", "usage", "perplexity", "psnr", "lr", "time"):
        assert key in lines[0]
    if preset in ("image-f8", "video", "audio"):
        assert "g_loss" in lines[1] and "d_loss" in lines[1] and "adaptive_weight" in lines[1]
    saved = json.loads((run / "config.json").read_text())
    assert saved == yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    model, mcfg = load_model(run)
    assert not model.training and mcfg == saved
    x = torch.rand(1, *{"image": (3, 32, 32), "video": (3, 5, 16, 16), "audio": (1, 640)}[cfg.model.modality]) * 2 - 1
    assert model.encode(x).shape[1:] == model.token_grid(x.shape[1:])


def test_collapse_warning_waits_for_the_health_horizon(tmp_path, capsys):
    """A codebook that reads as collapsed from step 1 (1000 FSQ codes, 8 tokens a step) is warned
    about at step 100, once the tracker's EMA has a horizon behind it, and not again before 200."""
    from vqtok import train as train_mod

    overrides = [o for o in COMMON if not o.startswith("train.steps")] + TINY["demo"] + [
        "train.steps=150", "train.eval_every=1000", "train.log_every=1000", "train.ckpt_every=1000"]
    cfg = load_config("demo", None, overrides)
    cfg.quantizer = {"name": "fsq", "levels": [8, 5, 5, 5], "dim": cfg.quantizer["dim"]}
    train(cfg, tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "codebook collapse signalled" in line]
    assert len(warned) == 1 and f"step {train_mod.COLLAPSE_WARN_STEPS}:" in warned[0], warned


def test_lr_schedule():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "train.stepz: unknown key"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("model.attention=3", "model.attention: expected true/false"),
    ("train.precision=fp8", "train.precision: must be one of"),
    ("quantizer.bogus=1", "quantizer.bogus"),
    ("optim.lr=1", "optim.lr: unknown section"),
    ("train.lr_scales=3", "train.lr_scales: expected a mapping"),
    ("train.lr_scales={quantizer.proj: 0}", "train.lr_scales['quantizer.proj']: expected a module path and a positive"),
    ("train.lr_scales={quantizer.proj: x}", "expected a number"),
    ("train.lr_scales={quantizer.nope: 2}", "the model has no module 'quantizer.nope'"),
])
def test_bad_config_fails_before_training(override, match, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "demo", "--out", str(run), "--no-progress", "--set", override]) == 1
    assert match in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_lr_scales_give_a_module_its_multiple_of_the_learning_rate(tmp_path, monkeypatch):
    """train.lr_scales: SimVQ's linear map in its own AdamW group at 3x the schedule's rate at every
    step, everything else at the rate itself; the option survives config.json and resume."""
    overrides = COMMON + TINY["demo"] + ["quantizer.name=simvq", "quantizer.dim=8", "quantizer.codebook_size=16",
                                         "train.lr_scales={quantizer.proj: 3}", "train.warmup_steps=1"]
    cfg = load_config("demo", None, overrides)
    assert cfg.train.lr_scales == {"quantizer.proj": 3.0}
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([(g["lr"], len(g["params"])) for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    gen = [s for s in seen if len(s) == 2]  # the autoencoder's optimiser (the demo has no discriminator)
    assert len(gen) == 2
    for step, ((base, n_rest), (w, n_w)) in enumerate(gen):
        assert n_w == 1 and n_rest > 1
        assert base == pytest.approx(lr_at(step, cfg.train.lr, 1, 2, cfg.train.min_lr_ratio))
        assert w == pytest.approx(3 * base)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["lr_scales"] == {"quantizer.proj": 3.0}
    saved["train"]["steps"] = 3  # resume: the saved optimiser keeps the groups and their multiples
    seen.clear()
    train(load_config(None, None, [], base=saved), run, resume=True, progress=False)
    (base, _), (w, _) = [s for s in seen if len(s) == 2][-1]
    assert base == pytest.approx(lr_at(2, cfg.train.lr, 1, 3, cfg.train.min_lr_ratio)) and w == pytest.approx(3 * base)
    model, _ = load_model(run)
    groups = param_groups(model, {"quantizer.proj": 2.0})
    assert [g["lr_scale"] for g in groups] == [1.0, 2.0] and groups[1]["params"] == [model.quantizer.proj.weight]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    assert [g["lr_scale"] for g in param_groups(model, {})] == [1.0]
    with pytest.raises(ConfigError, match="shares parameters"):
        param_groups(model, {"quantizer": 2.0, "quantizer.proj": 3.0})


def test_yaml_config_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {steps: 7, lr: 1e-3}\nquantizer: {name: fsq, levels: [4, 4]}\n")
    cfg = load_config("demo", str(f), ["train.lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.quantizer == {"name": "fsq", "levels": [4, 4]}
    f.write_text("train: {stepz: 7}\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config("demo", str(f))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")


def test_corrupt_checkpoint_errors_name_the_file(tmp_path):
    run = tmp_path / "run"
    train(load_config("demo", None, COMMON + TINY["demo"]), run, progress=False)
    ck = run / "checkpoints" / "step_00000002"
    model_file = ck / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(run)
    (ck / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_model(ck)
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="step_00000099"):
        load_model(run)


def test_corrupt_state_fails_resume_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config("demo", None, COMMON + TINY["demo"]), run, progress=False)
    state = run / "checkpoints" / "step_00000002" / "state.pt"
    state.write_bytes(b"garbage")
    meta = json.loads((state.parent / "meta.json").read_text())
    meta["files"]["state.pt"] = len(b"garbage")
    (state.parent / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "train.steps=3"]) == 1
    assert "state.pt" in capsys.readouterr().err
    # a second fresh run into the same folder refuses to overwrite it
    assert main(["train", "--preset", "demo", "--out", str(run), "--no-progress"] + sum([["--set", o] for o in COMMON], [])) == 1
    assert "--resume" in capsys.readouterr().err


def test_demo_preset_can_reach_its_usage_target():
    """The demo's held-out usage target (>= 95 % of >= 512 codes) needs many held-out tokens per code."""
    from vqtok.config import check_quantizer
    from vqtok.data import build_dataset

    cfg = load_config("demo")
    q = check_quantizer(cfg)
    assert q.codebook_size >= 512
    assert cfg.quantizer.get("backend", "auto") == "auto"  # the native search, not the torch fallback
    ds = build_dataset(cfg.to_dict()["data"], "eval")
    tokens = len(ds) * (cfg.data.size // cfg.model.downsample) ** 2
    assert tokens >= 32 * q.codebook_size, f"{tokens} held-out tokens for {q.codebook_size} codes"
