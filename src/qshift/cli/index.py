"""``qshift index build``: a gallery index (FAISS) written beside its gallery embeddings (docs/large-galleries.md)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from qshift.cli.common import USER_ERRORS, app, console, error as _error

index_app = typer.Typer(no_args_is_help=True, help="Build gallery indexes for top-K candidate search.")
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build_cmd(
    embeddings: Annotated[Path, typer.Argument(help="Gallery embeddings: a .npy [N, d] float array, L2-normalised.")],
    index: Annotated[str, typer.Option(help="A FAISS factory string over inner product: Flat (exact), IVF4096,Flat, "
                                            "HNSW32,Flat, …")] = "Flat",
    params: Annotated[str, typer.Option(help="FAISS search parameters saved with the index, e.g. nprobe=32 or "
                                             "efSearch=128.")] = "",
    out: Annotated[Optional[Path], typer.Option(help="Where to write the index (default: <embeddings stem>.faiss "
                                                     "beside them; a .json sidecar goes with it).")] = None,
    train_size: Annotated[Optional[int], typer.Option(min=1, help="Rows an IVF index is trained on (default: up to "
                                                                  "256 per list).")] = None,
    check: Annotated[int, typer.Option(min=0, help="Gallery rows used as queries to measure the index's recall@10 "
                                                   "against exact search (0: skip).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the training sample and the check sample.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a summary.")] = False,
) -> None:
    """Build an index over gallery embeddings and write it next to them; a top-K run or `qshift serve
    --gallery-embeddings … --set candidates=K` then searches it."""
    import numpy as np
    import torch

    from qshift.retrieval.index import build_index, index_paths, save_index

    try:
        if not embeddings.is_file():
            raise FileNotFoundError(f"{embeddings} not found")
        try:
            arr = np.load(embeddings, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(f"{embeddings}: not a .npy array ({e})") from e
        if arr.dtype.kind != "f" or arr.ndim != 2:
            raise ValueError(f"{embeddings}: expected a float array [N, d], got {arr.dtype} {arr.shape}")
        gallery = torch.from_numpy(np.array(arr, dtype=np.float32))
        norms = gallery.norm(dim=1)
        if not bool(torch.isfinite(norms).all()) or not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise ValueError(f"{embeddings}: the rows must be finite and L2-normalised (inner product = cosine)")
        path = out or index_paths(embeddings)[0]
        t0 = time.perf_counter()
        built = build_index(gallery, index, params, seed=seed, train_size=train_size)
        seconds = time.perf_counter() - t0
        recall = None
        if check:
            rows = torch.from_numpy(np.random.default_rng(seed).permutation(len(gallery))[:check])
            k = min(10, len(gallery))
            exact = build_index(gallery).search(gallery[rows], k)[1]
            found = built.search(gallery[rows], k)[1]
            recall = float((found[:, :, None] == exact[:, None, :]).any(2).float().mean())
        save_index(built, path)
    except USER_ERRORS as e:
        _error(e)
        raise typer.Exit(2)
    summary = {"index": str(path), "kind": index, "params": params, "ntotal": built.ntotal, "dim": built.dim,
               "build_seconds": round(seconds, 2), "recall@10": recall, "check_queries": min(check, built.ntotal)}
    if as_json:
        typer.echo(json.dumps(summary))
        return
    console.print(f"{path}: {index} over {built.ntotal:,} x {built.dim} in {seconds:.1f} s"
                  + ("" if recall is None else f"; recall@10 against exact search {100 * recall:.1f}% "
                     f"({summary['check_queries']} gallery rows as queries)"), highlight=False)
