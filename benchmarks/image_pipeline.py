"""Images per second of real-dataset query sets: the old one-by-one path against the data pipeline.

Generates ``--n`` COCO-sized JPEGs (640×480, 480×640 and 640×427, smooth content plus grain, quality 90)
and a BLIP-format annotation file in a temporary folder, then for each set (clean, gaussian_noise/5,
glass_blur/5) times

* **before** — the path real benchmarks took until the pipeline: a lazy sequence that decodes and
  corrupts each image in the main process when the stream asks for it (copied below, as it was);
* **after, cold** — :func:`qshift.data.pipeline.query_images` into an empty cache: data-loader workers
  decode, corrupt and compress, the main process writes the entry; then every image read back once;
* **after, warm** — the same call again (a grid's next method or seed): open the entry, read every image.

Every image a run consumes is read once in each measurement, and the pipeline's pixels are checked equal
to the old path's.  Run: ``.venv/bin/python benchmarks/image_pipeline.py [--n 240] [--workers K]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from qshift.data import pipeline
from qshift.data.karpathy import CorruptedImages  # the one-by-one, main-process path of before
from qshift.data.retrieval_datasets import load_dataset
from qshift.shifts.image import corrupt_image

SIZES = ((480, 640), (640, 480), (427, 640))


def make_images(root: Path, n: int) -> Path:
    """``n`` photo-like JPEGs of COCO's sizes and a BLIP-format ``coco_karpathy_test.json``."""
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
        rel = f"val2014/COCO_val2014_{i:012d}.jpg"
        Image.fromarray(img).save(root / rel, quality=90)
        entries.append({"image": rel, "caption": [f"a photo number {i}"] * 5})
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))
    return root


def read_all(items: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [items[i] for i in range(len(items))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=240, help="images (a few hundred)")
    ap.add_argument("--workers", type=int, default=None, help="data-loader workers (default: QSHIFT_WORKERS or "
                                                              "min(4, cpu count))")
    ap.add_argument("--sets", default="clean,gaussian_noise/5,glass_blur/5")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qshift-pipeline-bench-"))
    try:
        os.environ["QSHIFT_CACHE"] = str(tmp / "cache")
        os.environ.pop("QSHIFT_CACHE_MAX_MB", None)
        t = time.perf_counter()
        ds = load_dataset("coco", make_images(tmp / "coco", args.n))
        print(f"{args.n} JPEGs ({', '.join(f'{w}x{h}' for h, w in SIZES)}) generated in "
              f"{time.perf_counter() - t:.1f}s; workers: {pipeline.resolve_workers(args.workers)} of "
              f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        corrupt_image(np.zeros((32, 32, 3), np.uint8), "glass_blur", 5, 0)  # numba compile, outside the timings
        rows = []
        for name in args.sets.split(","):
            c, s = (None, 0) if name == "clean" else (name.split("/")[0], int(name.split("/")[1]))
            t = time.perf_counter()
            before = read_all(CorruptedImages(ds.image_paths, c, s, seed=0))
            t_before = time.perf_counter() - t
            t = time.perf_counter()
            cold = read_all(pipeline.query_images(ds, c, s, 0, workers=args.workers))
            t_cold = time.perf_counter() - t
            t = time.perf_counter()
            warm = read_all(pipeline.query_images(ds, c, s, 0, workers=args.workers))
            t_warm = time.perf_counter() - t
            assert all(np.array_equal(a, b) and np.array_equal(a, d) for a, b, d in zip(before, cold, warm)), name
            entry = sum(p.stat().st_size for p in (tmp / "cache").glob("realimg-*.qsc"))
            rows.append((name, args.n / t_before, args.n / t_cold, args.n / t_warm, t_before / t_warm, entry))
            shutil.rmtree(tmp / "cache")  # each set's size alone
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
        print(f"| set | before img/s | after cold img/s | after warm img/s | warm speed-up | cache MB ({args.n} images) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, b, c, w, x, size in rows:
            print(f"| {name} | {b:.1f} | {c:.1f} | {w:.1f} | {x:.1f}× | {size / 2**20:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
