"""The embedded video-audio benchmark's validity: the shipped AV model's clean recall, how much each shift
costs it, and how much the label oracle can win back (issue 25's checks), on the val or the test split.

    python benchmarks/av_validity.py run --split val     # then --split test; resumable
    python benchmarks/av_validity.py report               # results/av-validity/README.md from the JSON

``run`` measures, online and with the protocol defaults (:mod:`qshift.options`), ``source`` on the clean
queries of both directions, on every video corruption at severity 5 (``world-av-c/v2a/<c>/5``), every audio
noise at severity 5 (``world-av-c/a2v/<n>/5``) and every temporal shift at severity 5
(``world-av-temporal/v2a/<t>/5``), and the supervised ``oracle`` (it reads the labels: an upper bound, never
a competitor) on the video corruptions and audio noises.  Each finished row is written at once
(atomically) to ``results/av-validity/<split>.json``; a rerun skips the rows it holds for the same model.
The checks: the video and the audio means each lose 15–75 % of clean R@1, at most 3 of each fall below
10 % of clean, and the oracle gains ≥ +10 R@1 on the video mean (v2a).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qshift.atomic import write_text_atomic
from qshift.bench.av_families import AUDIO_CORRUPTIONS, TEMPORAL_SHIFTS, VIDEO_CORRUPTIONS
from qshift.bench.backbone import world_identity
from qshift.bench.registry import build_benchmark
from qshift.engine import RunConfig, environment, run_online
from qshift.models.av_model import load_av_model
from qshift.retrieval.encode import encode_batched

OUT = Path("results/av-validity")
SEVERITY = 5
GROUPS = ("video", "audio", "temporal")


def rows() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(row name, benchmark, direction, methods) in the order they are run."""
    out = [("clean/v2a", "world-av/v2a/clean", "v2a", ("source",)),
           ("clean/a2v", "world-av/a2v/clean", "a2v", ("source",))]
    out += [(f"video/{c}", f"world-av-c/v2a/{c}/{SEVERITY}", "v2a", ("source", "oracle")) for c in VIDEO_CORRUPTIONS]
    out += [(f"audio/{n}", f"world-av-c/a2v/{n}/{SEVERITY}", "a2v", ("source", "oracle")) for n in AUDIO_CORRUPTIONS]
    out += [(f"temporal/{t}", f"world-av-temporal/v2a/{t}/{SEVERITY}", "v2a", ("source",)) for t in TEMPORAL_SHIFTS]
    return out


def run(split: str, seed: int, max_queries: int | None) -> None:
    path = OUT / f"{split}.json"
    model_id = world_identity(task="video-audio")
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = old.get("model") == model_id and old.get("max_queries") == max_queries
    results = old.get("rows", {}) if same else {}
    t0 = time.time() - float(old.get("seconds", 0.0) if results else 0.0)
    galleries = {}
    for name, bench, direction, methods in rows():
        if name in results:
            continue
        task = build_benchmark(bench, split=split, progress=False, max_queries=max_queries)
        if direction not in galleries:
            galleries[direction] = encode_batched(load_av_model(None, direction).encode_gallery, task.gallery, 256)
        r = {}
        for method in methods:
            cfg = RunConfig(method=method, seed=seed)
            r[method] = run_online(load_av_model(None, direction), task, cfg, progress=False,
                                   gallery_embeddings=galleries[direction]).metrics
        results[name] = {m: {k: round(v, 3) for k, v in met.items()} for m, met in r.items()}
        write_text_atomic(path, json.dumps({"split": split, "seed": seed, "severity": SEVERITY,
                                            "max_queries": max_queries, "model": model_id,
                                            "environment": environment(), "seconds": round(time.time() - t0, 1),
                                            "rows": results}, indent=1))
        print(f"{split} {name:<28} " + "  ".join(f"{m} R@1 {x['R@1']:5.1f}" for m, x in r.items()), flush=True)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summary(data: dict) -> dict:
    """The issue's checks from one split's rows, per group (video: v2a, audio: a2v, temporal: v2a)."""
    rs = data["rows"]
    out = {"clean": {d: rs[f"clean/{d}"]["source"]["R@1"] for d in ("v2a", "a2v") if f"clean/{d}" in rs}}
    for g, d in (("video", "v2a"), ("audio", "a2v"), ("temporal", "v2a")):
        group = [r for n, r in rs.items() if n.startswith(f"{g}/")]
        if not group or d not in out["clean"]:
            continue
        clean = out["clean"][d]
        src = _mean([r["source"]["R@1"] for r in group])
        m = {"n": len(group), "mean": src, "loss": 1 - src / clean,
             "below_10pct": sum(r["source"]["R@1"] < 0.1 * clean for r in group)}
        if all("oracle" in r for r in group):
            m["oracle_mean"] = _mean([r["oracle"]["R@1"] for r in group])
            m["oracle_gain"] = m["oracle_mean"] - src
        out[g] = m
    return out


def report() -> None:
    splits = {s: json.loads((OUT / f"{s}.json").read_text()) for s in ("val", "test") if (OUT / f"{s}.json").is_file()}
    if not splits:
        sys.exit("error: no results yet; run `python benchmarks/av_validity.py run --split val` first")
    n_q = next(iter(splits.values())).get("max_queries") or 2000
    lines = ["# The embedded video-audio benchmark: clean recall, shift cost and the oracle's gain", "",
             "Generated by `python benchmarks/av_validity.py report` from the JSON beside it (made by "
             "`python benchmarks/av_validity.py run --split val` and `--split test`). Online R@1 (percent), "
             f"protocol defaults, shift seed 0, a fixed subset of {n_q} queries of each split, every shift at "
             f"severity {SEVERITY}. The oracle reads the labels: an upper bound on LayerNorm-only adaptation, never "
             "a competitor.", "",
             "| split | group | clean | shifted mean (loss) | below 10 % of clean | oracle mean | oracle gain |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s, d in splits.items():
        m = summary(d)
        for g, direction in (("video", "v2a"), ("audio", "a2v"), ("temporal", "v2a")):
            if g not in m:
                continue
            x = m[g]
            o = (f"{x['oracle_mean']:.1f} | {x['oracle_gain']:+.1f}" if "oracle_gain" in x else "– | –")
            lines.append(f"| {s} | {g} ({direction}) | {m['clean'][direction]:.1f} | {x['mean']:.1f} ({x['loss']:.0%}) | "
                         f"{x['below_10pct']} of {x['n']} | {o} |")
    lines += ["", "Checks (issue 25): the video and the audio means each lose 15–75 % of clean, at most 3 of each "
              "below 10 % of clean; the oracle gains ≥ +10 on the video mean (v2a), on val and on test.", ""]
    for s, d in splits.items():
        lines += [f"## {s}: every row", "", "| row | source R@1 | source R@10 | source MedR | oracle R@1 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in d["rows"].items():
            o = f"{r['oracle']['R@1']:.1f}" if "oracle" in r else "–"
            medr = r["source"].get("MedR")
            lines.append(f"| {name} | {r['source']['R@1']:.1f} | {r['source']['R@10']:.1f} | "
                         f"{'–' if medr is None else f'{medr:.1f}'} | {o} |")
        env = d["environment"]
        lines += ["", f"Model: AV checkpoint `{d['model'].get('av_weights_sha256', '?')[:16]}…`; "
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
