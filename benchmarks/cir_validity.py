"""The embedded CIR benchmark's validity: the shipped CIR model's clean recall, how much each shift costs it,
and how much the label oracle can win back (issue 26's checks), on the val or the test split.

    python benchmarks/cir_validity.py run --split val     # then --split test; resumable
    python benchmarks/cir_validity.py report               # results/cir-validity/README.md from the JSON

``run`` measures, online and with the protocol defaults (:mod:`qshift.options`), ``source`` on the clean
queries, on every image corruption of the reference at severity 5 (``world-cir-c/image/<c>/5``) and on every
listed modification-text corruption at level 6 (``world-cir-c/text/<p>/6``,
:data:`qshift.bench.cir_families.CIR_TEXT_PERTURBATIONS`), and the supervised ``oracle`` (it reads the
labels: an upper bound, never a competitor) on the image corruptions.  Each finished row is written at
once (atomically) to ``results/cir-validity/<split>.json``; a rerun skips the rows it holds for the same
model.  The checks: the image and text means lose 15–75 % of clean R@1, at most 3 corruptions fall below
10 % of clean, and the oracle gains ≥ +10 R@1 on the image mean.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from qshift.atomic import write_text_atomic
from qshift.bench.backbone import world_identity
from qshift.bench.cir_families import CIR_TEXT_PERTURBATIONS
from qshift.bench.registry import build_benchmark
from qshift.engine import RunConfig, environment, run_online
from qshift.models.cir_model import load_cir_model
from qshift.retrieval.encode import encode_batched
from qshift.shifts.image import CORRUPTIONS

OUT = Path("results/cir-validity")
SEVERITY, LEVEL = 5, 6


def rows() -> list[tuple[str, str, tuple[str, ...]]]:
    """(row name, benchmark, methods) in the order they are run."""
    out = [("clean", "world-cir/clean", ("source",))]
    out += [(f"image/{c}", f"world-cir-c/image/{c}/{SEVERITY}", ("source", "oracle")) for c in CORRUPTIONS]
    out += [(f"text/{p}", f"world-cir-c/text/{p}/{LEVEL}", ("source",)) for p in CIR_TEXT_PERTURBATIONS]
    return out


def run(split: str, seed: int, max_queries: int | None) -> None:
    path = OUT / f"{split}.json"
    model_id = world_identity(task="composed")
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = old.get("model") == model_id and old.get("max_queries") == max_queries
    results = old.get("rows", {}) if same else {}
    t0 = time.time() - float(old.get("seconds", 0.0) if results else 0.0)
    gallery = None
    for name, bench, methods in rows():
        if name in results:
            continue
        task = build_benchmark(bench, split=split, progress=False, max_queries=max_queries)
        if gallery is None:
            gallery = encode_batched(load_cir_model().encode_gallery, task.gallery, 256, progress=False)
        r = {}
        for method in methods:
            cfg = RunConfig(method=method, seed=seed)
            r[method] = run_online(load_cir_model(), task, cfg, progress=False, gallery_embeddings=gallery).metrics
        results[name] = {m: {k: round(v, 3) for k, v in met.items()} for m, met in r.items()}
        write_text_atomic(path, json.dumps({"split": split, "seed": seed, "severity": SEVERITY, "level": LEVEL,
                                            "max_queries": max_queries,
                                            "model": model_id, "environment": environment(),
                                            "seconds": round(time.time() - t0, 1), "rows": results}, indent=1))
        print(f"{split} {name:<24} " + "  ".join(f"{m} R@1 {x['R@1']:5.1f}" for m, x in r.items()), flush=True)


def summary(data: dict) -> dict:
    """The issue's checks from one split's rows."""
    rs = data["rows"]
    clean = rs["clean"]["source"]["R@1"]
    image = [r for n, r in rs.items() if n.startswith("image/")]
    text = [r for n, r in rs.items() if n.startswith("text/")]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    img_src = mean([r["source"]["R@1"] for r in image])
    return {"clean": clean, "image_mean": img_src, "image_loss": 1 - img_src / clean,
            "below_10pct": sum(r["source"]["R@1"] < 0.1 * clean for r in image),
            "text_mean": mean([r["source"]["R@1"] for r in text]),
            "text_loss": 1 - mean([r["source"]["R@1"] for r in text]) / clean,
            "oracle_mean": mean([r["oracle"]["R@1"] for r in image]),
            "oracle_gain": mean([r["oracle"]["R@1"] - r["source"]["R@1"] for r in image]),
            "n_image": len(image), "n_text": len(text)}


def report() -> None:
    splits = {s: json.loads((OUT / f"{s}.json").read_text()) for s in ("val", "test") if (OUT / f"{s}.json").is_file()}
    if not splits:
        sys.exit("error: no results yet; run `python benchmarks/cir_validity.py run --split val` first")
    lines = ["# The embedded CIR benchmark: clean recall, shift cost and the oracle's gain", "",
             "Generated by `python benchmarks/cir_validity.py report` from the JSON beside it (made by "
             "`python benchmarks/cir_validity.py run --split val` and `--split test`). Online R@1 (percent, CIRR "
             f"protocol: reference removed), protocol defaults, shift seed 0, a fixed subset of "
             f"{next(iter(splits.values())).get('max_queries') or 2000} queries of each split; image corruptions at severity "
             f"{SEVERITY}, modification-text corruptions at level {LEVEL}. The oracle reads the labels: an upper "
             "bound on LayerNorm-only adaptation, never a competitor.", "",
             "| split | clean | image s5 mean (loss) | below 10 % of clean | text L6 mean (loss) | oracle, image s5 mean | oracle gain |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s, d in splits.items():
        m = summary(d)
        lines.append(f"| {s} | {m['clean']:.1f} | {m['image_mean']:.1f} ({m['image_loss']:.0%}) | {m['below_10pct']} of "
                     f"{m['n_image']} | {m['text_mean']:.1f} ({m['text_loss']:.0%}) | {m['oracle_mean']:.1f} | "
                     f"{m['oracle_gain']:+.1f} |")
    lines += ["", "Checks (issue 26): each shift mean loses 15–75 % of clean; at most 3 corruptions below 10 % of "
              "clean; oracle gain ≥ +10 on val and test.", ""]
    for s, d in splits.items():
        lines += [f"## {s}: every row", "", "| row | source R@1 | source R@10 | source R_s@1 | oracle R@1 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in d["rows"].items():
            o = f"{r['oracle']['R@1']:.1f}" if "oracle" in r else "–"
            lines.append(f"| {name} | {r['source']['R@1']:.1f} | {r['source']['R@10']:.1f} | "
                         f"{r['source']['R_s@1']:.1f} | {o} |")
        env = d["environment"]
        lines += ["", f"Model: CIR checkpoint `{d['model'].get('cir_weights_sha256', '?')[:16]}…`; "
                  f"{d['seconds'] / 60:.0f} min; torch {env.get('torch', '?')}, {env.get('platform', '?')}.", ""]
    write_text_atomic(OUT / "README.md", "\n".join(lines))
    print((OUT / "README.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--split", choices=("val", "test"), required=True)
    r.add_argument("--seed", type=int, default=0, help="the stream's query-order seed")
    r.add_argument("--max-queries", type=int, default=1000,
                   help="queries per row (a fixed seeded subset, world_data.subsample_rows; 0 = all 2,000)")
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.split, args.seed, args.max_queries or None)
    else:
        report()


if __name__ == "__main__":
    main()
