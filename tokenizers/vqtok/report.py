"""The evaluation report: a self-contained HTML page (no scripts, no network) with PNG figures.

Folder layout written by :func:`write_report` (``vqtok eval`` and ``vqtok report`` call it)::

    EVAL_DIR/metrics.json         the numbers (from vqtok.evaluate)
    EVAL_DIR/arrays.npz           code histograms and example pairs, so the page can be rebuilt
    EVAL_DIR/report/index.html    the page; every number carries data-key / data-value attributes
    EVAL_DIR/report/*.png         originals vs reconstructions, usage histogram, usage map,
                                  per-layer usage (residual quantizers), training curves

Figures are drawn with matplotlib's Agg backend. Originals/reconstructions are in [-1, 1]:
images [N, 3, H, W], video [N, 3, T, H, W] (a row of frames per sample), audio [N, 1, T]
(waveforms and log-magnitude spectrograms).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["write_report", "save_arrays", "load_arrays", "read_history", "rebuild_report", "rebuild_report_from"]

_PLOT_KEYS = ("loss", "rec_loss", "usage", "perplexity", "psnr", "ssim", "dead_codes", "lpips")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path.name


def _to_img(t: np.ndarray) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W, C] in [0, 1] (grey stays 2-D)."""
    img = np.clip((t + 1.0) / 2.0, 0.0, 1.0)
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def fig_examples(orig: np.ndarray, recon: np.ndarray, modality: str, path: Path) -> str:
    """Originals vs reconstructions: image grid, video frame strips, or audio waves + spectrograms."""
    plt = _plt()
    n = orig.shape[0]
    if modality == "audio":
        n = min(n, 4)
        fig, axes = plt.subplots(n, 3, figsize=(12, 2.2 * n), squeeze=False)
        for i in range(n):
            a, b = orig[i, 0], recon[i, 0]
            win = slice(0, min(len(a), 1024))  # a readable window of the waveform
            axes[i, 0].plot(a[win], lw=0.7, label="original")
            axes[i, 0].plot(b[win], lw=0.7, alpha=0.8, label="reconstruction")
            axes[i, 0].set_title(f"sample {i}: waveform (first {win.stop} samples)", fontsize=8)
            for j, (sig, name) in enumerate(((a, "original"), (b, "reconstruction")), start=1):
                nfft = int(min(256, 2 ** max(3, int(math.log2(max(len(sig) // 4, 8))))))
                axes[i, j].specgram(sig, NFFT=nfft, noverlap=nfft // 2, Fs=1.0, cmap="magma")
                axes[i, j].set_title(f"{name} spectrogram", fontsize=8)
        axes[0, 0].legend(fontsize=7)
    elif modality == "video":
        n, frames = min(n, 3), min(orig.shape[2], 8)
        fig, axes = plt.subplots(2 * n, frames, figsize=(1.6 * frames, 3.4 * n), squeeze=False)
        for i in range(n):
            for t in range(frames):
                for r, src in enumerate((orig, recon)):
                    ax = axes[2 * i + r, t]
                    ax.imshow(_to_img(src[i, :, t]), cmap="gray")
                    ax.set_xticks([]), ax.set_yticks([])
                    if t == 0:
                        ax.set_ylabel(f"{i}: {'orig' if r == 0 else 'recon'}", fontsize=8)
    else:
        n = min(n, 8)
        fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 3.8), squeeze=False)
        for i in range(n):
            for r, src in enumerate((orig, recon)):
                axes[r, i].imshow(_to_img(src[i]), cmap="gray")
                axes[r, i].set_xticks([]), axes[r, i].set_yticks([])
        axes[0, 0].set_ylabel("original"), axes[1, 0].set_ylabel("reconstruction")
    fig.suptitle("originals vs reconstructions")
    return _save(fig, path)


def fig_usage_histogram(counts: list[np.ndarray], path: Path) -> str:
    """Code counts sorted by frequency (log scale), one curve per residual layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for layer, c in enumerate(counts):
        s = np.sort(c)[::-1]
        used = int((s > 0).sum())
        label = f"layer {layer}: {used}/{len(s)} used" if len(counts) > 1 else f"{used}/{len(s)} codes used"
        ax.plot(np.arange(1, len(s) + 1), np.maximum(s, 0.5), lw=1.2, label=label)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("code rank (by frequency)"), ax.set_ylabel("count (0 drawn at 0.5)")
    ax.set_title("codebook usage, sorted by frequency")
    ax.legend(fontsize=8)
    return _save(fig, path)


def usage_grid(counts: np.ndarray) -> np.ndarray:
    """counts [K] -> a near-square [rows, cols] grid in code order, padded with NaN."""
    k = len(counts)
    cols = int(math.ceil(math.sqrt(k)))
    rows = int(math.ceil(k / cols))
    grid = np.full(rows * cols, np.nan)
    grid[:k] = counts
    return grid.reshape(rows, cols)


def fig_usage_map(counts: list[np.ndarray], path: Path) -> str:
    """log(1 + count) of every code laid out on a near-square grid (dead codes are dark)."""
    plt = _plt()
    n = len(counts)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for layer, c in enumerate(counts):
        im = axes[0, layer].imshow(np.log1p(usage_grid(c.astype(np.float64))), cmap="viridis", interpolation="nearest")
        axes[0, layer].set_title(f"usage map{f' (layer {layer})' if n > 1 else ''}, log(1+count)", fontsize=9)
        fig.colorbar(im, ax=axes[0, layer], fraction=0.046)
    return _save(fig, path)


def fig_layers(layers: list[dict], path: Path) -> str:
    """Per-layer usage and normalised perplexity for residual quantizers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(layers))
    ax.bar(x - 0.2, [s["usage"] for s in layers], 0.4, label="usage")
    ax.bar(x + 0.2, [s["perplexity"] / s["codebook_size"] for s in layers], 0.4, label="perplexity / K")
    ax.set_xticks(x), ax.set_xlabel("residual layer"), ax.set_ylim(0, 1.05)
    ax.set_title("per-layer codebook usage"), ax.legend(fontsize=8)
    return _save(fig, path)


def fig_curves(rows: list[dict], path: Path) -> str | None:
    """Training curves from metrics.jsonl rows ({"step", "split", key: value}); None if empty."""
    keys = [k for k in _PLOT_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        return None
    plt = _plt()
    cols = min(3, len(keys))
    nrows = int(math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    splits = sorted({str(r.get("split", "train")) for r in rows})
    for ax, key in zip(axes.flat, keys):
        for split in splits:
            pts = [(r["step"], r[key]) for r in rows
                   if str(r.get("split", "train")) == split and isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, lw=1.2, label=split)
        ax.set_title(key, fontsize=9), ax.set_xlabel("step", fontsize=8), ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle("training curves")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# data on disk
# --------------------------------------------------------------------------------------------
def save_arrays(path, counts=None, originals=None, reconstructions=None, modality: str = "image") -> None:
    """Histograms (one int64 [K] per layer) and example pairs, for rebuilding the page later."""
    arrays = {"modality": np.array(modality)}
    for i, c in enumerate(counts or []):
        arrays[f"counts_{i}"] = np.asarray(c, dtype=np.int64)
    if originals is not None:
        arrays["originals"] = np.asarray(originals, dtype=np.float32)
        arrays["reconstructions"] = np.asarray(reconstructions, dtype=np.float32)
    np.savez_compressed(path, **arrays)


def load_arrays(path) -> dict:
    with np.load(path) as z:
        n = sum(1 for k in z.files if k.startswith("counts_"))
        return {
            "modality": str(z["modality"]) if "modality" in z.files else "image",
            "counts": [z[f"counts_{i}"] for i in range(n)],
            "originals": z["originals"] if "originals" in z.files else None,
            "reconstructions": z["reconstructions"] if "reconstructions" in z.files else None,
        }


def read_history(path) -> list[dict]:
    """Rows of a run's metrics.jsonl (missing file -> []); malformed lines are skipped."""
    if not path or not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.6g}"
    return html.escape(str(v))


def _rows(metrics: dict, prefix: str = "") -> list[str]:
    out = []
    for key, v in metrics.items():
        if isinstance(v, (dict, list)) or v is None:
            continue
        full = prefix + key
        raw = json.dumps(v)
        out.append(f'<tr><th>{html.escape(full)}</th><td data-key="{html.escape(full)}" '
                   f"data-value='{html.escape(raw)}'>{_fmt(v)}</td></tr>")
    return out


def _page(title: str, metrics: dict, figures: list[tuple[str, str]], source: str) -> str:
    rows = _rows(metrics)
    for i, layer in enumerate(metrics.get("layers") or []):
        rows += _rows(layer, prefix=f"layers.{i}.")
    missing = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v.get('reason', ''))}"
        + (f" &mdash; provide <code>{html.escape(v['path'])}</code>" if v.get("path") else "") + "</li>"
        for k, v in (metrics.get("unavailable") or {}).items()
    )
    figs = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
                   f"</figcaption></figure>" for f, cap in figures)
    collapse = ('<p class="bad">Codebook collapse: few codes carry the set.</p>' if metrics.get("collapse") else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 10px; text-align: left; font-size: 14px; }}
th {{ background: #f4f4f4; font-weight: normal; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #666; font-size: 13px; }} .bad {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Source: <code>{html.escape(source)}</code></p>
{collapse}
<h2>Metrics</h2>
<table>{''.join(rows)}</table>
{('<h2>Unavailable metrics</h2><ul>' + missing + '</ul>') if missing else ''}
<h2>Figures</h2>
{figs}
</body></html>
"""


def write_report(eval_dir, metrics: dict, *, counts=None, originals=None, reconstructions=None,
                 modality: str = "image", history: list[dict] | None = None, title: str = "vqtok evaluation",
                 source: str = "") -> Path:
    """Write EVAL_DIR/report/index.html and its figures; returns the page's path."""
    out = Path(eval_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    figures: list[tuple[str, str]] = []
    if originals is not None and len(originals):
        examples = fig_examples(np.asarray(originals), np.asarray(reconstructions), modality, out / "examples.png")
        figures.append((examples,
                        "originals (top) vs reconstructions (bottom)" if modality == "image"
                        else "originals vs reconstructions"))
    counts = [np.asarray(c) for c in (counts or [])]
    if counts:
        figures.append((fig_usage_histogram(counts, out / "usage_histogram.png"), "code counts sorted by frequency"))
        figures.append((fig_usage_map(counts, out / "usage_map.png"), "usage over the code grid"))
    if metrics.get("layers"):
        figures.append((fig_layers(metrics["layers"], out / "layers.png"), "per-layer usage (residual quantizer)"))
    curves = fig_curves(history or [], out / "training_curves.png")
    if curves:
        figures.append((curves, "training curves from metrics.jsonl"))
    page = out / "index.html"
    page.write_text(_page(title, metrics, figures, source))
    return page


def rebuild_report(eval_dir, history_path=None, title: str = "vqtok evaluation") -> Path:
    """Rebuild the page from EVAL_DIR/metrics.json (+ arrays.npz) and an optional metrics.jsonl."""
    eval_dir = Path(eval_dir)
    mpath = eval_dir / "metrics.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"no metrics.json in {eval_dir}; run `vqtok eval` first")
    metrics = json.loads(mpath.read_text())
    arrays = load_arrays(eval_dir / "arrays.npz") if (eval_dir / "arrays.npz").is_file() else {}
    return write_report(eval_dir, metrics, counts=arrays.get("counts"), originals=arrays.get("originals"),
                        reconstructions=arrays.get("reconstructions"), modality=arrays.get("modality", "image"),
                        history=read_history(history_path), title=title, source=str(metrics.get("source", eval_dir)))


def rebuild_report_from(path) -> Path:
    """``vqtok report RUN``: RUN may be a run folder (uses RUN/eval and RUN/metrics.jsonl) or an eval folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such run folder: {path}")
    if (path / "metrics.json").is_file() and not (path / "config.json").is_file():
        eval_dir, history = path, path.parent / "metrics.jsonl"
    else:
        eval_dir, history = path / "eval", path / "metrics.jsonl"
    if not (eval_dir / "metrics.json").is_file():
        # a run without an evaluation yet: a page with its training curves only
        if not history.is_file():
            raise FileNotFoundError(f"{path} has neither eval/metrics.json nor metrics.jsonl")
        return write_report(eval_dir, {}, history=read_history(history), source=str(path),
                            title="vqtok run (not evaluated yet: run `vqtok eval`)")
    return rebuild_report(eval_dir, history if history.is_file() else None)
