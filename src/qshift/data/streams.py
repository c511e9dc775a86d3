"""Query streams: single-domain, mixed (multi-distribution) and sequential (diverse shift).

A stream is a deterministic order over one or more *query sets* (each one domain: its items, their
relevance ids and a domain label), cut into batches of ``batch_size`` with a partial last batch.
Every query keeps its domain label and its position in its set.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class QuerySet:
    """Queries of one domain: ``items`` (uint8 image array [N, H, W, 3] or list of str) and their ids."""

    domain: str
    items: Any
    ids: np.ndarray  # relevance id of each query (int64 [N])

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if len(self.items) != len(self.ids):
            raise ValueError(f"query set {self.domain!r}: {len(self.items)} items but {len(self.ids)} ids")
        if len(self.ids) == 0:
            raise ValueError(f"query set {self.domain!r} is empty")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> Any:
        if isinstance(self.items, np.ndarray):
            return self.items[rows]
        return [self.items[int(r)] for r in rows]

    def subset(self, n: int, seed: int = 0) -> "QuerySet":
        """A deterministic random subset of ``n`` queries (all of them when ``n >= len``), in order."""
        if n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return QuerySet(self.domain, self.take(rows), self.ids[rows])


@dataclass
class QueryBatch:
    """One batch: the query items, their relevance ids, domain labels and (set, row) origins."""

    index: int
    items: Any
    ids: np.ndarray
    domains: list[str]
    set_index: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class Stream:
    """A fixed, seeded order of queries over ``sets``, iterated in batches."""

    def __init__(self, sets: Sequence[QuerySet], order: np.ndarray, batch_size: int, kind: str,
                 boundaries: Sequence[int] = ()) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sets = list(sets)
        self.order = np.asarray(order, dtype=np.int64).reshape(-1, 2)  # (set index, row)
        self.batch_size = batch_size
        self.kind = kind
        # batches never straddle these positions (domain boundaries of a sequential stream)
        cuts = sorted({0, len(self.order), *[int(b) for b in boundaries]})
        self._spans = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            self._spans.extend((s, min(s + batch_size, b)) for s in range(a, b, batch_size))

    def __len__(self) -> int:
        return len(self._spans)

    @property
    def n_queries(self) -> int:
        return len(self.order)

    def domains(self) -> list[str]:
        return [self.sets[int(s)].domain for s, _ in self.order]

    def __iter__(self) -> Iterator[QueryBatch]:
        for k, (a, b) in enumerate(self._spans):
            part = self.order[a:b]
            sets = part[:, 0]
            rows = part[:, 1]
            if all(isinstance(qs.items, np.ndarray) for qs in self.sets):
                items = np.stack([self.sets[int(s)].items[int(r)] for s, r in part]) if len(np.unique(sets)) > 1 \
                    else self.sets[int(sets[0])].items[rows]
            else:
                items = [self.sets[int(s)].items[int(r)] for s, r in part]
            ids = np.array([self.sets[int(s)].ids[int(r)] for s, r in part], dtype=np.int64)
            doms = [self.sets[int(s)].domain for s in sets]
            yield QueryBatch(index=k, items=items, ids=ids, domains=doms, set_index=sets.copy(), rows=rows.copy())


def _perm(n: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    return rng.permutation(n) if shuffle else np.arange(n)


def single_stream(qs: QuerySet, batch_size: int = 64, seed: int = 0, shuffle: bool = True) -> Stream:
    """One domain, in a random order from ``seed`` (``shuffle=False`` keeps the set's order)."""
    rng = np.random.default_rng(seed)
    rows = _perm(len(qs), rng, shuffle)
    return Stream([qs], np.stack([np.zeros_like(rows), rows], 1), batch_size, kind="single")


def mixed_stream(sets: Sequence[QuerySet], batch_size: int = 64, seed: int = 0, mode: str = "interleaved",
                 segment: int = 256) -> Stream:
    """Multi-distribution shift: every query of every set, ``interleaved`` at random or in random
    contiguous ``segments`` of ``segment`` queries."""
    if not sets:
        raise ValueError("a mixed stream needs at least one query set")
    rng = np.random.default_rng(seed)
    pairs = [np.stack([np.full(len(qs), i), _perm(len(qs), rng, True)], 1) for i, qs in enumerate(sets)]
    if mode == "interleaved":
        allp = np.concatenate(pairs)
        order = allp[rng.permutation(len(allp))]
    elif mode == "segments":
        if segment <= 0:
            raise ValueError(f"segment must be positive, got {segment}")
        chunks = [p[s:s + segment] for p in pairs for s in range(0, len(p), segment)]
        order = np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])
    else:
        raise ValueError(f"unknown mixed-stream mode {mode!r}; expected 'interleaved' or 'segments'")
    return Stream(sets, order, batch_size, kind=f"mixed-{mode}")


def sequential_stream(sets: Sequence[QuerySet], batch_size: int = 64, seed: int = 0,
                      domain_order: Sequence[int] | None = None) -> Stream:
    """Diverse shift: domain D1's queries, then D2's, …; each domain shuffled by ``seed``.

    Batches never mix two domains (each domain ends with its own partial batch, if any).
    """
    if not sets:
        raise ValueError("a sequential stream needs at least one query set")
    idx = list(range(len(sets))) if domain_order is None else [int(i) for i in domain_order]
    if sorted(idx) != list(range(len(sets))):
        raise ValueError(f"domain_order must be a permutation of 0..{len(sets) - 1}, got {list(idx)}")
    rng = np.random.default_rng(seed)
    parts, bounds, pos = [], [], 0
    for i in idx:
        rows = _perm(len(sets[i]), rng, True)
        parts.append(np.stack([np.full(len(rows), i), rows], 1))
        pos += len(rows)
        bounds.append(pos)
    return Stream(sets, np.concatenate(parts), batch_size, kind="sequential", boundaries=bounds)
