"""What the benchmark-validity scripts (``cir_validity.py``, ``av_validity.py``) share: the resumable runner
that measures ``source`` (and the label ``oracle``) on a list of rows, one JSON file per split, the report's
per-row tables and the command line (``run --split val|test``, ``report``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qshift.atomic import write_text_atomic
from qshift.bench.registry import build_benchmark
from qshift.engine import RunConfig, environment, run_online
from qshift.retrieval.encode import encode_batched

#: a row: (name, benchmark, direction, methods)
Row = tuple[str, str, str, tuple[str, ...]]


def run_rows(path: Path, rows: Sequence[Row], load_model: Callable[[str], Any], model_id: dict, split: str,
             seed: int, max_queries: int | None, header: dict[str, Any]) -> None:
    """Run every row not yet in ``path`` (for the same model, query count and ``header``) and rewrite the file atomically
    after each; ``load_model(direction)`` gives a fresh source model, ``header`` goes into the file."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    same = (old.get("model") == model_id and old.get("max_queries") == max_queries
            and all(old.get(k) == v for k, v in header.items()))  # e.g. a benchmark version or render size
    results = old.get("rows", {}) if same else {}
    t0 = time.time() - float(old.get("seconds", 0.0) if results else 0.0)
    galleries: dict[str, Any] = {}
    for name, bench, direction, methods in rows:
        if name in results:
            continue
        task = build_benchmark(bench, split=split, progress=False, max_queries=max_queries)
        if direction not in galleries:
            galleries[direction] = encode_batched(load_model(direction).encode_gallery, task.gallery, 256,
                                                  progress=False)
        r = {}
        for method in methods:
            r[method] = run_online(load_model(direction), task, RunConfig(method=method, seed=seed), progress=False,
                                   gallery_embeddings=galleries[direction]).metrics
        results[name] = {m: {k: round(v, 3) for k, v in met.items()} for m, met in r.items()}
        write_text_atomic(path, json.dumps({"split": split, "seed": seed, **header, "max_queries": max_queries,
                                            "model": model_id, "environment": environment(),
                                            "seconds": round(time.time() - t0, 1), "rows": results}, indent=1))
        print(f"{split} {name:<28} " + "  ".join(f"{m} R@1 {x['R@1']:5.1f}" for m, x in r.items()), flush=True)


def load_splits(out: Path, script: str) -> dict[str, dict]:
    """The val / test JSON files present in ``out`` (exits with one error line when there is none)."""
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("val", "test") if (out / f"{s}.json").is_file()}
    if not splits:
        sys.exit(f"error: no results yet; run `python benchmarks/{script} run --split val` first")
    return splits


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def row_tables(splits: dict[str, dict], third: tuple[str, str], weights_key: str, what: str) -> list[str]:
    """Per split, every row's source R@1 / R@10 / ``third`` (a (column title, metric key) pair) and oracle
    R@1, then the model and environment line."""
    lines: list[str] = []
    for s, d in splits.items():
        lines += [f"## {s}: every row", "", f"| row | source R@1 | source R@10 | source {third[0]} | oracle R@1 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in d["rows"].items():
            o = f"{r['oracle']['R@1']:.1f}" if "oracle" in r else "–"
            x = r["source"].get(third[1])
            lines.append(f"| {name} | {r['source']['R@1']:.1f} | {r['source']['R@10']:.1f} | "
                         f"{'–' if x is None else f'{x:.1f}'} | {o} |")
        env = d["environment"]
        lines += ["", f"Model: {what} checkpoint `{d['model'].get(weights_key, '?')[:16]}…`; "
                  f"{d['seconds'] / 60:.0f} min; torch {env.get('torch', '?')}, {env.get('platform', '?')}.", ""]
    return lines


def write_report(out: Path, lines: list[str]) -> None:
    write_text_atomic(out / "README.md", "\n".join(lines))
    print((out / "README.md").read_text())


def main(description: str, run: Callable[[str, int, int | None], None], report: Callable[[], None],
         default_queries: int = 1000) -> None:
    """The scripts' command line: ``run --split val|test [--seed] [--max-queries]`` and ``report``."""
    ap = argparse.ArgumentParser(description=description)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--split", choices=("val", "test"), required=True)
    r.add_argument("--seed", type=int, default=0, help="the stream's query-order seed")
    r.add_argument("--max-queries", type=int, default=default_queries,
                   help="queries per row (a fixed seeded subset, world_data.subsample_rows; 0 = all 2,000)")
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.split, args.seed, args.max_queries or None)
    else:
        report()
