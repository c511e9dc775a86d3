"""Diagnostics of a query set against a gallery (docs/method.md §7) — the REST paper's observations.

For clean and shifted queries of the same items: query uniformity (mean ‖z − z̄‖), query–gallery gap
(‖z̄ − ḡ‖), query–gallery consistency (share of queries that are their nearest gallery item's nearest
query), mean top-1 similarity; and the angle between REST's g_spec and g_gen at the source model.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qshift.methods import create
from qshift.methods.rest import _angle
from qshift.retrieval.encode import encode_batched


@torch.no_grad()
def embedding_diagnostics(zq: torch.Tensor, zg: torch.Tensor) -> dict[str, float]:
    """Uniformity, gap, mutual-nearest-neighbour consistency and mean top-1 similarity."""
    if zq.ndim != 2 or zg.ndim != 2 or zq.shape[1] != zg.shape[1]:
        raise ValueError(f"expected [n, d] and [m, d] embeddings, got {tuple(zq.shape)} and {tuple(zg.shape)}")
    sims = zq @ zg.T
    nn_gallery = sims.argmax(1)
    nn_query = sims.argmax(0)
    mutual = nn_query[nn_gallery] == torch.arange(len(zq))
    return {
        "uniformity": float((zq - zq.mean(0)).norm(dim=1).mean()),
        "gap": float((zq.mean(0) - zg.mean(0)).norm()),
        "consistency": float(mutual.double().mean()),
        "top1_similarity": float(sims.max(1).values.mean()),
    }


def gradient_angle(model, gallery: torch.Tensor, gallery_ids, items, batch_size: int = 64, n_batches: int = 4,
                   **rest_options) -> dict[str, float]:
    """Mean angle (degrees) between REST's g_spec and g_gen at the source parameters, over a few batches."""
    method = create("rest", model, gallery, gallery_ids=gallery_ids, steps=1, **rest_options)
    angles = []
    for b in range(n_batches):
        chunk = items[b * batch_size:(b + 1) * batch_size]
        if len(chunk) == 0:
            break
        method.on_batch_start(chunk)
        z = model.encode_query(chunk)
        out = method.loss(z, z @ method.gallery.T, 0, None)
        spec, _, gen_dir = method._objectives(out)
        gs = torch.autograd.grad(spec, method.params, retain_graph=True, allow_unused=True)
        gg = torch.autograd.grad(gen_dir, method.params, allow_unused=True)
        flat = lambda gs_: torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)  # noqa: E731
                                      for p, g in zip(method.params, gs_)])
        a = _angle(flat(gs), flat(gg))
        if not math.isnan(a):
            angles.append(a)
        method.batches_seen += 1
    method.reset()
    return {"angle_deg": float(np.mean(angles)) if angles else float("nan"), "n_batches": len(angles)}


def diagnose_task(model, task, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Diagnostics for the task's clean queries and for each shifted query set (same items)."""
    zg = encode_batched(model.encode_gallery, task.gallery, batch_size)
    gids = torch.as_tensor(task.gallery_ids)
    out = {}
    sets = ([task.clean_queries] if task.clean_queries is not None else []) + list(task.query_sets)
    for qs in sets:
        with torch.no_grad():
            zq = encode_batched(model.encode_query, qs.items, batch_size)
        d = embedding_diagnostics(zq, zg)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(qs))
        items = qs.items[order] if isinstance(qs.items, np.ndarray) else [qs.items[int(i)] for i in order]
        d.update(gradient_angle(model, zg, gids, items))
        out[qs.domain] = d
    return out
