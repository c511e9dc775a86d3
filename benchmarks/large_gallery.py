"""Million-item galleries: per-batch time and memory of source / TCR / REST, exact whole-gallery scores at
100,000 items against top-K candidates from a FAISS IVF index at 1,000,000, and the index's recall.

    python benchmarks/large_gallery.py                      # prints the table, writes results/large-gallery/
    python benchmarks/large_gallery.py --sizes 20000,200000 --batches 4   # a quicker look

The gallery is the shipped world model's 10,000 test captions plus synthetic distractors, each a real
caption embedding moved by Gaussian noise (cosine 0.45–0.8 to it), so that distractors compete with
the true captions instead of sitting orthogonal to every query (docs/large-galleries.md).  Queries are
clean test images (i2t), B = 64.  Each cell runs in its own process, so its peak resident memory is its
own; "stream MB" is the peak during the timed batches minus the resident memory before them, the
memory the batches themselves need.  R@1 is over the cell's queries against its gallery (the
distractors make it lower than the embedded benchmark's).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qshift.data import world
from qshift.engine import environment
from qshift.methods import create
from qshift.bench.backbone import world_identity
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.retrieval.encode import encode_batched
from qshift.retrieval.index import build_index, index_paths, load_index, save_index
from qshift.retrieval.metrics import candidate_ranks_and_ap, per_query_ranks_and_ap

OUT = Path(__file__).resolve().parents[1] / "results" / "large-gallery"
METHODS = ("source", "tcr", "rest")
BATCH = 64
CANDIDATES = 100
IVF = "IVF1024,Flat"
NPROBE = "nprobe=32"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so the next peak is the stream's own (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_gallery(size: int, folder: Path, seed: int = 0) -> Path:
    """The real test captions plus ``size - 10,000`` distractors, written as ``gallery-<size>.npy``."""
    path = folder / f"gallery-{size}.npy"
    if path.exists():
        return path
    model = WorldRetrievalModel(load_world_model(), "image")
    real = encode_batched(model.encode_gallery, world.load_split("test").captions)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, real.shape[1]))
    out[: len(real)] = real.numpy()
    gen = torch.Generator().manual_seed(seed)
    for start in range(len(real), size, 100_000):
        n = min(100_000, size - start)
        base = real[torch.randint(0, len(real), (n,), generator=gen)]
        spread = torch.empty(n, 1).uniform_(0.75, 2.0, generator=gen)  # cosine 1/sqrt(1 + s^2): 0.45-0.8
        noise = torch.randn(n, real.shape[1], generator=gen) * spread / real.shape[1] ** 0.5
        out[start:start + n] = F.normalize(base + noise, dim=1).numpy()
    out.flush()
    return path


def run_cell(method: str, gallery_path: Path, mode: str, batches: int) -> dict:
    """One method on one gallery: ``exact`` (whole-gallery scores) or ``ivf`` (top-K from the saved index)."""
    torch.manual_seed(0)
    model = WorldRetrievalModel(load_world_model(), "image")
    gallery = torch.from_numpy(np.load(gallery_path))
    n_real = 10_000
    gallery_ids = torch.full((len(gallery),), -1, dtype=torch.long)
    gallery_ids[:n_real] = torch.as_tensor(world.load_split("test").caption_image)
    index = None
    config = {}
    if mode != "exact":
        index = load_index(index_paths(gallery_path)[0], gallery)
        config = {"candidates": CANDIDATES}
    m = create(method, model, gallery, gallery_ids=gallery_ids, gallery_index=index, **config)
    test = world.load_split("test")
    items = [test.images(list(range(BATCH * b, BATCH * (b + 1)))) for b in range(batches + 1)]
    m.adapt_batch(items[0])  # warm-up (and TCR's queue)
    baseline = _status_mb("VmRSS")
    _reset_peak()
    times, ranks = [], []
    for b in range(1, batches + 1):
        t = time.perf_counter()
        scores, _ = m.adapt_batch(items[b])
        times.append(time.perf_counter() - t)
        labels = torch.arange(BATCH * b, BATCH * (b + 1))
        if m.last_cols is None:
            r, _ = per_query_ranks_and_ap(scores, labels, gallery_ids)
        else:
            r, _ = candidate_ranks_and_ap(scores, m.last_cols, labels, gallery_ids)
        ranks.append(r)
    r = torch.cat(ranks)
    return {"method": method, "gallery": len(gallery), "mode": mode, "batches": batches, "batch": BATCH,
            "s_per_batch_median": statistics.median(times), "s_per_batch_min": min(times),
            "peak_rss_mb": _rss_mb(), "resident_mb": baseline, "stream_mb": _status_mb("VmHWM") - baseline, "R@1": 100 * float((r < 1).float().mean()),
            "R@10": 100 * float((r < 10).float().mean())}


def index_recall(gallery_path: Path, queries: int = 512, probes: tuple[int, ...] = (1, 4, 32)) -> dict:
    """Recall@1 / @10 of the saved IVF index against exact search, for clean test-image queries, at the
    saved ``nprobe`` and a sweep of others; exact search timed alongside."""
    model = WorldRetrievalModel(load_world_model(), "image")
    gallery = torch.from_numpy(np.load(gallery_path))
    z = encode_batched(model.encode_query, world.load_split("test").images(list(range(queries))))
    t = time.perf_counter()
    exact = build_index(gallery).search(z, 10)[1]
    exact_ms = 1000 * (time.perf_counter() - t) / queries
    sweep = []
    for nprobe in probes:
        ivf = load_index(index_paths(gallery_path)[0], gallery, params=f"nprobe={nprobe}")
        t = time.perf_counter()
        approx = ivf.search(z, 10)[1]
        sweep.append({"nprobe": nprobe, "search_ms_per_query": 1000 * (time.perf_counter() - t) / queries,
                      "recall@10": float((approx[:, :, None] == exact[:, None, :]).any(2).float().mean()),
                      "recall@1": float((approx[:, 0] == exact[:, 0]).float().mean())})
    saved = next(r for r in sweep if f"nprobe={r['nprobe']}" == NPROBE)
    return {**saved, "queries": queries, "exact_ms_per_query": exact_ms, "sweep": sweep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="exact-path size, top-K size")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # method:path:mode, run in a child process
    ap.add_argument("--work", type=Path, default=None, help="folder for the galleries and index (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if args.cell:
        method, path, mode = args.cell.split(":")
        print(json.dumps(run_cell(method, Path(path), mode, args.batches)))
        return
    small, large = (int(x) for x in args.sizes.split(","))
    methods = [m for m in args.methods.split(",") if m]
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {small: make_gallery(small, work), large: make_gallery(large, work)}
        t = time.perf_counter()
        gal = np.load(paths[large])
        save_index(build_index(torch.from_numpy(gal), IVF, NPROBE), index_paths(paths[large])[0])
        build_s = time.perf_counter() - t
        del gal
        print(f"{IVF} ({NPROBE}) over {large:,} items built in {build_s:.0f} s", flush=True)
        recall = index_recall(paths[large])
        for row in recall["sweep"]:
            print(f"nprobe={row['nprobe']:<3} recall@10 vs exact {100 * row['recall@10']:.1f}%  "
                  f"{row['search_ms_per_query']:.3f} ms / query (exact torch scan "
                  f"{recall['exact_ms_per_query']:.3f})", flush=True)
        cells = []
        for mode, size in (("exact", small), ("ivf", large)):
            for method in methods:
                proc = subprocess.run([sys.executable, __file__, "--cell", f"{method}:{paths[size]}:{mode}",
                                       "--batches", str(args.batches)], capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"cell {method} {mode} failed:\n{proc.stderr[-3000:]}")
                cell = json.loads(proc.stdout.strip().splitlines()[-1])
                cells.append(cell)
                print(f"{method:<7} {mode:<6} N={size:>9,}  {cell['s_per_batch_median']:.3f} s/batch  "
                      f"peak {cell['peak_rss_mb']:.0f} MB  stream {cell['stream_mb']:.0f} MB  R@1 {cell['R@1']:.1f}",
                      flush=True)
    result = {"cells": cells, "index": {"kind": IVF, "params": NPROBE, "build_seconds": build_s, **recall},
              "candidates": CANDIDATES, "sizes": [small, large], "batches": args.batches, "batch": BATCH,
              "model": world_identity(), "environment": environment(),
              "wall_seconds": time.perf_counter() - t_all, "command": " ".join(["python", *sys.argv])}
    if not args.no_write:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results.json").write_text(json.dumps(result, indent=1))
        (OUT / "README.md").write_text(render(result))
        print(f"wrote {OUT / 'README.md'}")


def render(r: dict) -> str:
    """The generated README of results/large-gallery/."""
    small, large = r["sizes"]
    lines = ["# Large galleries: exact scores vs top-K candidates from FAISS", "",
             f"Generated by `{r['command']}` (benchmarks/large_gallery.py); do not edit by hand.", "",
             f"World model (weights sha256 {r['model']['weights_sha256'][:12]}…), i2t, clean test images, B = {r['batch']}, "
             f"{r['batches']} timed batches after one warm-up; {r['environment']['cpu_count']} CPU cores, torch "
             f"{r['environment']['torch']}, faiss {_faiss_version()}.  Gallery: 10,000 real captions + synthetic "
             "distractors near real caption embeddings.", "",
             f"Index: `{r['index']['kind']}` with `{r['index']['params']}` over {large:,} items, built in "
             f"{r['index']['build_seconds']:.0f} s; recall@10 against exact search "
             f"{100 * r['index']['recall@10']:.1f}%, recall@1 {100 * r['index']['recall@1']:.1f}% "
             f"({r['index']['queries']} queries, {r['index']['search_ms_per_query']:.2f} ms per query; the "
             f"exact torch scan {r['index']['exact_ms_per_query']:.2f} ms).", "",
             "| nprobe | recall@1 | recall@10 | ms / query |", "| ---: | ---: | ---: | ---: |",
             *(f"| {x['nprobe']} | {100 * x['recall@1']:.1f} | {100 * x['recall@10']:.1f} | "
               f"{x['search_ms_per_query']:.3f} |" for x in r["index"]["sweep"]), "",
             "| method | scores | gallery | s / batch (median) | min | resident MB | stream MB | R@1 | R@10 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in r["cells"]:
        how = "whole gallery [B, N]" if c["mode"] == "exact" else f"top-{r['candidates']} from IVF [B, K]"
        lines.append(f"| {c['method']} | {how} | {c['gallery']:,} | {c['s_per_batch_median']:.3f} | "
                     f"{c['s_per_batch_min']:.3f} | {c['resident_mb']:.0f} | {c['stream_mb']:.0f} | {c['R@1']:.1f} | "
                     f"{c['R@10']:.1f} |")
    lines += ["", "*resident MB*: the cell process's resident memory before the timed batches (model, data, "
              "gallery, index); "
              "*stream MB*: the peak during the timed batches (the kernel's peak mark reset after the warm-up) "
              "minus the resident memory before them, i.e. the memory the batches themselves need.", "",
              f"Wall time {r['wall_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _faiss_version() -> str:
    import faiss

    return faiss.__version__


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
