"""Tokenizer + token export: encode -> verify -> decode for image / video / audio, resume after a
real SIGKILL, a 2-process torchrun export, tokenizer mismatch and corruption errors, the CLI."""

import json
import os
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.cli import main as cli
from vqtok.data.tokens import TokenDataset, TokenFormatError, shard_name
from vqtok.export import STATE_FILE, build_input, decode_tokens, encode_dataset, to_uint8, verify_export
from vqtok.models import build_autoencoder
from vqtok.tokenizer import Tokenizer

# tiny untrained models (the pipeline's correctness does not need a good tokenizer)
CFGS = {
    "image": {
        "model": {"modality": "image", "channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1, "downsample": 2,
                  "latent_dim": 4},
        "quantizer": {"name": "vq", "dim": 4, "codebook_size": 64},
        "data": {"modality": "image", "source": "builtin", "size": 16, "scales": [0.25]},
    },
    "video": {
        "model": {"modality": "video", "channels": 8, "channel_mult": [1, 1], "num_res_blocks": 1, "downsample": 2,
                  "time_downsample": 2, "latent_dim": 4},
        "quantizer": {"name": "fsq", "levels": [5, 5, 5]},
        "data": {"modality": "video", "source": "builtin", "size": 16, "frames": 5},
    },
    "audio": {
        "model": {"modality": "audio", "channels": 8, "strides": [2, 4], "latent_dim": 4},
        "quantizer": {"name": "rvq", "dim": 4, "codebook_size": 32, "num_quantizers": 2},
        "data": {"modality": "audio", "source": "builtin", "length": 256, "sample_rate": 8000},
    },
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _make_tokenizer(modality: str, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer(build_autoencoder(CFGS[modality]), CFGS[modality])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """modality -> folder of a saved tokenizer (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {m: _make_tokenizer(m).save_pretrained(root / m) for m in CFGS}


@pytest.fixture
def one_thread():
    """In-process encodes use one thread like the subprocesses (OMP_NUM_THREADS=1), so float
    results, hence tokens, cannot differ by the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def test_tokenizer_save_load_encode_decode(tmp_path, saved):
    tok = Tokenizer.from_pretrained(saved["image"])
    assert not tok.model.training and tok.modality == "image" and tok.codebook_size == 64
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = tok.encode(x)
    assert ids.dtype == torch.int64 and ids.shape == (3, 8, 8) and tok.token_grid((3, 16, 16)) == (8, 8)
    assert torch.equal(tok.encode(x[1]), ids[1])  # one sample without the batch axis
    y = tok.decode(ids)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    # one sample alone decodes as in the batch, up to the conv backend's batch-size-dependent
    # summation order (oneDNN picks its algorithm by shape on some CPUs)
    torch.testing.assert_close(tok.decode(ids[2]), y[2], rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, tok.model.encode(x))  # the model's own indices

    again = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "copy"))
    assert again.weights_sha256 == tok.weights_sha256 and torch.equal(again.encode(x), ids)
    assert _make_tokenizer("image", seed=1).weights_sha256 != tok.weights_sha256
    assert "codebook_size=64" in repr(tok)

    with pytest.raises(ValueError, match="4 dims"):
        tok.encode(torch.rand(16, 16))
    with pytest.raises(TypeError, match="float"):
        tok.encode(ids)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    weights = tmp_path / "copy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        Tokenizer.from_pretrained(tmp_path / "copy")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: missing"):
        Tokenizer.from_pretrained(tmp_path / "copy")


def test_tokenizer_from_run_folder_prefers_ema(tmp_path):
    from vqtok.checkpoint import save_checkpoint

    tok = _make_tokenizer("image")
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in tok.model.state_dict().items()}
    save_checkpoint(tmp_path / "run", 3, tok.model, {"step": 3}, CFGS["image"], ema=ema)
    from_run = Tokenizer.from_pretrained(tmp_path / "run")
    for k, v in from_run.model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    raw = Tokenizer.from_pretrained(tmp_path / "run", use_ema=False)
    assert raw.weights_sha256 == tok.weights_sha256 != from_run.weights_sha256


# --------------------------------------------------------------------------------------------
# encode -> verify -> decode
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality,layout", [("image", "npy"), ("video", "wds"), ("audio", "bin")])
def test_encode_verify_decode_round_trip(tmp_path, saved, modality, layout):
    out = tmp_path / "tokens"
    m = encode_dataset(saved[modality], f"builtin:{modality}", out, layout=layout, shard_size=3, batch_size=2,
                       limit=7, progress=False)
    tok = Tokenizer.from_pretrained(saved[modality])
    data = build_input(f"builtin:{modality}", tok.config, "train", 7)
    grid = tok.token_grid(tuple(data[0].shape))
    assert m["num_samples"] == 7 and [s["samples"] for s in m["shards"]] == [3, 3, 1]
    assert m["grid"] == list(grid) and m["codebook_size"] == tok.codebook_size and m["dtype"] == "uint16"
    assert m["tokenizer"]["weights_sha256"] == tok.weights_sha256 and m["tokenizer"]["modality"] == modality
    assert verify_export(out, saved[modality], progress=False)["tokenizer"] == "matches"
    assert not (out / STATE_FILE).exists()

    ds = TokenDataset(out)
    x = torch.stack([data[i] for i in range(7)])
    ids = tok.encode(x)
    assert [ds.key(i) for i in range(7)] == [data.key(i) for i in range(7)]
    assert torch.equal(torch.stack([ds[i] for i in range(7)]), ids)  # same tokens per key

    paths = decode_tokens(saved[modality], out, tmp_path / "media", limit=5, progress=False)
    assert len(paths) == 5 and all(p.exists() for p in paths) and paths[1].name.startswith("000001_")
    recon = tok.decode(ids[:5])
    if modality == "image":
        for p, r, xi in zip(paths, recon, x):
            png = np.asarray(Image.open(p))
            assert png.shape == (16, 16, 3) and np.array_equal(png, to_uint8(r))
            own = tok.model(xi[None]).recon[0].clamp(-1, 1)  # the model's own reconstruction
            assert np.abs(png.astype(int) - to_uint8(own).astype(int)).max() <= 1
    elif modality == "video":
        frames = sorted(paths[0].iterdir())
        assert len(frames) == 5 and np.array_equal(np.asarray(Image.open(frames[3])), to_uint8(recon[0][:, 3]))
    else:
        with wave.open(str(paths[0])) as w:
            assert w.getframerate() == 8000 and w.getnchannels() == 1 and w.getnframes() == 256
            pcm = np.frombuffer(w.readframes(256), "<i2")
        assert np.array_equal(pcm, (recon[0, 0].clamp(-1, 1) * 32767).round().to(torch.int16).numpy())


def test_folder_input_and_cli(tmp_path, saved, capsys):
    photos = tmp_path / "photos" / "sub"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "tokens"
    args = ["--checkpoint", str(saved["image"]), "--input", str(tmp_path / "photos"), "--output", str(out)]
    assert cli(["encode", *args, "--format", "wds", "--shard-size", "2", "--batch-size", "3"]) == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    assert TokenDataset(out).keys == [f"sub/p{i}.png" for i in range(5)]
    assert cli(["verify", str(out), "--checkpoint", str(saved["image"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 5
    assert cli(["decode", "--checkpoint", str(saved["image"]), "--tokens", str(out), "--output", str(tmp_path / "d"),
                "--limit", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["000000_sub_p0.png.png", "000001_sub_p1.png.png"]

    shard = out / shard_name(1, "wds")
    shard.write_bytes(shard.read_bytes()[:1000])
    assert cli(["verify", str(out)]) == 1
    assert f"{shard}" in capsys.readouterr().err
    assert cli(["encode", *args, "--input", "builtin:audio"]) == 1
    assert "audio data but the tokenizer is a image tokenizer" in capsys.readouterr().err


def test_tokens_from_another_tokenizer_are_refused(tmp_path, saved):
    out = tmp_path / "tokens"
    encode_dataset(saved["image"], "builtin:images", out, shard_size=4, limit=4, progress=False)
    other = _make_tokenizer("image", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(TokenFormatError, match=r"manifest\.json.*different tokenizer"):
        decode_tokens(other, out, tmp_path / "media", progress=False)
    with pytest.raises(TokenFormatError, match="different tokenizer"):
        verify_export(out, other, progress=False)
    assert not (tmp_path / "media").exists()


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path, saved):
    out = tmp_path / "tokens"
    encode_dataset(saved["image"], "builtin:images", out, shard_size=3, limit=6, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    encode_dataset(saved["image"], "builtin:images", out, shard_size=3, limit=6, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(FileExistsError, match="different export"):
        encode_dataset(saved["image"], "builtin:images", out, shard_size=2, limit=6, progress=False)
    (out / "manifest.json").unlink()  # an unfinished export with other settings
    (out / STATE_FILE).write_text(json.dumps({"shard_size": 99}))
    with pytest.raises(FileExistsError, match="unfinished export with other settings"):
        encode_dataset(saved["image"], "builtin:images", out, shard_size=3, limit=6, progress=False)


# --------------------------------------------------------------------------------------------
# faults and processes
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_resume_after_sigkill_is_byte_identical(tmp_path, saved, one_thread):
    args = ["encode", "--checkpoint", str(saved["image"]), "--input", "builtin:images", "--shard-size", "3",
            "--batch-size", "2", "--limit", "11", "--format", "npy"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli([*args, "--output", str(ref)]) == 0

    env = {**ENV, "VQTOK_TEST_PAUSE_AFTER_SHARD": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vqtok", *args, "--output", str(out)], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stderr:
            if "paused after shard 1" in line:
                break
        else:
            pytest.fail(f"encoder exited with {proc.wait()} before pausing")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == [STATE_FILE, "tokens-00000.npy", "tokens-00001.npy"]
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-*")}
    (out / ".tokens-00002.npy.tmp-4242").write_bytes(b"half a shard")  # what a kill mid-write leaves

    assert cli([*args, "--output", str(out)]) == 0  # the same command again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-0000[01].npy")} == written  # not redone
    assert _files(out) == _files(ref)
    verify_export(out, progress=False)


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_torchrun_two_processes_equal_single_process(tmp_path, saved, one_thread):
    common = ["--checkpoint", str(saved["image"]), "--input", "builtin:images", "--shard-size", "2",
              "--batch-size", "2", "--limit", "9"]
    ref, out = tmp_path / "ref", tmp_path / "dist"
    assert cli(["encode", *common, "--output", str(ref)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqtok", "encode", *common, "--output", str(out)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=200, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = TokenDataset(ref), TokenDataset(out)
    assert a.keys == b.keys
    assert all(torch.equal(a[i], b[i]) for i in range(len(a)))  # same tokens per key
    assert _files(out) == _files(ref)  # and in fact the same bytes
    verify_export(out, saved["image"], progress=False)


def test_train_tiny_gpt_example_learns_from_exported_tokens(tmp_path, saved, one_thread):
    from scripts import load_script

    out = tmp_path / "tokens"
    encode_dataset(saved["image"], "builtin:images", out, layout="bin", shard_size=8, limit=20, progress=False)
    example = load_script("examples/train_tiny_gpt.py")
    # tiny matmuls (one_thread: threads only add contention)
    losses = example.main(["--tokens", str(out), "--steps", "30", "--block-size", "32", "--batch-size", "8",
                           "--dim", "32", "--layers", "1"])
    per_sample = example.main(["--tokens", str(out), "--steps", "2", "--per-sample", "--block-size", "100",
                               "--dim", "32", "--layers", "1"])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert abs(losses[0] - np.log(64)) < 0.2  # starts near uniform over the 64 codes
    assert np.mean(losses[-5:]) < np.log(64) - 0.5  # and learns the token statistics
    assert len(per_sample) == 2 and abs(per_sample[0] - np.log(65)) < 0.2  # vocab + BOS


def test_saved_pixels_invert_the_data_transform():
    from vqtok.data.images import BuiltinImages, scaled_photo

    ds = BuiltinImages("eval", 32, 0, (0.5,))
    for i in (0, 3):
        photo, scale, y, x = ds.tiles[i]
        crop = np.asarray(scaled_photo(photo, scale).crop((x, y, x + 32, y + 32)))
        assert np.array_equal(to_uint8(ds[i]), crop)  # decoded PNGs use the inverse of the input transform
