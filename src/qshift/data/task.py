"""The task type: what a benchmark resolves to — query sets (one per domain), a frozen gallery, how to
stream it — and the directions of each retrieval task."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qshift.data import streams

#: each direction's (query modality, gallery modality); the image–text task's two directions
DIRECTIONS: dict[str, tuple[str, str]] = {"i2t": ("image", "text"), "t2i": ("text", "image")}


def query_modality(direction: str) -> str:
    """The modality of the queries of ``direction`` (``ValueError`` for an unknown direction)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    return DIRECTIONS[direction][0]


@dataclass
class RetrievalTask:
    """What a benchmark resolves to: query sets (one per domain), a frozen gallery, how to stream."""

    name: str
    direction: str
    query_sets: list[streams.QuerySet]
    gallery: Any
    gallery_ids: np.ndarray
    stream_kind: str = "single"  # single | mixed-interleaved | mixed-segments | sequential
    domain_order: list[int] | None = None
    clean_queries: streams.QuerySet | None = None
    meta: dict = field(default_factory=dict)

    @property
    def query_modality(self) -> str:
        return query_modality(self.direction)

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
