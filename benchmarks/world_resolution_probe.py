"""Would a higher-resolution world make the standard severities recoverable?  (a world-design probe)

    python benchmarks/world_resolution_probe.py [--scale 2] [--severity 5]
        [--corruptions gaussian_noise,defocus_blur,contrast,zoom_blur | all] [--methods source,oracle]
        [--weights FILE.pt] [--out FILE.json]

ImageNet-C severities are defined for ~224 px images; the world renders at 96 px.  This probe renders
the 2,000 test scenes at ``96 × scale`` px, applies each corruption at that size (the library's own
severity definition), box-downsamples by ``scale`` back to 96 px and runs the *shipped* model online
(``source`` and the supervised ``oracle``) — i.e. a world rendered larger whose model starts with a
fixed area downsample.  The clean row checks that the downsampled render matches the 96 px one.
Nothing is cached; writes results/world_resolution_probe_s<scale>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from qshift.bench.registry import build_benchmark
from qshift.data import world
from qshift.data.streams import QuerySet
from qshift.engine import RunConfig, environment, run_online
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.shifts.image import CORRUPTIONS, corrupt_batch

_SCALE = 2


def _render(scenes):
    return np.stack([world.render_scene(s, size=world.IMAGE_SIZE * _SCALE) for s in scenes])


def _down(a: np.ndarray, scale: int) -> np.ndarray:
    n, s = a.shape[0], world.IMAGE_SIZE
    return a.reshape(n, s, scale, s, scale, 3).astype(np.float32).mean((2, 4)).round().clip(0, 255).astype(np.uint8)


def _corrupt(args):
    images, ids, corruption, severity, scale = args
    return _down(corrupt_batch(images, corruption, severity, ids, 0), scale)


def main() -> None:
    global _SCALE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--corruptions", default="gaussian_noise,defocus_blur,contrast,zoom_blur")
    ap.add_argument("--methods", default="source,oracle")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--weights", type=Path, default=None, help="world model weights (default: the shipped ones)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/world_resolution_probe_s<scale>.json")
    args = ap.parse_args()
    _SCALE = args.scale
    cors = list(CORRUPTIONS) if args.corruptions == "all" else args.corruptions.split(",")
    test = world.load_split("test")
    t0 = time.time()
    with Pool(args.workers) as pool:
        big = np.concatenate(pool.map(_render, [test.scenes[s:s + 250] for s in range(0, len(test), 250)]))
    template = build_benchmark(f"world-c/i2t/gaussian_noise/{args.severity}")
    rows: dict[str, dict[str, float]] = {}
    for c in ["clean", *cors]:
        if c == "clean":
            q = _down(big, args.scale)
        else:
            chunks = [(big[s:s + 100], range(s, min(s + 100, len(big))), c, args.severity, args.scale)
                      for s in range(0, len(big), 100)]
            with Pool(args.workers) as pool:
                q = np.concatenate(pool.map(_corrupt, chunks))
        task = dataclasses.replace(template, query_sets=[QuerySet(c, q, np.arange(len(test)))])
        rows[c] = {m: run_online(WorldRetrievalModel(load_world_model(args.weights), "image"), task,
                                 RunConfig(method=m, seed=0), progress=False).metrics["R@1"]
                   for m in (["source"] if c == "clean" else args.methods.split(","))}
        print(c, {k: round(v, 1) for k, v in rows[c].items()}, flush=True)
    out = args.out or Path(f"results/world_resolution_probe_s{args.scale}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    gains = [r["oracle"] - r["source"] for r in rows.values() if "oracle" in r]
    if gains:
        print(f"mean oracle gain over source: {sum(gains) / len(gains):+.1f} ({len(gains)} corruptions)")
    tmp.write_text(json.dumps({"scale": args.scale, "severity": args.severity, "R@1": rows,
                               "weights": str(args.weights or "shipped"),
                               "environment": environment(), "seconds": round(time.time() - t0, 1)}, indent=1))
    tmp.replace(out)
    print(f"({time.time() - t0:.0f}s) → {out}")


if __name__ == "__main__":
    main()
