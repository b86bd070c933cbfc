"""Token shards on disk: writer, manifest, reader and verification (DESIGN.md "Tokens on disk").

A token folder written by ``vqtok encode`` is readable without vqtok (numpy + json)::

    manifest.json      written last: format version, tokenizer config + weights sha256, codebook
                       size, token grid, dtype, sample count, and every shard with its sha256
    keys.txt           one source key per row, in global row order (row i of the export)
    tokens-00000.npy   layout "npy": array [n, *grid] (uint16 up to 65536 codes, else uint32)
    tokens-00000.tar   layout "wds": WebDataset shard, per sample ``{row:09d}.tokens.npy`` (the
                       [*grid] array) and ``{row:09d}.key.txt`` (its source key)
    tokens-00000.bin   layout "bin": raw little-endian tokens, samples concatenated in row order,
                       each flattened in C order; ``offsets.npy`` (int64 [N+1]) holds the token
                       offset of every row in the concatenation of all ``.bin`` shards

Shard ``j`` always holds rows ``[j * shard_size, min((j + 1) * shard_size, N))``, whoever writes
it, so a resumed or a distributed export produces the same bytes as a single uninterrupted run.
Every file is written to a temporary name, fsynced and renamed: a shard that exists under its
final name is complete, and the manifest (written last) never names a partial shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

FORMAT_NAME = "vqtok-tokens"
FORMAT_VERSION = 1
LAYOUTS = ("npy", "wds", "bin")
MANIFEST = "manifest.json"
KEYS_FILE = "keys.txt"
OFFSETS_FILE = "offsets.npy"
_SUFFIX = {"npy": ".npy", "wds": ".tar", "bin": ".bin"}
_TMP_MARK = ".tmp-"


class TokenFormatError(ValueError):
    """A token folder that does not match its manifest; the message names the offending file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------------------------
# naming and dtypes
# --------------------------------------------------------------------------------------------
def token_dtype(codebook_size: int) -> np.dtype:
    """Smallest unsigned little-endian dtype that holds ids in [0, codebook_size)."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return np.dtype("<u2") if codebook_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int, layout: str) -> str:
    check_layout(layout)
    return f"tokens-{index:05d}{_SUFFIX[layout]}"


def num_shards(num_samples: int, shard_size: int) -> int:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return max(1, math.ceil(num_samples / shard_size)) if num_samples else 0


def shard_range(index: int, num_samples: int, shard_size: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``index``."""
    start = index * shard_size
    return start, min(start + shard_size, num_samples)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(f)`` into a temporary file, fsync it, then rename it in place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def remove_temporaries(root: str | os.PathLike) -> int:
    """Delete temporary files a killed writer left behind; returns how many were removed."""
    removed = 0
    for p in Path(root).glob(f".*{_TMP_MARK}*"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# shard writer
# --------------------------------------------------------------------------------------------
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same tokens give the same bytes
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    root: str | os.PathLike, index: int, tokens: np.ndarray, keys: Sequence[str], layout: str, first: int
) -> Path:
    """Atomically write shard ``index`` holding ``tokens`` [n, *grid] for rows first..first+n-1.

    ``tokens`` must already be in the export dtype (see :func:`token_dtype`); ``keys`` (n source
    keys) are stored inside WebDataset shards only; ``keys.txt`` is written with the manifest.
    """
    check_layout(layout)
    if tokens.ndim < 2 or len(keys) != tokens.shape[0]:
        raise ValueError(f"tokens must be [n, *grid] with n == len(keys); got {tokens.shape} and {len(keys)} keys")
    tokens = np.ascontiguousarray(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False))

    def write(f):
        if layout == "npy":
            f.write(_npy_bytes(tokens))
        elif layout == "bin":
            f.write(tokens.tobytes(order="C"))
        else:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for i, (row, key) in enumerate(zip(tokens, keys)):
                    _tar_add(tar, f"{first + i:09d}.tokens.npy", _npy_bytes(row))
                    _tar_add(tar, f"{first + i:09d}.key.txt", key.encode("utf-8"))

    return atomic_write(Path(root) / shard_name(index, layout), write)


def complete_shards(root: str | os.PathLike, layout: str, count: int) -> list[int]:
    """Indices in [0, count) whose shard exists under its final name (hence is complete)."""
    root = Path(root)
    return [j for j in range(count) if (root / shard_name(j, layout)).is_file()]


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def _dump_json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_manifest(
    root: str | os.PathLike,
    *,
    layout: str,
    keys: Sequence[str],
    shard_size: int,
    grid: Sequence[int],
    codebook_size: int,
    header: dict,
) -> dict:
    """Write ``keys.txt`` (and ``offsets.npy`` for "bin"), then ``manifest.json`` last.

    Every shard must be complete; each is hashed here. ``header`` holds the caller's sections
    (``tokenizer``, ``source``); the manifest is deterministic (sorted keys, no timestamps).
    """
    root = Path(root)
    n = len(keys)
    for k in keys:
        if "\n" in k or "\r" in k:
            raise ValueError(f"source keys must not contain line breaks: {k!r}")
    dtype = token_dtype(codebook_size)
    shards = []
    for j in range(num_shards(n, shard_size)):
        path = root / shard_name(j, layout)
        if not path.is_file():
            raise TokenFormatError(path, "shard missing: cannot write the manifest before every shard is complete")
        start, stop = shard_range(j, n, shard_size)
        shards.append(
            {"file": path.name, "first": start, "samples": stop - start, "bytes": path.stat().st_size,
             "sha256": sha256_file(path)}
        )
    atomic_write(root / KEYS_FILE, lambda f: f.write("".join(k + "\n" for k in keys).encode("utf-8")))
    manifest = {
        **header,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "codebook_size": int(codebook_size),
        "grid": [int(g) for g in grid],
        "tokens_per_sample": int(np.prod(grid)),
        "dtype": dtype.name,
        "byte_order": "little",
        "num_samples": n,
        "shard_size": int(shard_size),
        "keys": {"file": KEYS_FILE, "sha256": sha256_file(root / KEYS_FILE)},
        "shards": shards,
    }
    if layout == "bin":
        offsets = np.arange(n + 1, dtype="<i8") * manifest["tokens_per_sample"]
        atomic_write(root / OFFSETS_FILE, lambda f: f.write(_npy_bytes(offsets)))
        manifest["offsets"] = {"file": OFFSETS_FILE, "sha256": sha256_file(root / OFFSETS_FILE)}
    atomic_write(root / MANIFEST, lambda f: f.write(_dump_json(manifest)))
    return manifest


def read_manifest(root: str | os.PathLike) -> dict:
    """Parse and sanity-check ``root/manifest.json``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise TokenFormatError(path, "no manifest: not a token folder, or its export has not finished")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenFormatError(path, f"unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise TokenFormatError(path, f"not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TokenFormatError(
            path, f"format_version {manifest.get('format_version')!r} unsupported (this vqtok reads {FORMAT_VERSION})"
        )
    missing = {"layout", "codebook_size", "grid", "dtype", "num_samples", "shards", "keys"} - manifest.keys()
    if missing:
        raise TokenFormatError(path, f"manifest lacks {sorted(missing)}")
    return manifest


# --------------------------------------------------------------------------------------------
# reading shards (memory-mapped)
# --------------------------------------------------------------------------------------------
def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TokenFormatError(path, f"unreadable .npy shard, truncated or corrupt ({e})") from None


def _open_tar(path: Path, grid: tuple[int, ...], dtype: np.dtype) -> list[np.ndarray]:
    """Memory-mapped [*grid] views of every sample's ``.tokens.npy`` inside an uncompressed tar."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TokenFormatError(path, f"unreadable .tar shard, truncated or corrupt ({e})") from None
    if not members:
        return []
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    rows = []
    for m in members:
        head = io.BytesIO(bytes(raw[m.offset_data : m.offset_data + min(m.size, 1024)]))
        try:
            np.lib.format.read_magic(head)
            shape, fortran, dt = np.lib.format.read_array_header_1_0(head)
        except ValueError as e:
            raise TokenFormatError(path, f"member {m.name}: bad .npy header ({e})") from None
        if tuple(shape) != grid or dt != dtype or fortran:
            raise TokenFormatError(path, f"member {m.name}: shape {shape} {dt}, expected {grid} {dtype}")
        start = m.offset_data + head.tell()
        end = start + int(np.prod(grid)) * dtype.itemsize
        if end > raw.shape[0]:
            raise TokenFormatError(path, f"member {m.name} runs past the end of the file (truncated)")
        rows.append(raw[start:end].view(dtype).reshape(grid))
    return rows


class _ShardView:
    """Rows of one shard, opened lazily: ``rows(a, b)`` -> array [b - a, *grid] (a view when possible)."""

    def __init__(self, path: Path, layout: str, samples: int, grid: tuple[int, ...], dtype: np.dtype):
        self.path, self.layout, self.samples, self.grid, self.dtype = path, layout, samples, grid, dtype
        self._data = None

    def open(self):
        """Map the file and check its shape, dtype and (tar) members; returns the mapped data."""
        if not self.path.is_file():
            raise TokenFormatError(self.path, "shard listed in the manifest is missing")
        if self.layout == "npy":
            data = _open_npy(self.path)
        elif self.layout == "bin":
            expect = self.samples * int(np.prod(self.grid)) * self.dtype.itemsize
            if self.path.stat().st_size != expect:
                raise TokenFormatError(self.path, f"{self.path.stat().st_size} bytes, expected {expect} (truncated?)")
            data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.samples, *self.grid))
        else:
            data = _open_tar(self.path, self.grid, self.dtype)
        if self.layout == "npy" and (data.shape != (self.samples, *self.grid) or data.dtype != self.dtype):
            raise TokenFormatError(
                self.path, f"array {data.shape} {data.dtype}, manifest says {(self.samples, *self.grid)} {self.dtype}"
            )
        if self.layout == "wds" and len(data) != self.samples:
            raise TokenFormatError(self.path, f"{len(data)} samples, manifest says {self.samples}")
        self._data = data
        return data

    def __getstate__(self) -> dict:  # DataLoader workers re-map the file instead of copying it
        return {**self.__dict__, "_data": None}

    @property
    def data(self):
        return self._data if self._data is not None else self.open()

    def rows(self, a: int, b: int) -> np.ndarray:
        data = self.data
        return np.stack(data[a:b]) if isinstance(data, list) else data[a:b]


# --------------------------------------------------------------------------------------------
# TokenDataset
# --------------------------------------------------------------------------------------------
class TokenDataset(torch.utils.data.Dataset):
    """Memory-mapped token folder: ``ds[i]`` -> int64 tensor [*grid] (``flat=True``: [T], T = prod(grid)).

    Nothing is loaded up front; shards are mapped on first access. The flattened-with-offsets
    view for LM training: ``ds.offsets`` (int64 [N+1]; row i is tokens offsets[i]:offsets[i+1]
    of the stream) and ``ds.stream(start, stop)`` -> int64 numpy [stop - start], the token stream
    of all rows concatenated in row order (windows may cross rows and shards).
    """

    def __init__(self, root: str | os.PathLike, *, flat: bool = False):
        self.root = Path(root)
        self.manifest = m = read_manifest(self.root)
        self.flat = flat
        self.layout: str = m["layout"]
        self.codebook_size: int = int(m["codebook_size"])
        self.grid: tuple[int, ...] = tuple(int(g) for g in m["grid"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        self.tokens_per_sample = int(np.prod(self.grid))
        self._shards = [
            _ShardView(self.root / s["file"], self.layout, int(s["samples"]), self.grid, self.dtype) for s in m["shards"]
        ]
        self._first = np.array([int(s["first"]) for s in m["shards"]] + [int(m["num_samples"])], dtype=np.int64)
        self._keys: list[str] | None = None
        self._offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def tokenizer(self) -> dict:
        """The manifest's tokenizer section (config, weights_sha256, modality, ...)."""
        return self.manifest.get("tokenizer", {})

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            path = self.root / self.manifest["keys"]["file"]
            if not path.is_file():
                raise TokenFormatError(path, "keys file listed in the manifest is missing")
            self._keys = path.read_text("utf-8").splitlines()
            if len(self._keys) != len(self):
                raise TokenFormatError(path, f"{len(self._keys)} keys, manifest says {len(self)} samples")
        return self._keys

    def key(self, i: int) -> str:
        return self.keys[i]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a numpy array [stop - start, *grid] in the stored dtype."""
        start, stop = max(0, start), min(len(self), stop)
        if start >= stop:
            return np.zeros((0, *self.grid), self.dtype)
        s0 = int(np.searchsorted(self._first, start, side="right")) - 1
        parts = []
        for s in range(s0, len(self._shards)):
            a, b = self._first[s], self._first[s + 1]
            if a >= stop:
                break
            parts.append(self._shards[s].rows(max(start, a) - a, min(stop, b) - a))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} samples")
        i %= len(self)
        row = torch.from_numpy(self.rows(i, i + 1)[0].astype(np.int64))
        return row.reshape(-1) if self.flat else row

    @property
    def offsets(self) -> np.ndarray:
        """int64 [N+1]: row i occupies tokens offsets[i]:offsets[i+1] of :meth:`stream`."""
        if self._offsets is None:
            entry = self.manifest.get("offsets")
            if entry:
                self._offsets = _open_npy(self.root / entry["file"])
            else:
                self._offsets = np.arange(len(self) + 1, dtype=np.int64) * self.tokens_per_sample
        return self._offsets

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the flat stream (all rows concatenated), as int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"stream range [{start}, {stop}) outside [0, {self.num_tokens}]")
        if start == stop:
            return np.zeros(0, np.int64)
        offsets = self.offsets
        a = int(np.searchsorted(offsets, start, side="right")) - 1
        b = int(np.searchsorted(offsets, stop, side="left"))
        flat = self.rows(a, b).reshape(-1)
        return flat[start - offsets[a] : stop - offsets[a]].astype(np.int64)


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------
def _check_file(path: Path, entry: dict, what: str) -> None:
    if not path.is_file():
        raise TokenFormatError(path, f"{what} listed in the manifest is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise TokenFormatError(path, f"{size} bytes, manifest says {entry['bytes']} (truncated or altered {what})")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise TokenFormatError(path, f"sha256 {digest[:16]}... != manifest {entry['sha256'][:16]}... (altered {what})")


def verify_tokens(root: str | os.PathLike, *, check_values: bool = True, progress: bool = False) -> dict:
    """Check every file of a token folder against its manifest; raise :class:`TokenFormatError`.

    Checks: manifest format; keys file hash and row count; shards contiguous and covering every
    row; each shard present, of the listed size and sha256, of shape [n, *grid] and dtype; with
    ``check_values`` every token id in [0, codebook_size). Returns a summary dict.
    """
    from tqdm.auto import tqdm

    ds = TokenDataset(root)
    m, root = ds.manifest, ds.root
    _check_file(root / m["keys"]["file"], m["keys"], "keys file")
    _ = ds.keys  # reads keys.txt, checks its row count
    expect = 0
    for s in m["shards"]:
        if s["first"] != expect:
            raise TokenFormatError(root / MANIFEST, f"shard {s['file']} starts at row {s['first']}, expected {expect}")
        expect += s["samples"]
    if expect != len(ds):
        raise TokenFormatError(root / MANIFEST, f"shards hold {expect} rows, manifest says {len(ds)} samples")
    total = 0
    for s, view in zip(tqdm(m["shards"], desc="verify", unit="shard", disable=not progress), ds._shards):
        path = root / s["file"]
        _check_file(path, s, "shard")
        total += s["bytes"]
        if check_values and view.samples:
            for a in range(0, view.samples, 4096):
                hi = int(view.rows(a, min(a + 4096, view.samples)).max())
                if hi >= ds.codebook_size:
                    raise TokenFormatError(path, f"token id {hi} >= codebook_size {ds.codebook_size}")
        else:
            view.open()  # shape / dtype / member checks
    if "offsets" in m:
        _check_file(root / m["offsets"]["file"], m["offsets"], "offsets index")
        offsets = ds.offsets
        if offsets.shape != (len(ds) + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) != ds.tokens_per_sample):
            raise TokenFormatError(root / m["offsets"]["file"], "offsets do not match the rows of the shards")
    return {"root": str(root), "layout": ds.layout, "samples": len(ds), "shards": len(m["shards"]), "bytes": total,
            "codebook_size": ds.codebook_size, "grid": list(ds.grid), "dtype": m["dtype"]}
