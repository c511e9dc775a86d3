"""Benchmark validity: can LayerNorm-only adaptation recover recall when it is given the labels?

    python benchmarks/oracle_validity.py [--severity 5] [--corruptions a,b,...] [--weights FILE.pt]
        [--temperature 0.01] [--negatives gallery|batch] [--after-stream] [--lr 1e-3] [--split test|val]
        [--out results/oracle_validity.json]

Runs `source` and the supervised `oracle` (docs/method.md §6; it uses labels, so it is an upper bound,
never a competitor) online over each image corruption (i2t, 2,000-image test set) and prints online
R@1 and the mean gain.  The methods issue asks for a mean gain of at least +10 points at severity 5.
It also records how far the oracle moved the LayerNorm parameters over the stream (max and mean
|Δθ|): AdamW moves a parameter by about the learning rate per step at most, so the protocol's budget
is ≈ steps × batches × lr, and a shift that needs more cannot be undone under it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qshift.atomic import write_text_atomic
from qshift.bench.grid import model_identity
from qshift.bench.registry import build_benchmark
from qshift.engine import RunConfig, environment, run_online
from qshift.options import Protocol
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.retrieval.encode import encode_batched
from qshift.retrieval.metrics import per_query_ranks_and_ap, summarise
from qshift.shifts.image import CORRUPTIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, default=None, help="a candidate model (default: the shipped one)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="the oracle's gallery-softmax temperature (default: the method's, 0.01 as docs/method.md §6)")
    ap.add_argument("--lr", type=float, default=None,
                    help="the learning rate of both runs (default: the protocol's, the world model's 1e-3; docs/method.md §2's "
                         "CLIP rate 3e-4 shows how much the step budget limits)")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="the world split the corrupted queries and the gallery come from (val: 1,000 images held "
                         "out from every reported number, to check a setting chosen on test)")
    ap.add_argument("--negatives", choices=("gallery", "batch"), default=None,
                    help="the oracle's InfoNCE negatives: the whole gallery (default) or the batch's true items")
    ap.add_argument("--after-stream", action="store_true",
                    help="also re-score every query with the oracle's model as it is after the stream (no further "
                         "adaptation): how far the budget got, against the online mean along the way")
    ap.add_argument("--out", type=Path, default=Path("results/oracle_validity.json"))
    args = ap.parse_args()
    t0 = time.time()
    rows = {}
    print(f"{'corruption':<18} {'source':>7} {'oracle':>7} {'gain':>6}   oracle's parameter change", flush=True)
    for c in args.corruptions.split(","):
        task = build_benchmark(f"world-c/i2t/{c}/{args.severity}", progress=False, split=args.split)
        r = {}
        for method in ("source", "oracle"):
            model = WorldRetrievalModel(load_world_model(args.weights), "image")
            before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
            opts = {k: v for k, v in (("temperature", args.temperature), ("negatives", args.negatives))
                    if method == "oracle" and v is not None}
            cfg = RunConfig(method=method, protocol=Protocol(lr=args.lr), seed=args.seed, method_options=opts)
            r[method] = run_online(model, task, cfg, progress=False, keep_adapted=True).metrics["R@1"]
        if args.after_stream:
            r["oracle_after_stream"] = after_stream_r1(model, task)
        moved = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.encoder.named_parameters()
                           if not torch.equal(p.detach(), before[n])])
        r["oracle_max_abs_dtheta"] = float(moved.max()) if moved.numel() else 0.0
        r["oracle_mean_abs_dtheta"] = float(moved.mean()) if moved.numel() else 0.0
        rows[c] = r
        save(args, rows, t0, complete=False)
        after = f"   after the stream {r['oracle_after_stream']:.1f}" if args.after_stream else ""
        print(f"{c:<18} {r['source']:>7.1f} {r['oracle']:>7.1f} {r['oracle'] - r['source']:>+6.1f}"
              f"   |Δθ| max {r['oracle_max_abs_dtheta']:.3f} mean {r['oracle_mean_abs_dtheta']:.3f}{after}", flush=True)
    gain = save(args, rows, t0, complete=True)
    print(f"mean gain of oracle over source: {gain:+.1f} R@1 points ({len(rows)} corruptions, "
          f"severity {args.severity}, {time.time() - t0:.0f}s)")


def save(args, rows: dict, t0: float, complete: bool) -> float:
    """Write the results so far (atomically; ``complete`` false while corruptions remain, so a run
    stopped early keeps what it measured) and return the mean gain over them."""
    gain = sum(r["oracle"] - r["source"] for r in rows.values()) / len(rows)
    write_text_atomic(args.out, json.dumps({
        "severity": args.severity, "seed": args.seed, "R@1": rows, "mean_gain": gain, "complete": complete,
        "corruptions_asked": args.corruptions.split(","), "oracle_temperature": args.temperature,
        "oracle_negatives": args.negatives, "lr": args.lr or WorldRetrievalModel.default_lr, "split": args.split,
        "weights": str(args.weights or "shipped"),
        "model": model_identity(args.weights), "environment": environment(),
        "seconds": round(time.time() - t0, 1)}, indent=1))
    return gain


@torch.no_grad()
def after_stream_r1(model: WorldRetrievalModel, task) -> float:
    """R@1 of the task's queries (all domains) re-scored by ``model`` as it is now, without adapting."""
    gallery = encode_batched(model.encode_gallery, task.gallery, 256, progress=False)
    gallery_ids = torch.as_tensor(task.gallery_ids)
    ranks, aps = [], []
    for qs in task.query_sets:
        z = encode_batched(model.encode_query, qs.items, 256, progress=False)
        r, a = per_query_ranks_and_ap((z @ gallery.T).cpu(), torch.as_tensor(qs.ids), gallery_ids)
        ranks.append(r)
        aps.append(a)
    return summarise(torch.cat(ranks), torch.cat(aps))["R@1"]


if __name__ == "__main__":
    main()
