"""Token shards on disk (vqtok.data.tokens): format, plain-numpy readability, TokenDataset, verify."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from vqtok.data.tokens import (
    LAYOUTS,
    TokenDataset,
    TokenFormatError,
    atomic_write,
    complete_shards,
    num_shards,
    read_manifest,
    remove_temporaries,
    shard_name,
    shard_range,
    token_dtype,
    verify_tokens,
    write_manifest,
    write_shard,
)

N, SHARD, GRID, K = 23, 5, (3, 4), 1000


def _export(root, layout, tokens, keys=None, shard_size=SHARD, codebook_size=K):
    keys = keys or [f"img/{i}.png" for i in range(len(tokens))]
    tokens = tokens.astype(token_dtype(codebook_size))
    for j in range(num_shards(len(tokens), shard_size)):
        a, b = shard_range(j, len(tokens), shard_size)
        write_shard(root, j, tokens[a:b], keys[a:b], layout, a)
    return write_manifest(
        root, layout=layout, keys=keys, shard_size=shard_size, grid=tokens.shape[1:], codebook_size=codebook_size,
        header={"tokenizer": {"weights_sha256": "ab" * 32, "modality": "image"}},
    )


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, K, (N, *GRID))


def test_token_dtype_is_smallest_unsigned():
    assert token_dtype(1) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**20) == np.uint32
    with pytest.raises(ValueError, match="codebook_size"):
        token_dtype(0)


def test_shard_ranges_cover_every_row_once():
    for n, s in [(23, 5), (5, 5), (1, 7), (100, 1)]:
        rows = [r for j in range(num_shards(n, s)) for r in range(*shard_range(j, n, s))]
        assert rows == list(range(n))
    with pytest.raises(ValueError, match="shard_size"):
        num_shards(10, 0)
    with pytest.raises(ValueError, match="layout"):
        shard_name(0, "parquet")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(tmp_path, tokens, layout):
    m = _export(tmp_path, layout, tokens)
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 3]
    assert m["dtype"] == "uint16" and m["grid"] == list(GRID) and m["num_samples"] == N
    summary = verify_tokens(tmp_path)
    assert summary["samples"] == N and summary["shards"] == 5

    ds = TokenDataset(tmp_path)
    assert len(ds) == N and ds.grid == GRID and ds.codebook_size == K
    assert np.array_equal(ds.rows(0, N), tokens)
    assert np.array_equal(ds.rows(3, 12), tokens[3:12])  # crosses two shard boundaries
    item = ds[7]
    assert item.dtype == torch.int64 and item.shape == GRID and torch.equal(item, torch.from_numpy(tokens[7]))
    assert torch.equal(ds[-1], torch.from_numpy(tokens[-1]))
    assert ds.key(7) == "img/7.png" and len(ds.keys) == N
    assert ds.tokenizer["modality"] == "image"
    with pytest.raises(IndexError):
        ds[N]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flat_view_with_offsets(tmp_path, tokens, layout):
    _export(tmp_path, layout, tokens)
    ds = TokenDataset(tmp_path, flat=True)
    T = int(np.prod(GRID))
    assert ds[4].shape == (T,) and torch.equal(ds[4], torch.from_numpy(tokens[4].reshape(-1)))
    assert np.array_equal(ds.offsets, np.arange(N + 1) * T) and ds.num_tokens == N * T
    stream = tokens.reshape(-1)
    for a, b in [(0, 1), (5, 77), (59, 61), (0, N * T), (N * T - 3, N * T), (10, 10)]:
        got = ds.stream(a, b)
        assert got.dtype == np.int64 and np.array_equal(got, stream[a:b]), (a, b)
    for i in (0, 9, N - 1):
        assert np.array_equal(ds.stream(ds.offsets[i], ds.offsets[i + 1]), tokens[i].reshape(-1))
    with pytest.raises(IndexError):
        ds.stream(0, N * T + 1)


def test_residual_grid_and_uint32(tmp_path):
    big = 70000  # past uint16
    tokens = np.random.default_rng(1).integers(0, big, (9, 2, 3, 4))  # depth axis last
    tokens[0, 0, 0, 0] = big - 1
    m = _export(tmp_path, "npy", tokens, shard_size=4, codebook_size=big)
    assert m["dtype"] == "uint32" and m["grid"] == [2, 3, 4]
    verify_tokens(tmp_path)
    assert np.array_equal(TokenDataset(tmp_path).rows(0, 9), tokens)


def test_plain_numpy_and_json_read_every_layout(tmp_path, tokens):
    """What another training stack does, without vqtok: json + numpy (+ tarfile)."""
    for layout in LAYOUTS:
        root = tmp_path / layout
        root.mkdir()
        _export(root, layout, tokens)
        manifest = json.loads((root / "manifest.json").read_text())
        keys = (root / manifest["keys"]["file"]).read_text().splitlines()
        dtype = np.dtype(manifest["dtype"])
        rows = []
        for shard in manifest["shards"]:
            path = root / shard["file"]
            if layout == "npy":
                arr = np.load(path, mmap_mode="r")
                assert isinstance(arr, np.memmap) and arr.shape == (shard["samples"], *manifest["grid"])
                rows.append(arr)
            elif layout == "bin":
                rows.append(np.memmap(path, dtype=dtype, mode="r").reshape(-1, *manifest["grid"]))
            else:
                with tarfile.open(path) as tar:
                    names = tar.getnames()
                    assert names[:2] == [f"{shard['first']:09d}.tokens.npy", f"{shard['first']:09d}.key.txt"]
                    for name in names:
                        data = tar.extractfile(name).read()
                        if name.endswith(".tokens.npy"):
                            rows.append(np.load(io.BytesIO(data))[None])
                        else:
                            assert data.decode() == keys[int(name.split(".")[0])]
        assert np.array_equal(np.concatenate(rows), tokens) and keys[3] == "img/3.png"
        if layout == "bin":
            offsets = np.load(root / manifest["offsets"]["file"])
            flat = np.concatenate([np.fromfile(root / s["file"], dtype=dtype) for s in manifest["shards"]])
            assert np.array_equal(flat[offsets[5] : offsets[6]], tokens[5].reshape(-1))


def test_dataset_is_memory_mapped_and_pickles_without_data(tmp_path, tokens):
    _export(tmp_path, "npy", tokens)
    ds = TokenDataset(tmp_path)
    assert all(v._data is None for v in ds._shards)  # nothing opened up front
    ds[0]
    assert isinstance(ds._shards[0].data, np.memmap) and ds._shards[1]._data is None
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < tokens.nbytes + 4096 and torch.equal(clone[12], ds[12])
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    assert torch.equal(torch.cat(list(loader)), torch.from_numpy(tokens))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_writes_are_deterministic(tmp_path, tokens, layout):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _export(tmp_path / name, layout, tokens)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "tokens-00000.npy"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / ".tokens-00001.npy.tmp-123").write_bytes(b"left by a SIGKILL")
    assert complete_shards(tmp_path, "npy", 2) == []
    assert remove_temporaries(tmp_path) == 1 and list(tmp_path.iterdir()) == []


def test_manifest_needs_every_shard_and_clean_keys(tmp_path, tokens):
    write_shard(tmp_path, 0, tokens[:5].astype("<u2"), [str(i) for i in range(5)], "npy", 0)
    assert complete_shards(tmp_path, "npy", 5) == [0]
    with pytest.raises(TokenFormatError, match="tokens-00001.npy"):
        write_manifest(tmp_path, layout="npy", keys=[str(i) for i in range(N)], shard_size=SHARD, grid=GRID,
                       codebook_size=K, header={})
    with pytest.raises(ValueError, match="line breaks"):
        write_manifest(tmp_path, layout="npy", keys=["a\nb"], shard_size=SHARD, grid=GRID, codebook_size=K, header={})
    with pytest.raises(ValueError, match="n == len"):
        write_shard(tmp_path, 0, tokens[:5].astype("<u2"), ["x"], "npy", 0)


# --------------------------------------------------------------------------------------------
# corruption: every error names the file
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncated_shard_is_named(tmp_path, tokens, layout):
    _export(tmp_path, layout, tokens)
    path = tmp_path / shard_name(2, layout)
    data = path.read_bytes()
    path.write_bytes(data[: 1500 if layout == "wds" else len(data) // 2])  # tar: cut inside a member
    with pytest.raises(TokenFormatError, match=rf"{path.name}.*truncated"):
        verify_tokens(tmp_path)
    with pytest.raises(TokenFormatError, match=path.name):  # reading it fails clearly too
        TokenDataset(tmp_path).rows(10, 11)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_altered_shard_is_named(tmp_path, tokens, layout):
    _export(tmp_path, layout, tokens)
    path = tmp_path / shard_name(1, layout)
    data = bytearray(path.read_bytes())
    pos = 600 if layout == "wds" else len(data) - 3  # inside the first sample's tokens
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TokenFormatError, match=rf"{path.name}.*sha256"):
        verify_tokens(tmp_path)


def test_missing_files_are_named(tmp_path, tokens):
    with pytest.raises(TokenFormatError, match="manifest.json.*no manifest"):
        verify_tokens(tmp_path)
    _export(tmp_path, "npy", tokens)
    (tmp_path / shard_name(3, "npy")).unlink()
    with pytest.raises(TokenFormatError, match=r"tokens-00003\.npy.*missing"):
        verify_tokens(tmp_path)
    with pytest.raises(TokenFormatError, match=r"tokens-00003\.npy.*missing"):
        TokenDataset(tmp_path)[16]
    (tmp_path / "keys.txt").write_text("x\n")
    with pytest.raises(TokenFormatError, match="keys.txt"):
        verify_tokens(tmp_path)


def test_bad_manifest_and_values(tmp_path, tokens):
    _export(tmp_path, "npy", tokens)
    m = read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(TokenFormatError, match="format_version 99"):
        verify_tokens(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TokenFormatError, match="manifest.json.*unreadable"):
        read_manifest(tmp_path)
    # a consistent folder whose ids exceed the declared codebook: shape and hashes pass, values do not
    _export(tmp_path, "npy", tokens, codebook_size=K)
    m = read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "codebook_size": 10}))
    with pytest.raises(TokenFormatError, match=r"tokens-00000\.npy.*codebook_size 10"):
        verify_tokens(tmp_path)
    assert verify_tokens(tmp_path, check_values=False)["samples"] == N
    # a manifest whose grid disagrees with the arrays
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "grid": [4, 3]}))
    with pytest.raises(TokenFormatError, match=r"tokens-00000\.npy.*manifest says"):
        verify_tokens(tmp_path, check_values=False)
