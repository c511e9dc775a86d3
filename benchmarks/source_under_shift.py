"""Source-model R@1 (no adaptation) under every shift of the embedded world, as a Markdown table.

    python benchmarks/source_under_shift.py [--out results/source_under_shift.json] [--weights PATH]
    python benchmarks/source_under_shift.py --rows text-check --weights candidate.pt   # clean + char. L6 only

Rows: clean; the 16 image corruptions at severities 1, 3, 5 (i2t); each text perturbation at
levels 3 and 6 (t2i); each held-out caption style and each QGS domain (both directions).  Ends with
the checks the shifts issue asks for: at severity 5 the mean i2t R@1 over the 16 corruptions as a
share of clean, how many fall below 10 % of clean, and the mean t2i R@1 over the character-level
perturbations at level 6 as a share of clean.  Shifted query sets are cached (see qshift.bench.cache).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import qshift
from qshift.bench.evaluate import evaluate_task
from qshift.bench.grid import model_identity
from qshift.bench.families import QGS_DOMAINS
from qshift.bench.registry import build_benchmark
from qshift.data import world
from qshift.models.world_model import load_world_model
from qshift.shifts.image import CORRUPTIONS
from qshift.shifts.text import CHAR_PERTURBATIONS, TEXT_PERTURBATIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/source_under_shift.json"))
    ap.add_argument("--seed", type=int, default=0, help="shift seed")
    ap.add_argument("--weights", type=Path, default=None, help="a candidate model (default: the shipped one)")
    ap.add_argument("--rows", choices=("all", "text-check"), default="all",
                    help="text-check: only clean and the character perturbations at level 6 (minutes, not ten)")
    args = ap.parse_args()
    t0 = time.time()
    model = load_world_model(args.weights)
    r1: dict[str, float] = {}

    def run(name: str) -> float:
        row, _ = evaluate_task(model, build_benchmark(name, shift_seed=args.seed, progress=True))
        r1[name] = row.metrics["R@1"]
        print(f"{name:<40} R@1 {r1[name]:5.1f}", flush=True)
        return r1[name]

    clean = {d: run(f"world-clean/{d}") for d in ("i2t", "t2i")}
    if args.rows == "text-check":
        char6 = np.array([run(f"world-c/t2i/{p}/6") for p in CHAR_PERTURBATIONS])
        print(f"character perturbations, level 6: mean t2i R@1 {char6.mean():.1f} = "
              f"{100 * char6.mean() / clean['t2i']:.0f} % of clean ({time.time() - t0:.0f}s); nothing written")
        return
    for c in CORRUPTIONS:
        for s in (1, 3, 5):
            run(f"world-c/i2t/{c}/{s}")
    for p in TEXT_PERTURBATIONS:
        for lvl in (3, 6):
            run(f"world-c/t2i/{p}/{lvl}")
    for style in world.HELD_OUT_FAMILIES:
        for d in ("i2t", "t2i"):
            run(f"world-style/{style}/{d}")
    for dom in QGS_DOMAINS:
        for d in ("i2t", "t2i"):
            run(f"world-qgs/{dom}/{d}")

    pct = lambda v, d: 100 * v / clean[d]  # noqa: E731
    lines = ["| shift | direction | R@1 | % of clean |", "| --- | --- | ---: | ---: |"]
    lines.append(f"| clean | i2t | {clean['i2t']:.1f} | 100 |")
    lines.append(f"| clean | t2i | {clean['t2i']:.1f} | 100 |")
    img = "| corruption (i2t) | sev 1 | sev 3 | sev 5 | sev 5 % of clean |\n| --- | ---: | ---: | ---: | ---: |\n"
    for c in CORRUPTIONS:
        v = [r1[f"world-c/i2t/{c}/{s}"] for s in (1, 3, 5)]
        img += f"| {c} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {pct(v[2], 'i2t'):.0f} |\n"
    txt = "| perturbation (t2i) | level 3 | level 6 | level 6 % of clean |\n| --- | ---: | ---: | ---: |\n"
    for p in TEXT_PERTURBATIONS:
        v = [r1[f"world-c/t2i/{p}/{lvl}"] for lvl in (3, 6)]
        txt += f"| {p} | {v[0]:.1f} | {v[1]:.1f} | {pct(v[1], 't2i'):.0f} |\n"
    dom = "| style / domain | i2t R@1 | t2i R@1 |\n| --- | ---: | ---: |\n"
    for s in world.HELD_OUT_FAMILIES:
        dom += f"| style: {s} | {r1[f'world-style/{s}/i2t']:.1f} | {r1[f'world-style/{s}/t2i']:.1f} |\n"
    for d in QGS_DOMAINS:
        dom += f"| QGS: {d} | {r1[f'world-qgs/{d}/i2t']:.1f} | {r1[f'world-qgs/{d}/t2i']:.1f} |\n"
    sev5 = np.array([r1[f"world-c/i2t/{c}/5"] for c in CORRUPTIONS])
    char6 = np.array([r1[f"world-c/t2i/{p}/6"] for p in CHAR_PERTURBATIONS])
    checks = {
        "sev5_mean_i2t_R@1": float(sev5.mean()),
        "sev5_mean_pct_of_clean": float(pct(sev5.mean(), "i2t")),
        "sev5_below_10pct_of_clean": int((sev5 < 0.1 * clean["i2t"]).sum()),
        "char_l6_mean_t2i_R@1": float(char6.mean()),
        "char_l6_mean_pct_of_clean": float(pct(char6.mean(), "t2i")),
    }
    print(f"\nclean: i2t R@1 {clean['i2t']:.1f}, t2i R@1 {clean['t2i']:.1f}\n")
    print(img)
    print(txt)
    print(dom)
    print(json.dumps(checks, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"R@1": r1, "checks": checks, "shift_seed": args.seed, "qshift": qshift.__version__,
              "torch": str(torch.__version__), "platform": platform.platform(), "seconds": round(time.time() - t0, 1),
              "weights_sha256_test": model.card.get("test_set", {}).get("sha256"),
              "model": model_identity(args.weights)}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
