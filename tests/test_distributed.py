"""Data-parallel adaptation (qshift.parallel): a 2-process gloo run equals the 1-process run.

One module fixture spawns 2 CPU processes (gloo on 127.0.0.1, one thread each) once; they run every
case below on the same stream the 1-process reference sees, save their adapted parameters and
scores, and the tests compare: the ranks with each other (identical) and with one process (≤ 1e-5).
A plain unsynchronised 2-replica run (each rank adapting on its own shard, like TCR's public code
adapting ``model.module``) must drift apart, so the check can fail.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qshift.data import world
from qshift.methods import create
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig, WorldRetrievalModel
from qshift.parallel import LOCAL, Communicator, Distributed, encode_sharded, from_environment
from qshift.retrieval.encode import encode_batched

WORLD = 2
N_BATCHES = 3
F64, F32 = torch.float64, torch.float32
# (case, method, query modality, items kind, batch size, dtype, tolerance vs one process).  15 does not
# split evenly over 2 ranks.  In float64 the runs agree to ~1e-15: the algorithm is exact.  In float32 a
# different batch split rounds differently (~1e-8 in the gradients); AdamW's first steps divide each
# gradient by its own magnitude, which amplifies that on near-zero coordinates: REST, whose projected
# gradient has many, lands at ~2e-5 (with SGD at ~1e-10), hence its looser float32 tolerance.
CASES = [("tcr-f64", "tcr", "image", "tensor", 15, F64, 1e-9), ("rest-f64", "rest", "image", "tensor", 15, F64, 1e-9),
         ("tent-f64", "tent", "text", "list", 16, F64, 1e-9), ("sar-f64", "sar", "image", "tensor", 15, F64, 1e-9),
         ("tent-f64-batch-of-1", "tent", "image", "tensor", 1, F64, 1e-9),  # a batch smaller than the world
         ("tcr", "tcr", "image", "tensor", 15, F32, 1e-5), ("rest", "rest", "image", "numpy", 15, F32, 1e-4),
         ("tent", "tent", "text", "list", 16, F32, 1e-5), ("sar", "sar", "image", "tensor", 15, F32, 1e-5)]
UNSYNCED = "tcr"  # the case the unsynchronised replicas rerun
ENCODE_N = (37, 1)  # uneven gallery sizes for encode_sharded (1 < the world size)


def _tiny_config() -> WorldModelConfig:  # tests/conftest.py's tiny_model
    return WorldModelConfig(image_width=32, image_depth=1, text_width=32, text_depth=1, heads=2, embed_dim=16,
                            stem_channels=(8, 16))


def _inputs() -> dict:
    torch.manual_seed(0)
    model = WorldDualEncoder(_tiny_config()).eval()
    split = world.generate_world(seed=8, n_images=45)
    images = split.images()
    return {"state": model.state_dict(), "images": images, "pixels": model.preprocess_images(images),
            "captions": list(split.captions), "caption_image": torch.as_tensor(split.caption_image)}


def _model(data: dict) -> WorldDualEncoder:
    model = WorldDualEncoder(_tiny_config()).eval()
    model.load_state_dict(data["state"])
    return model


def _stream(data: dict, modality: str, kind: str, batch: int, dtype: torch.dtype) -> list:
    items = (data["captions"] if modality == "text" else data["images"] if kind == "numpy"
             else data["pixels"].to(dtype))
    return [items[b * batch:(b + 1) * batch] for b in range(N_BATCHES)]


def _gallery(rm: WorldRetrievalModel, data: dict, modality: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if modality == "image":  # i2t: the captions, each labelled with its image
        return rm.encode_gallery(data["captions"]), data["caption_image"]
    return rm.encode_gallery(data["pixels"].to(dtype)), torch.arange(len(data["pixels"]))


def _run_case(data: dict, case: tuple, comm: Communicator, unsynced: bool = False) -> dict:
    """Adapt over the case's stream; ``unsynced``: each rank adapts alone on its shard (no communication)."""
    _, name, modality, kind, batch, dtype, _ = case
    rm = WorldRetrievalModel(_model(data).to(dtype), modality)
    gallery, ids = _gallery(rm, data, modality, dtype)
    method = create(name, rm, gallery, gallery_ids=ids, lr=1e-2, comm=LOCAL if unsynced else comm)
    scores = []
    for items in _stream(data, modality, kind, batch, dtype):
        scores.append(method.adapt_batch(comm.shard(items) if unsynced else items)[0].detach())
    return {"params": [p.detach().clone() for p in method.params], "scores": scores, "source": method.source_state}


def _run_all(data: dict, comm: Communicator) -> dict:
    rm = WorldRetrievalModel(_model(data), "image")
    out = {"cases": {c[0]: _run_case(data, c, comm) for c in CASES},
           "encoded": {n: encode_sharded(rm.encode_gallery, data["captions"][:n], comm, batch_size=8)
                       for n in ENCODE_N}}
    if comm.world_size > 1:
        out["unsynced"] = _run_case(data, next(c for c in CASES if c[0] == UNSYNCED), comm, unsynced=True)
    else:  # one process's encode_sharded is plain batched encoding
        out["batched"] = {n: encode_batched(rm.encode_gallery, data["captions"][:n], 8) for n in ENCODE_N}
    return out


def _worker(rank: int, port: int, inputs: str, results: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = _run_all(torch.load(inputs, weights_only=False), Distributed())
        torch.save(out, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process results, [rank 0's, rank 1's]) of every case."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = _inputs()
    torch.save(data, tmp / "inputs.pt")
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp / "inputs.pt"), str(tmp)), nprocs=WORLD, join=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference runs here while the ranks run
        single = _run_all(data, LOCAL)
    finally:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 120 s")
    return single, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_equal_one(runs, case):
    single, ranks = runs
    tol = case[-1]
    ref = single["cases"][case[0]]
    r0, r1 = (r["cases"][case[0]] for r in ranks)
    assert r0["params"][0].dtype == case[5]
    assert _max_diff(r0["params"], r1["params"]) <= 1e-7, "the ranks' parameters differ"
    assert _max_diff(r0["params"], ref["params"]) <= tol
    assert _max_diff(r0["params"], ref["source"]) > 1e-4  # the runs did adapt
    for r in ranks:
        assert _max_diff(r["cases"][case[0]]["scores"], ref["scores"]) <= min(tol, 1e-5)


def test_unsynchronised_replicas_drift_apart(runs):
    """The check above can fail: replicas that each adapt on their own shard without summing gradients
    (TCR's ``model.module``) end up with different parameters, and not the one-process ones."""
    single, ranks = runs
    a, b = (r["unsynced"]["params"] for r in ranks)
    assert _max_diff(a, b) > 1e-4
    assert _max_diff(a, single["cases"][UNSYNCED]["params"]) > 1e-4


@pytest.mark.parametrize("n", ENCODE_N)
def test_sharded_gallery_encoding_equals_one_process(runs, n):
    single, ranks = runs
    assert float((single["encoded"][n] - single["batched"][n]).abs().max()) <= 1e-6
    for r in ranks:
        assert r["encoded"][n].shape == single["encoded"][n].shape == (n, 16)
        assert float((r["encoded"][n] - single["encoded"][n]).abs().max()) <= 1e-6


def test_shard_bounds_are_contiguous_like_tensor_split():
    comm = Distributed.__new__(Distributed)
    for world_size in (2, 3, 4):
        for n in (1, 2, 7, 15, 16):
            parts = []
            for rank in range(world_size):
                comm.rank, comm.world_size = rank, world_size
                parts.append(comm.bounds(n))
            expect = [len(t) for t in torch.tensor_split(torch.arange(n), world_size)]
            assert [b - a for a, b in parts] == expect
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(parts[k][1] == parts[k + 1][0] for k in range(world_size - 1))


def test_one_process_environment_is_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert from_environment() is LOCAL
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert from_environment() is LOCAL
