"""Source-model evaluation on the embedded world (``qshift eval``)."""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from qshift.data import world
from qshift.engine import batch_ranks
from qshift.data.task import check_served, directions_of, task_of
from qshift.models.world_model import WorldDualEncoder, WorldRetrievalModel
from qshift.retrieval.encode import encode_batched
from qshift.retrieval.metrics import retrieval_metrics, summarise

DIRECTIONS = directions_of("image-text")
REPORTED = ("R@1", "R@5", "R@10", "mAP")


@dataclass
class EvalRow:
    """One (benchmark, direction) result; ``as_json`` is the CLI's JSON-lines contract."""

    benchmark: str
    direction: str
    metrics: dict[str, float]
    n_queries: int
    n_gallery: int

    def as_json(self) -> dict:
        names = dict.fromkeys(REPORTED + task_of(self.direction).metrics)
        return {"benchmark": self.benchmark, "direction": self.direction,
                "metrics": {k: round(self.metrics[k], 4) for k in names if k in self.metrics},
                "n_queries": self.n_queries, "n_gallery": self.n_gallery}


def evaluate_world_split(model: WorldDualEncoder, split: world.WorldSplit, directions: tuple[str, ...] = DIRECTIONS,
                         benchmark: str | None = None, batch_size: int = 256, progress: bool = False) -> list[EvalRow]:
    """Clean retrieval metrics of ``model`` on ``split`` for each direction."""
    dirs = [check_served(d, ("image-text",), "the embedded world") for d in directions]
    model.eval()
    images = split.images()
    zi = encode_batched(model.encode_image, images, batch_size, desc="images", progress=progress)
    zt = encode_batched(model.encode_text, split.captions, batch_size, desc="captions", progress=progress)
    image_ids = torch.arange(len(images))
    caption_ids = torch.as_tensor(split.caption_image)
    name = benchmark or f"world/{split.name}"
    side = {"image": (zi, image_ids), "text": (zt, caption_ids)}  # each modality's embeddings and ids
    rows = []
    for d in dirs:
        (zq, q_ids), (zg, g_ids) = side[d.query], side[d.gallery]
        m = retrieval_metrics(zq @ zg.T, q_ids, g_ids)
        rows.append(EvalRow(name, d.name, m, len(q_ids), len(g_ids)))
    return rows


# model → {(gallery modality, content hash): embeddings}; weak keys, so a freed model's entries go too
_GALLERY_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def items_fingerprint(items) -> str:
    """SHA-256 of a gallery's content (an image array's shape and bytes, or its strings)."""
    own = getattr(items, "fingerprint", None)  # lazily decoded image sets name their content themselves
    if isinstance(own, str):
        return own
    h = hashlib.sha256()
    if isinstance(items, np.ndarray):
        h.update(str(items.shape).encode())
        h.update(items.tobytes())
    else:
        for x in items:
            h.update(x.encode())
            h.update(b"\0")
    return h.hexdigest()


def _metrics(task, scores: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """``retrieval_metrics``, or — for a task with a :class:`~qshift.data.task.QueryRelevance` (CIRR's
    excluded reference and groups) — the engine's ranks with those rules and the task's metrics."""
    gallery_ids = torch.as_tensor(task.gallery_ids)
    if task.relevance is None:
        return retrieval_metrics(scores, ids, gallery_ids, metrics=task_of(task.direction).metrics)
    ranks, aps, sub = batch_ranks(SimpleNamespace(last_cols=None), scores, ids, gallery_ids, task.relevance)
    return summarise(ranks, aps, metrics=task_of(task.direction).metrics, subset_ranks=sub)


def evaluate_task(model, task, batch_size: int = 256, progress: bool = False) -> tuple[EvalRow, dict]:
    """Offline (no adaptation) metrics of ``model`` on a registry task, overall and per domain.

    ``model`` is a ``WorldDualEncoder`` (wrapped for the task's direction) or any RetrievalModel whose
    query modality matches the task.  World-model gallery embeddings are memoised per (model, gallery
    content), so a sweep over benchmarks that share a gallery encodes it once; the model must not
    change between calls (no adaptation here).
    """
    if isinstance(model, WorldDualEncoder):
        model.eval()
        rm = WorldRetrievalModel(model, query_modality=task.query_modality)
        per_model = _GALLERY_CACHE.setdefault(model, {})
        key = (rm.gallery_modality, items_fingerprint(task.gallery))
    else:
        rm = model
        if rm.query_modality != task.query_modality:
            raise ValueError(f"{task.name} has {task.query_modality} queries; the model encodes {rm.query_modality}")
        per_model, key = {}, ("gallery",)
    if key not in per_model:
        if len(per_model) >= 8:
            per_model.clear()
        per_model[key] = encode_batched(rm.encode_gallery, task.gallery, batch_size, desc="gallery",
                                        progress=progress)
    zg = per_model[key]
    per_domain: dict[str, dict[str, float]] = {}
    all_scores, all_ids = [], []
    for qs in task.query_sets:
        with torch.no_grad():
            zq = encode_batched(rm.encode_query, qs.items, batch_size, desc=qs.domain, progress=progress)
        scores = (zq @ zg.T).cpu()
        ids = torch.as_tensor(qs.ids)
        if len(task.query_sets) > 1:
            per_domain[qs.domain] = _metrics(task, scores, ids)
        all_scores.append(scores)
        all_ids.append(ids)
    m = _metrics(task, torch.cat(all_scores), torch.cat(all_ids))
    return EvalRow(task.name, task.direction, m, task.n_queries, len(task.gallery_ids)), per_domain
