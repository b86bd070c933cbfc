"""Quantizers under torch.distributed: 2 gloo processes on the CPU, different data per rank.

Every rank must end with identical codebooks, EMA statistics and health counters, and where the
semantics allow it (EMA statistics, k-means on the gathered first batch, health counts) equal to
a single process that saw the concatenated data.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqtok.quantizers import FSQ, LFQ, ResidualVQ, VectorQuantizer

pytestmark = pytest.mark.ddp
WORLD = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(step: int, rank: int, n: int = 96, d: int = 8) -> torch.Tensor:
    """Rank- and step-specific tokens [n, d]; rank 1 gets fewer rows to exercise uneven gathers,
    and none at step 1 (a rank without tokens must still enter every collective)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    rows = n if rank == 0 else (0 if step == 1 else n - 16)
    return torch.randn(rows, d, generator=g) + 2.0 * rank


def _modules():
    """name -> factory of the modules under test (seeded so every rank builds the same start)."""
    return {
        "vq_kmeans": lambda: VectorQuantizer(8, 32, kmeans_init=True, kmeans_iters=3, decay=0.8),
        "vq_restart": lambda: VectorQuantizer(8, 64, dead_code_threshold=1.0, decay=0.5, learning="grad"),
        "vq_restart_nearest": lambda: VectorQuantizer(8, 64, dead_code_threshold=1.0, decay=0.5, learning="grad",
                                                      restart="nearest"),
        "rvq_dropout": lambda: ResidualVQ(8, 16, 3, quantizer_dropout=0.7, kmeans_init=True, kmeans_iters=2,
                                          dead_code_threshold=0.5),
        "lfq": lambda: LFQ(8, bits=6, entropy_weight=0.1),
        "fsq_entropy": lambda: FSQ([4, 4, 3], dim=8, entropy_weight=0.1),
    }


def _run(name: str, batches: list[torch.Tensor]) -> dict:
    torch.manual_seed(0)
    m = _modules()[name]()
    restarted, entropies = 0.0, []
    for x in batches:
        out = m(x.requires_grad_())
        restarted += float(out.stats.get("restarted", 0.0))
        if "entropy_codebook" in out.stats:
            entropies.append([float(out.stats["entropy_sample"]), float(out.stats["entropy_codebook"])])
        out.loss.backward()  # the entropy op's backward must not hang either
    return {"state": {k: v.clone() for k, v in m.state_dict().items()}, "restarted": restarted,
            "entropies": entropies}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {name: _run(name, [_data(s, rank) for s in range(STEPS)]) for name in _modules()}
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp"))
    # fork: the workers inherit the imported modules instead of re-importing torch (seconds each)
    mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True, start_method="fork")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


# each rank's dead-code restart FIFO holds its own recent encoder outputs: rank-local by design
RANK_LOCAL = ("_fifo", "_fifo_meta")


def _shared(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in RANK_LOCAL}


@pytest.mark.parametrize("name", list(_modules()))
def test_identical_state_on_every_rank(ranks, name):
    a, b = _shared(ranks[0][name]["state"]), _shared(ranks[1][name]["state"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs across ranks"
    if name.startswith("vq_restart"):
        assert ranks[0][name]["restarted"] > 0  # the restart path (all_gather) really ran


@pytest.mark.parametrize("name", ["vq_kmeans", "lfq", "fsq_entropy"])
def test_equal_to_single_process_on_concatenated_data(ranks, name):
    single = _shared(_run(name, [torch.cat([_data(s, r) for r in range(WORLD)]) for s in range(STEPS)])["state"])
    dist_state = ranks[0][name]["state"]
    for k, v in single.items():
        if v.is_floating_point():
            assert torch.allclose(dist_state[k], v, atol=1e-5, rtol=1e-5), f"{name}: {k}"
        else:
            assert torch.equal(dist_state[k], v), f"{name}: {k}"
    assert int(dist_state["health.histogram"].sum()) == STEPS * 96 + (STEPS - 1) * 80


@pytest.mark.parametrize("name", ["fsq_entropy", "lfq"])
def test_entropies_are_the_global_batch_values(ranks, name):
    """Logged entropies on 2 ranks equal those of one process on the concatenated batches."""
    single = _run(name, [torch.cat([_data(s, r) for r in range(WORLD)]) for s in range(STEPS)])
    assert len(single["entropies"]) == STEPS
    for rank in range(WORLD):
        got = torch.tensor(ranks[rank][name]["entropies"], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(single["entropies"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
