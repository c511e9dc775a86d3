"""The retrieval tasks and their directions — the one table the rest of qshift reads instead of branching
on direction strings — and the task type a benchmark resolves to (query sets, a frozen gallery, how to
stream it).

:data:`TASKS` holds each :class:`Task` (its directions, relevance rule and reported metrics);
:data:`DIRECTIONS` maps each direction's name to its :class:`Direction` (query and gallery modality).
docs/method.md ("Tasks and directions") mirrors this table."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qshift.data import streams

#: the modalities a tower can encode; "image+text" is a composed query (reference image, modification text)
MODALITIES: tuple[str, ...] = ("image", "text", "video", "audio", "image+text")
#: relevance rules: "many" — a query may have several positives (5 captions per image); "one" — exactly one
RELEVANCE_RULES: tuple[str, ...] = ("many", "one")


@dataclass(frozen=True)
class Direction:
    """One retrieval direction: queries of modality ``query`` against a gallery of modality ``gallery``."""

    name: str
    task: str
    query: str
    gallery: str
    description: str


@dataclass(frozen=True)
class Task:
    """A retrieval task: its directions, its relevance rule (``"many"`` or ``"one"``) and the metric names
    it reports (``pending_metrics``: declared, but not yet computed by :mod:`qshift.retrieval.metrics`)."""

    name: str
    directions: tuple[Direction, ...]
    relevance: str
    metrics: tuple[str, ...]
    description: str
    pending_metrics: tuple[str, ...] = ()

    @property
    def direction_names(self) -> tuple[str, ...]:
        """The names of the task's directions, in table order."""
        return tuple(d.name for d in self.directions)


def _task(name: str, relevance: str, metrics: tuple[str, ...], description: str,
          directions: Iterable[tuple[str, str, str, str]], pending: tuple[str, ...] = ()) -> Task:
    dirs = tuple(Direction(n, name, q, g, text) for n, q, g, text in directions)
    for d in dirs:
        if d.query not in MODALITIES or d.gallery not in MODALITIES:
            raise ValueError(f"direction {d.name!r}: modalities must be among {', '.join(MODALITIES)}")
    if relevance not in RELEVANCE_RULES:
        raise ValueError(f"task {name!r}: relevance must be one of {', '.join(RELEVANCE_RULES)}")
    if not set(pending) <= set(metrics):
        raise ValueError(f"task {name!r}: pending metrics must be among its metrics")
    return Task(name, dirs, relevance, metrics, description, pending)


#: every retrieval task, by name (the order is the docs' order)
TASKS: dict[str, Task] = {t.name: t for t in (
    _task("image-text", "many", ("R@1", "R@5", "R@10", "mAP"),
          "images and their captions (COCO, Flickr30K, the embedded world); an image has several captions",
          [("i2t", "image", "text", "an image retrieves its captions"),
           ("t2i", "text", "image", "a caption retrieves its image")]),
    _task("video-audio", "one", ("R@1", "R@5", "R@10", "mAP", "MedR"),
          "video clips and their own audio tracks, one-to-one (CAV-MAE's retrieval evaluation)",
          [("v2a", "video", "audio", "a video clip retrieves its audio track"),
           ("a2v", "audio", "video", "an audio track retrieves its video clip")]),
    _task("composed", "one", ("R@1", "R@5", "R@10", "R@50", "R_s@1", "R_s@2", "R_s@3"),
          "composed image retrieval (CIRR, FashionIQ): a reference image and a modification text retrieve "
          "the target image",
          [("cir", "image+text", "image", "a (reference image, modification text) pair retrieves its target image")]),
)}

#: every direction of every task, by name
DIRECTIONS: dict[str, Direction] = {d.name: d for t in TASKS.values() for d in t.directions}
if len(DIRECTIONS) != sum(len(t.directions) for t in TASKS.values()):
    raise ValueError("a direction name is used by two tasks")


def get_direction(name: str) -> Direction:
    """The :class:`Direction` called ``name`` (``ValueError`` listing the known ones for an unknown name)."""
    if name not in DIRECTIONS:
        raise ValueError(f"unknown direction {name!r}; expected one of {', '.join(DIRECTIONS)}")
    return DIRECTIONS[name]


def query_modality(direction: str) -> str:
    """The modality of the queries of ``direction`` (``ValueError`` for an unknown direction)."""
    return get_direction(direction).query


def gallery_modality(direction: str) -> str:
    """The modality of the gallery of ``direction`` (``ValueError`` for an unknown direction)."""
    return get_direction(direction).gallery


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name`` (``ValueError`` listing the known ones for an unknown name)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(direction: str) -> Task:
    """The :class:`Task` that ``direction`` belongs to (``ValueError`` for an unknown direction)."""
    return TASKS[get_direction(direction).task]


def directions_of(task: str) -> tuple[str, ...]:
    """The direction names of ``task``, in table order (``ValueError`` for an unknown task)."""
    return get_task(task).direction_names


def reverse_of(direction: str) -> str | None:
    """The direction of the same task with query and gallery modalities swapped (``v2a`` → ``a2v``), or
    None when the task has none (``cir``)."""
    d = get_direction(direction)
    for other in TASKS[d.task].directions:
        if (other.query, other.gallery) == (d.gallery, d.query):
            return other.name
    return None


def check_served(direction: str, tasks: Iterable[str], server: str) -> Direction:
    """``direction``'s :class:`Direction` when it belongs to one of ``tasks`` (those ``server`` serves).

    Raises ``ValueError``: for a direction of another task, "direction 'v2a' belongs to the video-audio
    task, which <server> does not serve (it serves i2t, t2i)"; for an unknown name, the served directions
    and the other known ones."""
    served = [n for t in tasks for n in directions_of(t)]
    if direction not in DIRECTIONS:
        others = [n for n in DIRECTIONS if n not in served]
        rest = f" (directions of other tasks: {', '.join(others)})" if others else ""
        raise ValueError(f"unknown direction {direction!r}; {server} serves {', '.join(served)}{rest}")
    d = DIRECTIONS[direction]
    if d.name not in served:
        raise ValueError(f"direction {direction!r} belongs to the {d.task} task, which {server} does not serve "
                         f"(it serves {', '.join(served)})")
    return d


@dataclass(frozen=True)
class QueryRelevance:
    """What a query's id alone does not say about its ranking, indexed by query id: ``exclude`` [n_ids]
    (a gallery row removed from the query's ranking, -1 for none — CIRR's reference image),
    ``subsets`` [n_ids, S] (the gallery rows of the query's group, -1 padding — CIRR's subset recall) and
    ``positive`` [n_ids] (the gallery row of the query's single positive).

    Without ``positive`` a query is relevant to the gallery rows whose id equals its own (query ids live in
    the gallery's id space).  With it, query ids are free (e.g. the query's index: CIRR queries that share a
    target but not a reference) and a query's only relevant row is ``positive[id]``; every rule that decides
    relevance (the engine's ranks, subset ranks, forgetting probes, a supervised method's labels) reads it
    (:meth:`relevant_ids`)."""

    exclude: np.ndarray | None = None
    subsets: np.ndarray | None = None
    positive: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.exclude is not None and np.asarray(self.exclude).ndim != 1:
            raise ValueError("QueryRelevance.exclude must be one gallery row per query id")
        if self.subsets is not None and np.asarray(self.subsets).ndim != 2:
            raise ValueError("QueryRelevance.subsets must be [n_ids, S] gallery rows")
        if self.positive is not None:
            pos = np.asarray(self.positive)
            if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
                raise ValueError("QueryRelevance.positive must be one integer gallery row per query id")
            if len(pos) and int(pos.min()) < 0:
                raise ValueError("QueryRelevance.positive must name a gallery row (>= 0) for every query id")

    def relevant_ids(self, ids: Any, gallery_ids: Any) -> tuple[Any, Any]:
        """(query labels, gallery ids) such that ``labels[i] == gallery_ids[j]`` exactly when gallery row
        ``j`` is relevant to query ``ids[i]``: unchanged without ``positive``; with it, ``positive[ids]``
        and the gallery's row numbers.  Torch tensors in, torch tensors out (on their devices); else numpy."""
        if self.positive is None:
            return ids, gallery_ids
        import torch  # here: the rest of this module does not need torch

        positive = np.asarray(self.positive)
        if isinstance(ids, torch.Tensor):
            labels = torch.as_tensor(positive[ids.cpu().numpy()], dtype=torch.int64, device=ids.device)
        else:
            labels = positive[np.asarray(ids)].astype(np.int64)
        if isinstance(gallery_ids, torch.Tensor):
            rows = torch.arange(len(gallery_ids), device=gallery_ids.device)
        else:
            rows = np.arange(len(gallery_ids))
        n = len(gallery_ids)
        if len(labels) and int(labels.max()) >= n:
            raise ValueError(f"QueryRelevance.positive names gallery row {int(labels.max())}, beyond the gallery's {n}")
        return labels, rows


@dataclass
class RetrievalTask:
    """What a benchmark resolves to: query sets (one per domain), a frozen gallery, how to stream, and
    (``relevance``) rows a query's ranking excludes or its subset metrics read."""

    name: str
    direction: str
    query_sets: list[streams.QuerySet]
    gallery: Any
    gallery_ids: np.ndarray
    stream_kind: str = "single"  # single | mixed-interleaved | mixed-segments | sequential
    domain_order: list[int] | None = None
    clean_queries: streams.QuerySet | None = None
    meta: dict = field(default_factory=dict)
    relevance: QueryRelevance | None = None

    @property
    def query_modality(self) -> str:
        """The modality of the task's queries (from its direction)."""
        return query_modality(self.direction)

    @property
    def gallery_modality(self) -> str:
        """The modality of the task's gallery (from its direction)."""
        return gallery_modality(self.direction)

    @property
    def n_queries(self) -> int:
        return sum(len(q) for q in self.query_sets)

    def stream(self, batch_size: int = 64, seed: int = 0) -> streams.Stream:
        """The benchmark's query stream, deterministic for ``seed``."""
        if self.stream_kind == "single":
            if len(self.query_sets) != 1:
                raise ValueError(f"{self.name}: a single stream needs exactly one query set")
            return streams.single_stream(self.query_sets[0], batch_size, seed)
        if self.stream_kind.startswith("mixed-"):
            return streams.mixed_stream(self.query_sets, batch_size, seed, mode=self.stream_kind.split("-", 1)[1])
        if self.stream_kind == "sequential":
            return streams.sequential_stream(self.query_sets, batch_size, seed, self.domain_order)
        raise ValueError(f"unknown stream kind {self.stream_kind!r}")

    def subsample(self, max_queries: int, seed: int = 0) -> "RetrievalTask":
        """The same task with at most ``max_queries`` queries in all (split evenly over its query
        sets; the clean probe set gets the same budget); the gallery is unchanged."""
        if max_queries < len(self.query_sets):
            raise ValueError(f"{self.name}: max_queries={max_queries} is fewer than its {len(self.query_sets)} domains")
        per = max_queries // len(self.query_sets)
        sets = [q.subset(per, seed) for q in self.query_sets]
        clean = self.clean_queries.subset(max_queries, seed) if self.clean_queries is not None else None
        return replace(self, query_sets=sets, clean_queries=clean,
                       meta={**self.meta, "max_queries": max_queries})

    def all_queries(self) -> tuple[Any, np.ndarray]:
        """Every query of every set, concatenated (for offline evaluation of the source model)."""
        ids = np.concatenate([q.ids for q in self.query_sets])
        if all(isinstance(q.items, np.ndarray) for q in self.query_sets):
            return np.concatenate([q.items for q in self.query_sets]), ids
        return [x for q in self.query_sets for x in q.items], ids
