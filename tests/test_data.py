"""Built-in offline data and folder datasets: shapes, ranges, stable keys, held-out splits."""

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.data import EVAL_PHOTOS, TRAIN_PHOTOS, build_dataset


def _check(t, shape):
    assert t.dtype == torch.float32 and tuple(t.shape) == shape
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0


def test_builtin_images_split_and_determinism():
    tr = build_dataset({"modality": "image", "size": 32, "train_samples": 50, "scales": [0.5]}, "train")
    ev = build_dataset({"modality": "image", "size": 64, "scales": [0.25]}, "eval")
    assert len(tr) == 50 and len(ev) > 10
    _check(tr[3], (3, 32, 32))
    _check(ev[0], (3, 64, 64))
    assert torch.equal(tr[7], tr[7]) and tr.key(7) == tr.key(7) and not torch.equal(tr[7], tr[8])
    assert {tr.key(i).split("@")[0] for i in range(50)} <= set(TRAIN_PHOTOS)
    assert {ev.key(i).split("@")[0] for i in range(len(ev))} <= set(EVAL_PHOTOS)
    assert not set(TRAIN_PHOTOS) & set(EVAL_PHOTOS)
    assert len({ev.key(i) for i in range(len(ev))}) == len(ev)
    capped = build_dataset({"modality": "image", "size": 64, "scales": [0.25], "eval_samples": 5}, "eval")
    assert len(capped) == 5


def test_image_folder_skips_unreadable(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "sub" / f"im{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / "grey.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "notes.txt").write_text("ignored")
    cfg = {"modality": "image", "source": "folder", "path": str(tmp_path), "size": 32, "eval_fraction": 0.0}
    ds = build_dataset(cfg, "train")
    assert len(ds) == 7 and ds.skipped == 1
    assert "skipped 1 of 8 unreadable image files" in capsys.readouterr().err
    assert ds.key(0) == "grey.jpg" and ds.key(1) == "sub/im0.png"
    _check(ds[0], (3, 32, 32))
    assert len(build_dataset({**cfg, "eval_fraction": 1.0}, "eval")) == 7
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset({**cfg, "path": str(tmp_path / "missing")}, "train")


def test_builtin_clips_and_video_folders(tmp_path):
    tr = build_dataset({"modality": "video", "size": 16, "frames": 5, "train_samples": 4}, "train")
    clip = tr[1]
    _check(clip, (3, 5, 16, 16))
    assert not torch.equal(clip[:, 0], clip[:, -1])  # the window moves
    ev = build_dataset({"modality": "video", "size": 16, "frames": 5, "eval_samples": 3}, "eval")
    assert len(ev) == 3 and ev.key(0).split("@")[0] in EVAL_PHOTOS
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 255, (7, 20, 24, 3), dtype=np.uint8))
    (tmp_path / "b").mkdir()
    for f in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "b" / f"{f:03d}.png")
    np.save(tmp_path / "short.npy", np.zeros((2, 20, 24, 3), np.uint8))
    ds = build_dataset({"modality": "video", "source": "folder", "path": str(tmp_path), "size": 16, "frames": 5,
                        "eval_fraction": 0.0}, "train")
    assert sorted(ds.key(i) for i in range(len(ds))) == ["a.npy", "b"] and ds.skips.skipped[0][0] == "short.npy"
    for i in range(len(ds)):
        _check(ds[i], (3, 5, 16, 16))


def test_builtin_audio_and_wav_folder(tmp_path):
    from scipy.io import wavfile

    tr = build_dataset({"modality": "audio", "length": 1024, "train_samples": 8}, "train")
    ev = build_dataset({"modality": "audio", "length": 1024, "eval_samples": 8}, "eval")
    _check(tr[0], (1, 1024))
    assert not torch.equal(tr[0], ev[0]) and torch.equal(tr[2], tr[2])
    assert {tr.key(i).split("@")[0] for i in range(8)} <= {"tone", "chirp", "noise_burst", "harmonic"}
    t = np.arange(8000) / 8000
    wavfile.write(tmp_path / "x.wav", 8000, (np.sin(2 * np.pi * 440 * t) * 20000).astype(np.int16))
    wavfile.write(tmp_path / "short.wav", 16000, np.zeros(100, np.float32))
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    ds = build_dataset({"modality": "audio", "source": "folder", "path": str(tmp_path), "length": 2048,
                        "sample_rate": 16000, "eval_fraction": 1.0}, "eval")
    assert [ds.key(i) for i in range(len(ds))] == ["short.wav", "x.wav"]
    x = ds[1]
    _check(x, (1, 2048))
    assert 0.55 < float(x.abs().max()) < 0.65  # 20000/32768, resampled 8k -> 16k
    assert float(ds[0].abs().max()) == 0.0  # zero-padded
