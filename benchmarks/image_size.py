"""Measure what the world's image size costs: render time and training throughput at 64 / 96 / 128 px.

    python benchmarks/image_size.py [--batch 128] [--repeats 5]

For each size the image tower keeps an 8×8 token grid (the last stem stride grows with the size),
so the transformer cost is constant and the difference is the stem and the renderer.  Run it on an
otherwise idle machine; it prints one row per size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qshift.data import world
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    scenes = world.generate_world(seed=11, n_images=64).scenes
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'size':>5} {'patch':>5} {'tokens':>6} {'render ms/img':>14} {'train img/s':>12}")
    for size, patch in ((64, 2), (96, 3), (128, 4)):
        t = time.perf_counter()
        for s in scenes:
            world.render_scene(s, size=size)
        render_ms = 1000 * (time.perf_counter() - t) / len(scenes)
        cfg = WorldModelConfig(image_size=size, patch=patch)
        model = WorldDualEncoder(cfg)
        x = torch.randn(args.batch, 3, size, size)
        times = []
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            model.visual(x).sum().backward()
            if r:
                times.append(time.perf_counter() - t)
        rate = args.batch / statistics.median(times)
        print(f"{size:>5} {patch:>5} {(size // 4 // patch) ** 2:>6} {render_ms:>14.2f} {rate:>12.0f}")


if __name__ == "__main__":
    main()
