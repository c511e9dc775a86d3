"""How much of a shift can be undone at all, and by which parameters? (offline, with labels)

    python benchmarks/adaptation_ceiling.py [--benchmarks world-c/i2t/gaussian_noise/5,...]
        [--groups ln,ln+stem,all] [--epochs 4] [--out results/adaptation_ceiling.json]

For each benchmark the query set is split in two halves (seeded): the source model is fine-tuned
*with labels* (the oracle's InfoNCE against the frozen gallery) on one half, for several epochs, with
only the named parameter group trainable, and scored on the other half.  ``ln`` is the query tower's
LayerNorm affine parameters (what every TTA method here adapts); ``ln+stem`` adds the image stem;
``all`` is the whole query tower.  The gap between ``ln`` and ``all`` says whether LayerNorm-only
adaptation lacks capacity; the gap between ``all`` and clean says how much information the shift
destroyed.  This is a diagnostic of the benchmark, not a method: it trains and tests on disjoint
halves of the same shifted set, with labels.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qshift.bench.registry import build_benchmark
from qshift.engine import environment
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.retrieval.encode import encode_batched
from qshift.retrieval.metrics import retrieval_metrics


def trainable(model: WorldRetrievalModel, group: str) -> list[torch.nn.Parameter]:
    tower = model.query_tower()
    ln = [p for _, p in model.adaptable_parameters()]
    if group == "ln":
        return ln
    if group == "ln+stem":
        stem = list(getattr(tower, "stem").parameters()) if hasattr(tower, "stem") else []
        if not stem:
            raise ValueError("ln+stem needs an image query tower with a stem")
        return ln + stem
    if group == "all":
        return list(tower.parameters())
    raise ValueError(f"unknown parameter group {group!r} (ln, ln+stem, all)")


def score(model, items, ids, gallery_emb, gallery_ids) -> float:
    with torch.no_grad():
        q = F.normalize(encode_batched(model.encode_query, items, 256), dim=-1)
    return retrieval_metrics(q @ gallery_emb.T, torch.as_tensor(ids), torch.as_tensor(gallery_ids))["R@1"]


def fit(model, items, ids, gallery_emb, gallery_ids, group: str, epochs: int, lr: float, seed: int,
        batch_size: int = 64, temperature: float = 0.01) -> None:
    params = trainable(model, group)
    for p in model.query_tower().parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = np.random.default_rng(seed)
    gids = torch.as_tensor(gallery_ids)
    for _ in range(epochs):
        order = g.permutation(len(ids))
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            z = F.normalize(model.encode_query(items[rows] if isinstance(items, np.ndarray)
                                               else [items[r] for r in rows]), dim=-1)
            logp = F.log_softmax(z @ gallery_emb.T / temperature, dim=1)
            pos = torch.as_tensor(ids[rows])[:, None] == gids[None, :]
            loss = -torch.logsumexp(logp.masked_fill(~pos, float("-inf")), dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", default="world-c/i2t/gaussian_noise/5,world-c/i2t/defocus_blur/5,"
                                            "world-c/i2t/contrast/5,world-c/i2t/jpeg_compression/5")
    ap.add_argument("--groups", default="ln,ln+stem,all")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", default="ln=3e-3,ln+stem=1e-3,all=3e-4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/adaptation_ceiling.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    lrs = dict(kv.split("=") for kv in args.lr.split(","))
    groups = args.groups.split(",")
    t0 = time.time()
    rows: dict[str, dict[str, float]] = {}
    print(f"{'benchmark':<36} {'source':>7} " + " ".join(f"{g:>8}" for g in groups), flush=True)
    for name in args.benchmarks.split(","):
        task = build_benchmark(name, progress=False)
        qs = task.query_sets[0]
        half = np.random.default_rng(args.seed).permutation(len(qs))
        tr, te = np.sort(half[: len(qs) // 2]), np.sort(half[len(qs) // 2:])
        base = WorldRetrievalModel(load_world_model(), task.query_modality)
        with torch.no_grad():
            gal = F.normalize(encode_batched(base.encode_gallery, task.gallery, 512), dim=-1)
        r = {"source": score(base, qs.take(te), qs.ids[te], gal, task.gallery_ids)}
        if task.clean_queries is not None:
            cq = task.clean_queries
            r["clean_source"] = score(base, cq.take(te), cq.ids[te], gal, task.gallery_ids)
        for grp in groups:
            model = WorldRetrievalModel(load_world_model(), task.query_modality)
            fit(model, qs.take(tr), qs.ids[tr], gal, task.gallery_ids, grp, args.epochs, float(lrs[grp]), args.seed)
            model.query_tower().eval()
            r[grp] = score(model, qs.take(te), qs.ids[te], gal, task.gallery_ids)
        rows[name] = r
        print(f"{name:<36} {r['source']:>7.1f} " + " ".join(f"{r[g]:>8.1f}" for g in groups)
              + (f"   (clean {r['clean_source']:.1f})" if "clean_source" in r else ""), flush=True)
    means = {k: float(np.mean([r[k] for r in rows.values()])) for k in ["source", *groups]}
    print("mean".ljust(36) + f" {means['source']:>7.1f} " + " ".join(f"{means[g]:>8.1f}" for g in groups))
    print(f"({time.time() - t0:.0f}s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"R@1": rows, "mean": means, "epochs": args.epochs, "lr": lrs, "seed": args.seed,
                               "environment": environment(), "seconds": round(time.time() - t0, 1)}, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
