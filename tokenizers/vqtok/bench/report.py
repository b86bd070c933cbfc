"""Tables, JSON and plots for `vqtok bench`.

Rows are flat dicts. The framework adds two derived columns: ``frac_peak`` (``gflops`` over the
machine's measured FMA peak) and ``frac_memcpy`` (``bytes`` / time over the measured memcpy
bandwidth, both counting bytes read + written).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

_TIME_KEYS = ("ms", "median_ms", "time_ms")


def row_ms(row: dict) -> float | None:
    for k in _TIME_KEYS:
        if isinstance(row.get(k), (int, float)):
            return float(row[k])
    return None


def add_derived(rows: list[dict], machine: dict) -> list[dict]:
    """Adds frac_peak / gbps / frac_memcpy in place where the inputs exist; returns rows."""
    peak, bw = machine.get("fma_peak_gflops"), machine.get("memcpy_gbps")
    for r in rows:
        if isinstance(r.get("gflops"), (int, float)) and peak:
            r["frac_peak"] = r["gflops"] / peak
        ms = row_ms(r)
        if isinstance(r.get("bytes"), (int, float)) and ms:
            r.setdefault("gbps", r["bytes"] / (ms * 1e-3) / 1e9)
            if bw:
                r["frac_memcpy"] = r["gbps"] / bw
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: list[dict], columns: list[str] | None = None, skip: tuple[str, ...] = ("bytes",)) -> str:
    """Fixed-width text table; columns default to the union of the rows' keys in first-seen order."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and k not in skip and not isinstance(r[k], (dict, list))]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def print_rows(text: str, rows: list[dict], json_path: str | Path | None, threads: int) -> None:
    """A benchmark script's ending: its table, and its rows (with the torch threads) as JSON
    when ``json_path`` is given."""
    print(text)
    if json_path:
        write_json(json_path, {"rows": rows, "threads": threads})


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _get(row: dict, *names):
    for n in names:
        if n in row:
            return row[n]
        if n.lower() in row:
            return row[n.lower()]
    return None


def plot_nearest(rows: list[dict], path: str | Path) -> Path | None:
    """Nearest-code time vs K, one panel per D, one line per backend, log-log. None if no data."""
    pts: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        d, k, ms, backend = _get(r, "D", "dim"), _get(r, "K", "codes"), row_ms(r), _get(r, "backend")
        if d is None or k is None or ms is None or backend is None:
            continue
        pts.setdefault(int(d), {}).setdefault(str(backend), []).append((int(k), ms))
    if not pts:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ds = sorted(pts)
    cols = min(len(ds), 3)
    nrows = math.ceil(len(ds) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, d in zip(axes.flat, ds):
        for backend, xy in sorted(pts[d].items()):
            xy.sort()
            ax.plot([k for k, _ in xy], [t for _, t in xy], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"D = {d}")
        ax.set_xlabel("K (codes)")
        ax.set_ylabel("time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(ds):]:
        ax.axis("off")
    fig.suptitle("nearest-code search: time vs codebook size")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
