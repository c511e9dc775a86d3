"""REST's cheaper steps on val tuning streams: does a cheaper variant keep what the default REST gets?

The variants (options of ``qshift.methods.rest``, docs/methods.md): the default REST (the conflict tested
and projected in parameter space, both gradients at every inner step: two backward passes per step),
``projection_space=embeddings`` (tested and projected on the query embeddings' gradients: one backward
per step) and ``gen_refresh=batch`` (the general-knowledge gradient once per batch), with TCR as the
reference.  Their step cost is ``benchmarks/step_cost.py``'s.

The rule, written down before the runs it is applied to (issue 28, item 2):

1. **Streams** (val split only): online shift — ``world-clean/i2t``, ``world-c/i2t/gaussian_noise/5``,
   ``world-c/i2t/contrast/5``, ``world-c/t2i/keyboard/6``, 640 queries each; diverse shift —
   ``val-diverse/i2t``, built here (the ``world-diverse`` families are test-only; amended before any
   diverse run): the val images through 8 domains, other than mix8's, mixing corruptions and render
   domains, in an order drawn with seed 7, 192 queries per domain, with its clean R@1 after the stream.
   Seed 0, the protocol's defaults.
2. **Verdict**: a variant *keeps* the default's accuracy when its mean online R@1 over the four online
   streams is at least the default's − 0.3, its online R@1 on the diverse stream at least the default's
   − 0.3, and its clean-R@1 change after the diverse stream at least the default's − 1.0.  Of the variants
   that keep it, the cheapest (step_cost's median) is the candidate default.
3. **What follows**: a candidate becomes REST's default only together with the test grids of issue 28
   item 4 rerun on it; until then the default is unchanged and this file's verdict is what is reported.

    python benchmarks/tune_rest_cost.py run       # resumable: one result JSON per run under --out
    python benchmarks/tune_rest_cost.py cost      # step_cost.py's interleaved timing of the variants → cost.json
    python benchmarks/tune_rest_cost.py report    # writes --out/README.md from the run files and cost.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qshift.atomic import write_text_atomic
from qshift.bench import world_data
from qshift.bench.backbone import world_identity
from qshift.bench.registry import build_benchmark
from qshift.data import streams, world
from qshift.data.task import RetrievalTask, query_modality
from qshift.engine import RunConfig, environment, run_online
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.options import Protocol
from qshift.retrieval.encode import encode_batched

ONLINE = ["world-clean/i2t", "world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5", "world-c/t2i/keyboard/6"]
DIVERSE = "val-diverse/i2t"
#: the val diverse stream's domains (none of mix8's corruptions), streamed in a seed-7 order
VAL_DIVERSE = ("contrast-5", "sketch", "fog-5", "clutter", "shot_noise-5", "lowlight", "pixelate-5", "outline")
QUERIES = {**{b: 640 for b in ONLINE}, DIVERSE: 1536}
VARIANTS = {"tcr": ("tcr", {}), "rest": ("rest", {}),
            "rest[projection_space=embeddings]": ("rest", {"projection_space": "embeddings"}),
            "rest[gen_refresh=batch]": ("rest", {"gen_refresh": "batch"})}
TOLERANCE = {"online": 0.3, "diverse": 0.3, "clean_delta": 1.0}
OUT = Path(__file__).resolve().parents[1] / "results" / "rest-cost"


def _file(out: Path, label: str, bench: str) -> Path:
    return out / "runs" / f"{bench.replace('/', '__')}__{label}.json"


def val_diverse_task(per_domain: int) -> RetrievalTask:
    """A sequential i2t stream over the val split's images through ``VAL_DIVERSE``."""
    split = world.load_split("val")
    rows = world_data.subsample_rows(len(split), per_domain)
    sets = []
    for dom in VAL_DIVERSE:
        if dom in world.DOMAINS:
            q = world_data.domain_images(split, dom, rows=rows)
        else:
            c, sev = dom.rsplit("-", 1)
            q = world_data.corrupted_images(split, c, int(sev), 0, rows=rows)
        sets.append(streams.QuerySet(dom, q, rows))
    order = [int(i) for i in np.random.default_rng(7).permutation(len(sets))]
    clean = streams.QuerySet("clean", world_data.domain_images(split, "source"), np.arange(len(split)))
    return RetrievalTask(DIVERSE, "i2t", sets, split.captions, np.asarray(split.caption_image), "sequential",
                         order, clean_queries=clean)


def run(out: Path) -> None:
    encoder = load_world_model()
    for bench in [*ONLINE, DIVERSE]:
        task = None
        for label, (method, options) in VARIANTS.items():
            path = _file(out, label, bench)
            if path.exists():
                continue
            if task is None:
                task = (val_diverse_task(QUERIES[bench] // len(VAL_DIVERSE)) if bench == DIVERSE
                        else build_benchmark(bench, split="val", max_queries=QUERIES[bench]))
            model = WorldRetrievalModel(encoder, query_modality(task.direction))
            t0 = time.perf_counter()
            res = run_online(model, task, RunConfig(method, Protocol(), 0, options), progress=False)
            res.model = world_identity()
            res.batches = []  # per-batch records are not needed here (the tables read the metrics)
            record = {"label": label, "benchmark": bench, "split": "val", **res.as_json(),
                      "wall_seconds": time.perf_counter() - t0}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(record, indent=1))
            print(f"{bench:<32} {label:<36} R@1 {res.metrics['R@1']:.1f}", flush=True)


def cost(out: Path, repeats: int = 7) -> None:
    """Seconds per batch of the variants, interleaved in one process (benchmarks/step_cost.py)."""
    spec = importlib.util.spec_from_file_location("step_cost", Path(__file__).with_name("step_cost.py"))
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    test = world.load_split("test")
    model = WorldRetrievalModel(load_world_model(), "image")
    gallery = encode_batched(model.encode_gallery, test.captions)
    labels = ["source", *VARIANTS]
    t = step_cost.time_methods(model, gallery, torch.as_tensor(test.caption_image), test.images(list(range(64))),
                               labels, repeats)
    step_cost.print_table(t)
    write_text_atomic(out / "cost.json", json.dumps({"seconds": {k: {"min": v[0], "median": v[1]} for k, v in t.items()},
                                                     "repeats": repeats, "batch": 64, "environment": environment()},
                                                    indent=1))


def report(out: Path) -> None:
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        runs[(r["benchmark"], r["label"])] = r
    if not runs:
        raise SystemExit(f"no runs under {out / 'runs'}: run `python benchmarks/tune_rest_cost.py run` first")
    lines = ["# REST's cheaper steps on val tuning streams", "",
             "Generated by `python benchmarks/tune_rest_cost.py report` from the run files in `runs/`; the rule is "
             "in that script's docstring, written before the runs.  Val split, seed 0, protocol defaults.", "",
             "| variant | " + " | ".join(ONLINE) + " | online mean | diverse online | diverse Δclean |",
             "| --- |" + " ---: |" * (len(ONLINE) + 3)]
    summary = {}
    for label in VARIANTS:
        cells = [runs.get((b, label)) for b in [*ONLINE, DIVERSE]]
        if any(c is None for c in cells):
            continue
        online = [c["metrics"]["R@1"] for c in cells[:-1]]
        div = cells[-1]
        summary[label] = {"online": sum(online) / len(online), "diverse": div["metrics"]["R@1"],
                          "clean_delta": div["forgetting"]["clean_delta_R@1"]}
        s = summary[label]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in online)
                     + f" | {s['online']:.2f} | {s['diverse']:.1f} | {s['clean_delta']:+.1f} |")
    lines += [""]
    if "rest" in summary:
        base = summary["rest"]
        for label, s in summary.items():
            if not label.startswith("rest["):
                continue
            keeps = all(s[k] >= base[k] - TOLERANCE[k] for k in TOLERANCE)
            lines.append(f"- `{label}`: online {s['online'] - base['online']:+.2f}, diverse "
                         f"{s['diverse'] - base['diverse']:+.2f}, Δclean {s['clean_delta'] - base['clean_delta']:+.2f} "
                         f"against the default → {'keeps' if keeps else 'does not keep'} the default's accuracy "
                         f"(tolerances {TOLERANCE}).")
    cost_file = out / "cost.json"
    if cost_file.exists():
        c = json.loads(cost_file.read_text())["seconds"]
        lines += ["", "Step cost (`python benchmarks/tune_rest_cost.py cost`: the world model, i2t, B = 64, test "
                  "images, the 10,000-caption gallery, interleaved repeats in one process):", "",
                  "| variant | min s | median s | / TCR (min) | / TCR (median) |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, v in c.items():
            lines.append(f"| {label} | {v['min']:.3f} | {v['median']:.3f} | {v['min'] / c['tcr']['min']:.2f} | "
                         f"{v['median'] / c['tcr']['median']:.2f} |")
        if "rest" in summary:
            base = summary["rest"]
            keep = [k for k, s in summary.items() if k.startswith("rest[")
                    and all(s[m] >= base[m] - TOLERANCE[m] for m in TOLERANCE) and k in c]
            if keep:
                best = min(keep, key=lambda k: c[k]["median"])
                lines += ["", f"The rule's candidate default: `{best}` (the cheapest variant that keeps the default's "
                          "accuracy).  It becomes REST's default only with issue 28's test grids rerun on it; until "
                          "then REST's default is unchanged."]
    any_run = next(iter(runs.values()))
    env = any_run["environment"]
    wall = sum(r["wall_seconds"] for r in runs.values())
    lines += ["", f"Hardware: {env['processor']}, {env['cpu_count']} CPUs; torch {env['torch']}, qshift {env['qshift']}; "
              f"world model sha256 {any_run['model']['weights_sha256'][:12]}…; wall time of all runs {wall / 60:.1f} min.",
              ""]
    write_text_atomic(out / "README.md", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("run", "cost", "report"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    {"run": run, "cost": cost, "report": report}[args.step](args.out)


if __name__ == "__main__":
    sys.exit(main())
