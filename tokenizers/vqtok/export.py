"""Token export: ``encode_dataset`` (data -> token shards), ``decode_tokens`` (shards -> media) and
``verify_export`` (shards vs manifest vs tokenizer). The CLI's encode/decode/verify call these.

Resumable: shard ``j`` holds rows [j*S, (j+1)*S) and is written atomically, so a re-run skips the
shards that exist and rewrites nothing else; the manifest is written last. Batches never cross
a shard boundary, so a shard's bytes do not depend on which shards were pending or who wrote it.

Distributed (``torchrun``): rank r encodes the shards j with j % world_size == r; after a barrier
rank 0 writes keys.txt and the manifest. The folder equals a single-process export.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vqtok.data import tokens as tk
from vqtok.tokenizer import Tokenizer

STATE_FILE = ".vqtok-encode.json"  # run identity while an export is in progress; removed at the end
_PAUSE_ENV = "VQTOK_TEST_PAUSE_AFTER_SHARD"  # tests: stop (sleep) after writing shard k, to be killed


# --------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)
# --------------------------------------------------------------------------------------------
def _dist_init() -> tuple[int, int, bool]:
    """(rank, world_size, initialised_here): joins a torchrun group when WORLD_SIZE > 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _broadcast(obj, world: int):
    """rank 0's ``obj`` on every rank."""
    if world <= 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
_BUILTIN = {"images": "image", "image": "image", "video": "video", "audio": "audio"}


def build_input(source: str, cfg: dict, split: str = "train", limit: int | None = None):
    """The dataset to encode, built with the tokenizer's own data settings (size, frames, length,
    sample rate): ``builtin:images|video|audio`` (its ``split``), or a folder, encoded whole
    (every readable file, centre crop / first ``length`` samples). Returns a dataset with ``key(i)``."""
    from vqtok.data import build_dataset

    modality = cfg["model"]["modality"]
    data_cfg = {**cfg.get("data", {}), "modality": modality}
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in _BUILTIN:
            raise ValueError(f"--input {source!r}: unknown built-in set; use builtin:images, builtin:video or builtin:audio")
        if _BUILTIN[name] != modality:
            raise ValueError(f"--input {source!r} is {_BUILTIN[name]} data but the tokenizer is a {modality} tokenizer")
        data_cfg.update(source="builtin")
    elif Path(source).is_dir():
        data_cfg.update(source="folder", path=str(source), eval_path=str(source))
        split = "eval"  # the eval transform is deterministic; eval_path=path keeps every file
    else:
        raise FileNotFoundError(f"--input {source!r}: not a folder and not builtin:images|video|audio")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    ds = build_dataset(data_cfg, split)
    if limit is not None and limit < len(ds):
        ds = _Head(ds, limit)
    return ds


class _Head(torch.utils.data.Dataset):
    """The first ``n`` samples of a dataset (keys included)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]

    def key(self, i: int) -> str:
        return self.ds.key(i)


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------
def _identity(tok: Tokenizer, source: dict, layout: str, shard_size: int, n: int, grid) -> dict:
    return {"weights_sha256": tok.weights_sha256, "source": source, "layout": layout, "shard_size": shard_size,
            "num_samples": n, "grid": list(grid)}


def _prepare_output(out: Path, ident: dict) -> str | None:
    """Rank 0: create/validate the output folder. Returns "done", None (go on) or raises."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = out / tk.MANIFEST, out / STATE_FILE
    if manifest_path.is_file():
        m = tk.read_manifest(out)
        have = {"weights_sha256": m.get("tokenizer", {}).get("weights_sha256"), "source": m.get("source"),
                "layout": m["layout"], "shard_size": m["shard_size"], "num_samples": m["num_samples"],
                "grid": m["grid"]}
        if have != ident:
            raise FileExistsError(f"{manifest_path}: {out} already holds a different export; use a new --output")
        return "done"
    if state_path.is_file():
        have = json.loads(state_path.read_text("utf-8"))
        if have != ident:
            diff = sorted(k for k in ident if have.get(k) != ident[k])
            raise FileExistsError(
                f"{state_path}: {out} holds an unfinished export with other settings ({', '.join(diff)}); "
                "re-run it with the same arguments or use a new --output"
            )
    elif any(out.glob("tokens-*")):
        raise FileExistsError(f"{out}: holds token shards but no manifest or export state; use a new --output")
    tk.remove_temporaries(out)
    tk.atomic_write(state_path, lambda f: f.write(json.dumps(ident, sort_keys=True).encode("utf-8")))
    return None


def _agree_on_output(out: Path, ident: dict, rank: int, world: int) -> str:
    """Rank 0 prepares the folder; every rank gets its verdict ("go" or "done") or raises."""
    status, err = None, None
    if rank == 0:
        try:
            status = _prepare_output(out, ident) or "go"
        except Exception as e:  # noqa: BLE001 - every rank must learn about it, or the others wait forever
            status, err = f"error: {e}", e
    status = _broadcast(status, world)
    if err is not None:
        raise err
    if status.startswith("error: "):
        raise RuntimeError(f"rank 0 could not prepare {out}: {status[7:]}")
    return status


def _finish(out: Path, ds, layout: str, shard_size: int, grid, codebook_size: int, header: dict) -> None:
    """Rank 0, after every shard exists: keys.txt, offsets, manifest (last); drop the export state."""
    keys = [ds.key(i) for i in range(len(ds))]
    tk.write_manifest(out, layout=layout, keys=keys, shard_size=shard_size, grid=grid, codebook_size=codebook_size,
                      header=header)
    (out / STATE_FILE).unlink(missing_ok=True)
    tk.fsync_dir(out)


def encode_dataset(
    checkpoint: str | os.PathLike,
    source: str,
    output: str | os.PathLike,
    *,
    layout: str = "npy",
    shard_size: int = 1024,
    batch_size: int = 16,
    split: str = "train",
    limit: int | None = None,
    device: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode ``source`` with the tokenizer at ``checkpoint`` into token shards under ``output``.

    Returns the manifest (on every rank). Re-running the same call after an interruption
    resumes after the last complete shard; under torchrun every rank takes its share.
    """
    from tqdm.auto import tqdm

    tk.check_layout(layout)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    rank, world, own_group = _dist_init()
    try:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and world > 1:  # one GPU per rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % torch.cuda.device_count()))}"
        tok = Tokenizer.from_pretrained(checkpoint, device=device)
        ds = build_input(source, tok.config, split, limit)
        n = len(ds)
        if n == 0:
            raise ValueError(f"--input {source!r} ({split} split) has no samples")
        grid = tok.token_grid(tuple(ds[0].shape))
        src = {"input": str(source), "split": split if source.startswith("builtin:") else "all", "limit": limit}
        ident = _identity(tok, src, layout, shard_size, n, grid)
        out = Path(output)
        if _agree_on_output(out, ident, rank, world) == "done":
            if rank == 0:
                print(f"{out}: export already complete ({n} samples)", file=sys.stderr)
            return tk.read_manifest(out)

        count = tk.num_shards(n, shard_size)
        done = set(tk.complete_shards(out, layout, count))
        mine = [j for j in range(count) if j % world == rank and j not in done]
        if rank == 0 and done:
            print(f"{out}: resuming, {len(done)} of {count} shards already complete", file=sys.stderr)
        todo = sum(b - a for a, b in (tk.shard_range(j, n, shard_size) for j in mine))
        bar = tqdm(total=todo, desc="encode" + (f" rank {rank}" if world > 1 else ""), unit="sample",
                   disable=not progress or rank != 0, dynamic_ncols=True)
        _encode_shards(tok, ds, out, mine, n, shard_size, batch_size, layout, grid, num_workers, bar)
        _barrier(world)
        if rank == 0:
            header = {"tokenizer": {"weights_sha256": tok.weights_sha256, "modality": tok.modality,
                                    "config": tok.config, "checkpoint": str(checkpoint)}, "source": src}
            _finish(out, ds, layout, shard_size, grid, tok.codebook_size, header)
        _barrier(world)
        return tk.read_manifest(out)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _encode_shards(tok, ds, out: Path, shards, n, shard_size, batch_size, layout, grid, num_workers, bar) -> None:
    """Encode and write ``shards`` (indices) one after the other; batches stay inside a shard."""
    dtype = tk.token_dtype(tok.codebook_size)
    batches = [list(range(a, min(a + batch_size, b)))
               for j in shards for a, b in [tk.shard_range(j, n, shard_size)] for a in range(a, b, batch_size)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=num_workers)
    pause = os.environ.get(_PAUSE_ENV)
    it = iter(loader)
    with bar:
        for j in shards:
            a, b = tk.shard_range(j, n, shard_size)
            parts = []
            for _ in range(a, b, batch_size):
                ids = tok.encode(next(it))
                if tuple(ids.shape[1:]) != tuple(grid):
                    raise RuntimeError(f"sample token grid {tuple(ids.shape[1:])} != {tuple(grid)}: inputs differ in shape")
                parts.append(ids.cpu().numpy())
                bar.update(ids.shape[0])
            tokens = np.concatenate(parts).astype(dtype)
            tk.write_shard(out, j, tokens, [ds.key(i) for i in range(a, b)], layout, a)
            if pause is not None and int(pause) == j:
                print(f"vqtok-test: paused after shard {j}", file=sys.stderr, flush=True)
                time.sleep(3600)


# --------------------------------------------------------------------------------------------
# verify / decode
# --------------------------------------------------------------------------------------------
def check_tokenizer_matches(tok: Tokenizer, tokens_dir: str | os.PathLike) -> None:
    """Raise when the tokens under ``tokens_dir`` were not made by ``tok`` (weights sha256)."""
    path = Path(tokens_dir) / tk.MANIFEST
    made_by = tk.read_manifest(tokens_dir).get("tokenizer", {})
    want = made_by.get("weights_sha256")
    if want != tok.weights_sha256:
        raise tk.TokenFormatError(
            path,
            f"tokens come from a different tokenizer: weights sha256 {str(want)[:16]}... (checkpoint "
            f"{made_by.get('checkpoint')!r}), the given one has {tok.weights_sha256[:16]}...; decode with the "
            "tokenizer that encoded them",
        )


def verify_export(tokens_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                  progress: bool = True) -> dict:
    """Every shard's size, sha256, shape, dtype and id range against the manifest; with
    ``checkpoint``, also that this tokenizer made the tokens. Returns a summary dict."""
    summary = tk.verify_tokens(tokens_dir, progress=progress)
    if checkpoint is not None:
        check_tokenizer_matches(Tokenizer.from_pretrained(checkpoint), tokens_dir)
        summary["tokenizer"] = "matches"
    return summary


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (the rounding every saved image goes through)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _safe_name(i: int, key: str) -> str:
    return f"{i:06d}_{re.sub(r'[^A-Za-z0-9._@,-]+', '_', key)[:80]}"


def _save_sample(x: torch.Tensor, base: Path, modality: str, sample_rate: int) -> Path:
    from PIL import Image

    if modality == "image":
        path = base.with_name(base.name + ".png")
        Image.fromarray(to_uint8(x)).save(path)
    elif modality == "video":  # [3, T, H, W] -> folder of frames
        path = base
        path.mkdir(parents=True, exist_ok=True)
        for t in range(x.shape[1]):
            Image.fromarray(to_uint8(x[:, t])).save(path / f"frame_{t:04d}.png")
    else:  # [C, T] -> 16-bit PCM WAV
        import wave

        path = base.with_name(base.name + ".wav")
        pcm = (x.float().clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().cpu().numpy()
        with wave.open(str(path), "wb") as w:
            w.setnchannels(x.shape[0])
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm.astype("<i2").tobytes())
    return path


def decode_tokens(
    checkpoint: str | os.PathLike,
    tokens_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Decode exported tokens back to media under ``output``: PNG images, folders of PNG frames
    (video) or WAV files (audio), named ``{row:06d}_{key}``. The folder is verified first and
    must come from this tokenizer. Returns the written paths in row order."""
    from tqdm.auto import tqdm

    tk.verify_tokens(tokens_dir, progress=False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_pretrained(checkpoint, device=device)
    check_tokenizer_matches(tok, tokens_dir)
    ds = tk.TokenDataset(tokens_dir)
    n = len(ds) if limit is None else min(len(ds), int(limit))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rate = int(tok.config.get("data", {}).get("sample_rate", 16000) or 16000)
    paths = []
    with tqdm(total=n, desc="decode", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for a in range(0, n, batch_size):
            b = min(a + batch_size, n)
            x = tok.decode(torch.from_numpy(ds.rows(a, b).astype(np.int64)))
            for i in range(a, b):
                paths.append(_save_sample(x[i - a], out / _safe_name(i, ds.key(i)), tok.modality, rate))
            bar.update(b - a)
    return paths
