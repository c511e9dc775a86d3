"""Images per second of every image corruption at severity 5 on the world's 96-px images.

    python benchmarks/corruption_throughput.py [--n 200] [--workers 2]

Prints one row per corruption (single process and with the worker pool used by the benchmark
builder), slowest first, then the fastest and slowest.  Nothing is cached here.
"""
from __future__ import annotations

import argparse
import time


from qshift.bench.world_data import _corrupt_chunk, _parallel
from qshift.data import world
from qshift.shifts.image import CORRUPTIONS, corrupt_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per corruption")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--severity", type=int, default=5)
    args = ap.parse_args()
    split = world.generate_world(seed=21, n_images=args.n)
    images = split.images()
    corrupt_batch(images[:2], "glass_blur", 1, range(2))  # compile numba once, outside the timing
    rows = []
    for name in CORRUPTIONS:
        t = time.perf_counter()
        corrupt_batch(images, name, args.severity, range(args.n))
        single = args.n / (time.perf_counter() - t)
        chunks = [(images[s:s + 50], range(s, min(s + 50, args.n)), name, args.severity, 0)
                  for s in range(0, args.n, 50)]
        t = time.perf_counter()
        _parallel(_corrupt_chunk, chunks, args.workers, name, False)
        pooled = args.n / (time.perf_counter() - t)
        rows.append((name, single, pooled))
    rows.sort(key=lambda r: r[2])
    print(f"{'corruption':<18} {'img/s (1 proc)':>15} {f'img/s ({args.workers} workers)':>18}")
    for name, single, pooled in rows:
        print(f"{name:<18} {single:>15.0f} {pooled:>18.0f}")
    print(f"slowest: {rows[0][0]} {rows[0][2]:.0f} img/s; fastest: {rows[-1][0]} {rows[-1][2]:.0f} img/s "
          f"({args.workers} workers, severity {args.severity}, {world.IMAGE_SIZE} px)")


if __name__ == "__main__":
    main()
