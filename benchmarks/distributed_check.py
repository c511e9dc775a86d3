"""Data-parallel adaptation check: the 2-process run against the 1-process run on the shipped world model.

    python benchmarks/distributed_check.py                       # tcr and rest, 3 batches of 31, 2 ranks
    python benchmarks/distributed_check.py --batches 5 --batch 45 --gallery-images 4001 --dtypes float32

Spawns 2 CPU processes (gloo on 127.0.0.1, one thread each) that adapt the shipped model's image tower
(i2t) on the same stream of world images against their captions, each rank encoding its share of every
batch (:mod:`qshift.parallel`); the 1-process reference runs in this process with one thread.  Prints, per
method and dtype, the max |Δparam| and max |Δscore| between one process and two, and the max |Δparam|
between the two ranks; then a sharded encoding of an uneven caption gallery (``--gallery-images`` × 5
captions): its max |Δ| against one process and its wall time against one process on one and on two
threads.  docs/distributed.md quotes this script's output.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qshift.data import world
from qshift.methods import create
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.parallel import LOCAL, Communicator, Distributed, encode_sharded

METHODS = ("tcr", "rest")
WORLD = 2


def adapt(name: str, dtype: torch.dtype, data: dict, comm: Communicator) -> dict:
    """Adapt a fresh shipped model over the stream; the final parameters and every batch's scores."""
    rm = WorldRetrievalModel(load_world_model().to(dtype), "image")
    gallery = rm.encode_gallery(data["captions"])
    method = create(name, rm, gallery, gallery_ids=data["caption_image"], comm=comm)
    scores = [method.adapt_batch(batch.to(dtype))[0] for batch in data["batches"]]
    return {"params": [p.detach().clone() for p in method.params], "scores": scores}


def encode_gallery(captions: list[str], comm: Communicator) -> tuple[torch.Tensor, float]:
    """The caption gallery encoded with each rank encoding its share, and the wall time (all ranks done)."""
    encode = WorldRetrievalModel(load_world_model(), "image").encode_gallery
    if comm.world_size > 1:
        dist.barrier()
    t = time.perf_counter()
    out = encode_sharded(encode, captions, comm, batch_size=256)
    if comm.world_size > 1:
        dist.barrier()
    return out, time.perf_counter() - t


def run_all(data: dict, comm: Communicator, dtypes: list[str]) -> dict:
    out = {(m, d): adapt(m, getattr(torch, d), data, comm) for m in METHODS for d in dtypes}
    out["gallery"] = encode_gallery(data["gallery"], comm)
    return out


def worker(rank: int, port: int, inputs: str, results: str, dtypes: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=10))
    try:
        torch.save(run_all(torch.load(inputs, weights_only=False), Distributed(), dtypes),
                   Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch", type=int, default=31, help="queries per batch (odd: uneven shards)")
    ap.add_argument("--gallery-images", type=int, default=2001, help="caption gallery of 5 × this many captions")
    ap.add_argument("--dtypes", default="float32,float64")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")

    model = load_world_model()
    split = world.generate_world(seed=3, n_images=args.batches * args.batch)
    pixels = model.preprocess_images(split.images())
    data = {"batches": list(pixels.split(args.batch)), "captions": list(split.captions),
            "caption_image": torch.as_tensor(split.caption_image),
            "gallery": list(world.generate_world(seed=4, n_images=args.gallery_images).captions)}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(data, Path(tmp) / "inputs.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.perf_counter()
        mp.spawn(worker, args=(port, str(Path(tmp) / "inputs.pt"), tmp, dtypes), nprocs=WORLD)
        two_wall = time.perf_counter() - t
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    t = time.perf_counter()
    one = run_all(data, LOCAL, dtypes)
    one_wall = time.perf_counter() - t
    torch.set_num_threads(2)
    _, one_two_threads = encode_gallery(data["gallery"], LOCAL)

    print(f"shipped world model, i2t, {args.batches} batches of {args.batch} queries, {len(data['captions'])}-caption "
          f"gallery, protocol defaults (3 AdamW steps per batch), {WORLD} gloo ranks × 1 thread")
    print(f"{'method':<6} {'dtype':<8} {'max|Δparam| 1p vs 2p':>21} {'max|Δscore| 1p vs 2p':>21} "
          f"{'max|Δparam| rank0 vs 1':>23}")
    for m in METHODS:
        for d in dtypes:
            ref, r0, r1 = one[(m, d)], ranks[0][(m, d)], ranks[1][(m, d)]
            dscore = max(max_diff(r["scores"], ref["scores"]) for r in (r0, r1))
            print(f"{m:<6} {d:<8} {max_diff(r0['params'], ref['params']):>21.3g} {dscore:>21.3g} "
                  f"{max_diff(r0['params'], r1['params']):>23.3g}")
    g1, t1 = one["gallery"]
    n = len(data["gallery"])
    print(f"gallery encoding, {n} captions (float32): max|Δ| 2p vs 1p "
          f"{max(float((r['gallery'][0] - g1).abs().max()) for r in ranks):.3g}; wall 2 processes × 1 thread "
          f"{max(r['gallery'][1] for r in ranks):.2f}s, 1 process × 1 thread {t1:.2f}s, 1 process × 2 threads "
          f"{one_two_threads:.2f}s")
    print(f"total wall: 2-process run {two_wall:.1f}s (with spawn), 1-process run {one_wall:.1f}s")


if __name__ == "__main__":
    main()
