"""evaluate(), `vqtok eval` and `vqtok report` on small real models and real photos."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from skimage import data as skdata

from vqtok.evaluate import codebook_stats, evaluate, run_evaluation
from vqtok.metrics import psnr as psnr_fn
from vqtok.ops import fsq_indices_to_codes, fsq_quantize


# --------------------------------------------------------------------------------------------
# a tiny conv autoencoder with FSQ (single or residual), built on the ops
# --------------------------------------------------------------------------------------------
class TinyFSQ(nn.Module):
    """FSQ on [B, D, h, w] maps; ``depth`` > 1 quantizes the residual again (indices [..., depth])."""

    def __init__(self, levels=(5, 5, 3), depth: int | None = None):
        super().__init__()
        self.levels, self.dim = list(levels), len(levels)
        self.codebook_size = math.prod(levels)
        if depth:
            self.num_quantizers = depth

    def forward(self, z):
        zt = z.movedim(1, -1)
        codes, idx = fsq_quantize(zt, self.levels)
        idx_all, q = [idx.long()], codes
        for _ in range(getattr(self, "num_quantizers", 1) - 1):
            c2, i2 = fsq_quantize((zt - q) * 4, self.levels)
            q, idx_all = q + c2 / 4, idx_all + [i2.long()]
        indices = torch.stack(idx_all, -1) if hasattr(self, "num_quantizers") else idx_all[0]
        return SimpleNamespace(quantized=q.movedim(-1, 1), indices=indices)


class TinyAE(nn.Module):
    def __init__(self, quantizer: TinyFSQ, modality: str = "image"):
        super().__init__()
        self.modality, self.quantizer = modality, quantizer
        conv, tconv = (nn.Conv1d, nn.ConvTranspose1d) if modality == "audio" else (nn.Conv2d, nn.ConvTranspose2d)
        cin = 1 if modality == "audio" else 3
        self.enc = nn.Sequential(conv(cin, 16, 4, 2, 1), nn.GELU(), conv(16, quantizer.dim, 3, 1, 1))
        self.dec = nn.Sequential(conv(quantizer.dim, 16, 3, 1, 1), nn.GELU(), tconv(16, cin, 4, 2, 1))

    def forward(self, x):
        quant = self.quantizer(self.enc(x))
        return SimpleNamespace(recon=self.dec(quant.quantized), quant=quant)


def photo_crops(n: int = 12, size: int = 32) -> torch.Tensor:
    """n real-photo crops [n, 3, size, size] in [-1, 1]."""
    crops = []
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    for i in range(n):
        img = getattr(skdata, names[i % 4])()
        y, x = 40 + 17 * (i // 4), 60 + 23 * (i // 4)
        crops.append(torch.from_numpy(img[y : y + size, x : x + size, :3].copy()).permute(2, 0, 1))
    return torch.stack(crops).float() / 127.5 - 1.0


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# --------------------------------------------------------------------------------------------
# evaluate()
# --------------------------------------------------------------------------------------------
def test_codebook_stats_from_histogram():
    s = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert s["usage"] == 0.5 and s["dead_codes"] == 2 and s["tokens"] == 10
    assert s["perplexity"] == pytest.approx(2.0) and s["entropy_bits"] == pytest.approx(1.0)
    assert not s["collapse"]
    collapsed = codebook_stats(torch.tensor([100] + [0] * 99))
    assert collapsed["collapse"] and collapsed["perplexity"] == pytest.approx(1.0)
    # a large codebook seen through few tokens is judged against what those tokens could reach
    sparse = torch.zeros(1 << 16, dtype=torch.long)
    sparse[:50] = 1
    assert not codebook_stats(sparse)["collapse"]


def test_evaluate_matches_direct_computation():
    torch.manual_seed(0)
    model = TinyAE(TinyFSQ()).eval()
    x = photo_crops(12)
    m = evaluate(model, ListDataset(list(x)), batch_size=5, lpips=False, fid=False, progress=False)
    with torch.no_grad():
        out = model(x)
    recon = out.recon.clamp(-1, 1)
    counts = torch.bincount(out.quant.indices.reshape(-1), minlength=75)
    expect = codebook_stats(counts)
    assert m["samples"] == 12 and m["tokens"] == 12 * 16 * 16
    for key in ("usage", "perplexity", "entropy_bits", "dead_codes", "collapse"):
        assert m[key] == pytest.approx(expect[key]), key
    assert m["psnr"] == pytest.approx(psnr_fn(x, recon).mean().item(), rel=1e-9)
    assert 0 < m["ssim"] < 1
    assert m["lpips"] is None and m["rfid"] is None and "layers" not in m


def test_evaluate_max_samples_loader_and_examples():
    torch.manual_seed(0)
    model = TinyAE(TinyFSQ()).eval()
    x = photo_crops(12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    out = run_evaluation(model, loader, max_samples=7, lpips=False, fid=False, keep_examples=5, progress=False)
    assert out.metrics["samples"] == 7 and out.originals.shape == (5, 3, 32, 32)
    ref = evaluate(model, ListDataset(list(x[:7])), lpips=False, fid=False, progress=False)
    assert out.metrics["psnr"] == pytest.approx(ref["psnr"]) and out.metrics["usage"] == ref["usage"]
    with pytest.raises(ValueError, match="max_samples"):
        evaluate(model, loader, max_samples=0)


def test_evaluate_residual_layers_and_unavailable_metrics(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights in the cache
    torch.manual_seed(0)
    model = TinyAE(TinyFSQ(depth=2)).eval()
    m = evaluate(model, ListDataset(list(photo_crops(8))), batch_size=4, progress=False)
    assert len(m["layers"]) == 2 and m["depth"] == 2 and m["codebook_size"] == 75
    assert m["layers"][0]["tokens"] == m["layers"][1]["tokens"] == 8 * 256
    assert m["usage"] == pytest.approx((m["layers"][0]["usage"] + m["layers"][1]["usage"]) / 2)
    assert m["lpips"] is None and m["rfid"] is None
    assert m["unavailable"]["lpips"]["path"].endswith("alexnet-owt-7be5be79.pth")
    assert m["unavailable"]["rfid"]["path"].endswith("pt_inception-2015-12-05-6726825d.pth")


def test_evaluate_lpips_code_path_is_not_reported_as_lpips():
    import warnings

    import lpips

    from vqtok.metrics.perceptual import LPIPSMetric

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rand = LPIPSMetric(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False), real_weights=False)
    torch.manual_seed(0)
    m = evaluate(TinyAE(TinyFSQ()).eval(), ListDataset(list(photo_crops(4))), lpips=rand, fid=False, progress=False)
    assert m["lpips"] is None and "random backbone" in m["unavailable"]["lpips"]["reason"]
    assert m["lpips_random_backbone"] > 0


def test_evaluate_audio_skips_image_metrics():
    torch.manual_seed(0)
    model = TinyAE(TinyFSQ(levels=(4, 4)), modality="audio").eval()
    amp = torch.linspace(0.2, 0.9, 6)[:, None, None]
    wave = torch.sin(torch.linspace(0, 60, 256))[None].repeat(6, 1)[:, None] * amp
    m = evaluate(model, ListDataset(list(wave)), batch_size=4, progress=False)
    assert m["samples"] == 6 and m["psnr"] is not None and m["ssim"] is None
    assert set(m["unavailable"]) >= {"ssim", "lpips", "rfid"}


# --------------------------------------------------------------------------------------------
# the HTML report
# --------------------------------------------------------------------------------------------
import json  # noqa: E402
from html.parser import HTMLParser  # noqa: E402
from pathlib import Path  # noqa: E402

from vqtok.report import load_arrays, rebuild_report_from, save_arrays, usage_grid, write_report  # noqa: E402


class _PageScan(HTMLParser):
    """Collects <img src> and every data-key/data-value pair of a report page."""

    def __init__(self):
        super().__init__()
        self.images, self.values = [], {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if "data-key" in a:
            self.values[a["data-key"]] = json.loads(a["data-value"])


def scan_page(page: Path) -> _PageScan:
    scan = _PageScan()
    scan.feed(page.read_text())
    for src in scan.images:
        assert not src.startswith(("http:", "https:", "/")), src  # self-contained, relative figures
        assert (page.parent / src).is_file() and (page.parent / src).stat().st_size > 1000, src
    return scan


def flat_scalars(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list)) and v is not None}
    for i, layer in enumerate(metrics.get("layers") or []):
        out.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return out


def assert_page_matches(page: Path, metrics: dict) -> _PageScan:
    scan = scan_page(page)
    expect = flat_scalars(metrics)
    assert scan.values == expect  # every number on the page, and exactly metrics.json's
    return scan


def test_usage_grid_is_near_square_and_padded():
    g = usage_grid(np.arange(10))
    assert g.shape == (3, 4) and np.isnan(g[-1, -2:]).all() and g[0, 1] == 1


def test_report_page_figures_and_numbers(tmp_path):
    torch.manual_seed(0)
    res = run_evaluation(TinyAE(TinyFSQ(depth=2)).eval(), ListDataset(list(photo_crops(6))), lpips=False,
                         fid=False, keep_examples=4, progress=False)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    rows = [{"step": s, "split": "train", "loss": 1.0 / (s + 1), "usage": 0.1} for s in range(0, 50, 10)]
    rows.append({"step": 40, "split": "eval", "psnr": 20.0, "usage": 0.3})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (run / "eval" / "metrics.json").write_text(json.dumps(res.metrics))
    save_arrays(run / "eval" / "arrays.npz", res.counts, res.originals.numpy(), res.reconstructions.numpy())
    arrays = load_arrays(run / "eval" / "arrays.npz")
    assert len(arrays["counts"]) == 2 and arrays["originals"].shape == (4, 3, 32, 32)
    page = rebuild_report_from(run)
    assert page == run / "eval" / "report" / "index.html"
    scan = assert_page_matches(page, json.loads((run / "eval" / "metrics.json").read_text()))
    assert set(scan.images) == {"examples.png", "usage_histogram.png", "usage_map.png", "layers.png",
                                "training_curves.png"}
    assert "pt_inception" not in page.read_text()  # fid was skipped, not unavailable


def test_report_video_audio_and_unavailable(tmp_path):
    metrics = {"samples": 2, "psnr": 21.5, "usage": 0.25, "collapse": True,
               "unavailable": {"rfid": {"reason": "rFID needs the weights", "path": "/x/pt_inception.pth"}}}
    video = np.random.default_rng(0).uniform(-1, 1, (2, 3, 5, 16, 16)).astype(np.float32)
    page = write_report(tmp_path / "v", metrics, counts=[np.array([3, 0, 1, 0])], originals=video,
                        reconstructions=video * 0.5, modality="video")
    text = page.read_text()
    assert "collapse" in text.lower() and "/x/pt_inception.pth" in text
    assert_page_matches(page, metrics)
    audio = np.sin(np.linspace(0, 300, 4000, dtype=np.float32))[None, None].repeat(2, 0)
    page = write_report(tmp_path / "a", {"samples": 2}, counts=[np.array([1, 1])], originals=audio,
                        reconstructions=audio * 0.9, modality="audio")
    assert "examples.png" in scan_page(page).images
    with pytest.raises(FileNotFoundError, match="neither"):
        rebuild_report_from(tmp_path / "v")


# --------------------------------------------------------------------------------------------
# `vqtok eval` / `vqtok report` on a real (tiny) training run
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from vqtok.config import load_config
    from vqtok.train import train

    run = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config("demo", None, [
        "train.steps=3", "train.batch_size=2", "train.ckpt_every=3", "train.keep_last=1", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.threads=1", "data.train_samples=8",
        "data.eval_samples=4", "train.tensorboard=false", "model.channels=4", "data.size=16"])
    res = train(cfg, run, progress=False)
    assert "dead_codes" in res and "collapse" in res  # the training loop evaluates with vqtok.evaluate
    return run


def test_cli_eval_and_report_on_a_run(tiny_run, monkeypatch, tmp_path, capsys):
    from vqtok.cli import main

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights: reported unavailable
    assert main(["eval", "--checkpoint", str(tiny_run), "--max-samples", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "alexnet-owt-7be5be79.pth" in out and "report:" in out
    metrics = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == 3 and metrics["psnr"] > 0 and metrics["lpips"] is None
    assert metrics["unavailable"]["rfid"]["path"].endswith("pt_inception-2015-12-05-6726825d.pth")
    page = tiny_run / "eval" / "report" / "index.html"
    scan = assert_page_matches(page, metrics)
    assert {"examples.png", "usage_histogram.png", "usage_map.png", "training_curves.png"} <= set(scan.images)
    (page.parent / "usage_map.png").unlink()
    assert main(["report", str(tiny_run)]) == 0  # rebuilt from the run folder
    assert_page_matches(page, metrics)
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 1
    assert "vqtok eval: error" in capsys.readouterr().err
