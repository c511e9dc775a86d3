"""A grid on a real backbone and a real dataset format, end to end through the CLI: a tiny randomly
initialised open_clip model saved as an open_clip checkpoint, a six-image COCO fixture in the
BLIP / TCR annotation layout, ``qshift bench --grid`` over it, then ``qshift report``.

    python benchmarks/tiny_real_grid.py [--out DIR]

The numbers measure nothing about the methods (the model is random); the run shows the real-data path
working: the specs, the grid, the recorded backbone identity, and the report.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from backbone_fixtures import TINY_OPENCLIP, tiny_karpathy, tiny_openclip_checkpoint  # noqa: E402

from qshift.bench import store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the fixtures, grid and report (default: temp)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="qshift-tiny-grid-"))
    root.mkdir(parents=True, exist_ok=True)
    ckpt = tiny_openclip_checkpoint(root / "model")
    data = tiny_karpathy(root / "coco", n_images=6)
    grid = root / "grid.yaml"
    grid.write_text("methods: [source, tent, tcr, rest]\n"
                    "benchmarks: ['coco/i2t', 'coco-c/i2t/gaussian_noise/5', 'coco-c/i2t/fog/5']\n"
                    "protocol: {batch_size: 4, steps: 1}\n"
                    f"model: openclip:{Path(ckpt).parent / (TINY_OPENCLIP + '.json')}\nweights: {ckpt}\n"
                    f"dataset: coco\ndata_root: {data}\n")
    qshift = [sys.executable, "-m", "qshift.cli"]
    out = root / "grid"
    for cmd in ([*qshift, "bench", "--grid", str(grid), "--out", str(out)], [*qshift, "report", str(out)]):
        print("$", " ".join(cmd[2:]).replace("qshift.cli", "qshift"))
        subprocess.run(cmd, check=True)
    rec = next(p for _, p in store.iter_cell_files(out) if "metrics" in p)
    print("recorded backbone:", json.dumps(rec["model"]))
    print("recorded libraries:", {k: rec["environment"][k] for k in ("torch", "open_clip_torch", "pillow")
                                  if k in rec["environment"]})
    print((out / "report" / "report.md").read_text())


if __name__ == "__main__":
    main()
