"""Shifted query sets of the embedded world, built in parallel and cached on disk.

Every builder takes ``rows=``: build (and cache) only the items a run consumes.  Item ``i`` depends on
(scene ``i``, shift, seed) alone, so a subset is bit-identical to those rows of the full set, and a cached
full set serves any subset of it (``test1k``'s sets are served from ``test``'s).  ``subsample_rows`` gives the
rows a ``max_queries`` subsample keeps.  Building the inputs of the demo grid (``grid.PRESETS["demo"]``,
max_queries 512) into an empty cache on 2 shared cores: 153 s and 1.8 GB as full sets (uncompressed
``.npy``, before rows), 135 s and 604 MB as compressed full sets, 49 s and 235 MB with rows (of which 25 s
is the full 2,000-image gallery of the t2i benchmark).
"""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from qshift.bench import cache
from qshift.bench.cache import norm_rows
from qshift.data import world
from qshift.shifts import image as image_shifts
from qshift.shifts import text as text_shifts

#: bump when the world's rendering or captions change, so cached sets are not reused
WORLD_VERSION = 1


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _split_spec(split: world.WorldSplit) -> dict:
    # the render size joins the key only when it is not the default, so that existing caches stay valid
    size = {"render_size": world.RENDER_SIZE} if world.RENDER_SIZE != world.IMAGE_SIZE else {}
    return {"world_version": WORLD_VERSION, **size, **world.world_variant(), "split": split.name, "world_seed": split.seed,
            "n_images": len(split)}


def subsample_rows(n: int, k: int | None, seed: int = 0) -> np.ndarray | None:
    """The rows ``streams.QuerySet.subset(k, seed)`` keeps of a set of ``n`` queries (sorted int64), or None
    when it keeps them all (``k`` None or ``k >= n``): pass them as ``rows=`` to build only those."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _rows_spec(rows: np.ndarray) -> dict:
    return {"rows": hashlib.sha256(rows.tobytes()).hexdigest()[:24], "n_rows": len(rows)}


def _parent(split: world.WorldSplit) -> world.WorldSplit | None:
    """A split whose first items are exactly ``split``'s (``test1k`` within ``test``), so that a set cached
    for the parent also serves ``split``: rendering, corruption and perturbation are per item, seeded by
    its index alone."""
    if split.name != "test1k":
        return None
    parent = world.load_split("test")
    if parent is split or len(parent) < len(split) or len(parent.captions) < len(split.captions):
        return None
    if not all(a is b or a == b for a, b in zip(split.scenes, parent.scenes)):
        return None
    if split.captions != parent.captions[:len(split.captions)]:
        return None
    return parent


def _cached_rows(shift_spec: dict, split: world.WorldSplit, n: int, rows, make) -> np.ndarray:
    """``make(rows)`` (rows: int64 indices, or None for all ``n`` items) through the cache.

    A subset is served, in order, from its own entry, from the full set's entry (its rows only), or from
    the parent split's full entry; otherwise it is built and cached under a key holding its rows."""
    rows = norm_rows(rows, n)
    spec = {**shift_spec, **_split_spec(split)}
    want = np.arange(n) if rows is None else rows
    if rows is not None:
        hit = cache.cache_load({**spec, **_rows_spec(rows)})
        if hit is not None:
            return hit
        hit = cache.cache_load(spec, rows)
        if hit is not None:
            return hit
    else:
        hit = cache.cache_load(spec)
        if hit is not None:
            return hit
    parent = _parent(split)
    if parent is not None:
        hit = cache.cache_load({**shift_spec, **_split_spec(parent)}, want)
        if hit is not None:
            return hit
    out = make(rows)
    cache.cache_store(spec if rows is None else {**spec, **_rows_spec(rows)}, out)
    return out


def _render_chunk(args):
    scenes, domain = args
    return np.stack([world.render_scene(s, domain=domain) for s in scenes])


def _chunks(n: int, size: int, workers: int | None) -> list[range]:
    """Index ranges of at most ``size`` items, at least one per worker when there are enough items."""
    workers = default_workers() if workers is None else workers
    size = max(1, min(size, -(-n // max(1, workers)), n))
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def domain_images(split: world.WorldSplit, domain: str = "source", workers: int | None = None,
                  progress: bool = False, rows=None) -> np.ndarray:
    """The split's images rendered in ``domain`` (uint8 [N, H, W, 3]); cached.

    ``rows`` (int indices, e.g. ``subsample_rows(...)``): only those images, in that order; image ``j`` of the
    result is bit-identical to image ``rows[j]`` of the full set."""
    if domain not in world.DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {world.DOMAINS}")

    def make(rows: np.ndarray | None) -> np.ndarray:
        idx = np.arange(len(split)) if rows is None else rows
        if len(idx) == 0:
            return np.zeros((0, world.RENDER_SIZE, world.RENDER_SIZE, 3), np.uint8)
        chunks = [([split.scenes[i] for i in idx[c]], domain) for c in _chunks(len(idx), 250, workers)]
        return _parallel(_render_chunk, chunks, workers, f"rendering {domain}", progress)

    return _cached_rows({"kind": "render", "domain": domain}, split, len(split), rows, make)


def _corrupt_chunk(args):
    images, ids, corruption, severity, seed = args
    return image_shifts.corrupt_batch(images, corruption, severity, ids, seed)


def corrupted_images(split: world.WorldSplit, corruption: str, severity: int, seed: int = 0,
                     workers: int | None = None, progress: bool = False, rows=None) -> np.ndarray:
    """The split's source images under ``corruption`` at ``severity``; item ``i`` seeded by image index ``i``.

    ``rows``: only those images (their clean renders alone are built), bit-identical to the full set's rows."""
    if corruption not in image_shifts.available_corruptions():
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(image_shifts.available_corruptions())}")

    def make(rows: np.ndarray | None) -> np.ndarray:
        clean = domain_images(split, "source", workers, rows=rows)
        idx = np.arange(len(split)) if rows is None else rows
        if len(idx) == 0:
            return clean
        chunks = [(clean[c], idx[c].tolist(), corruption, severity, seed) for c in _chunks(len(idx), 100, workers)]
        return _parallel(_corrupt_chunk, chunks, workers, f"{corruption}/{severity}", progress)

    shift = {"kind": "corrupt", "corruption": corruption, "severity": severity, "shift_seed": seed,
             "library": image_shifts.library_version()}
    return _cached_rows(shift, split, len(split), rows, make)


def perturbed_captions(split: world.WorldSplit, perturbation: str, level: int, seed: int = 0,
                       rows=None) -> list[str]:
    """Every caption of the split under ``perturbation`` at ``level``; caption ``k`` seeded by ``k``.

    ``rows`` (caption indices): only those captions, identical to the full list's ``rows``."""
    if perturbation not in text_shifts.ALL_TEXT_PERTURBATIONS:
        raise ValueError(f"unknown text perturbation {perturbation!r}; known: {text_shifts.ALL_TEXT_PERTURBATIONS}")

    def make(rows: np.ndarray | None) -> np.ndarray:
        idx = list(range(len(split.captions))) if rows is None else rows.tolist()
        texts = text_shifts.perturb_texts([split.captions[i] for i in idx], perturbation, level, idx, seed)
        return np.asarray(texts, dtype=np.str_) if texts else np.zeros(0, dtype="<U1")

    shift = {"kind": "perturb", "perturbation": perturbation, "level": level, "shift_seed": seed,
             "nlpaug": metadata.version("nlpaug")}
    return [str(x) for x in _cached_rows(shift, split, len(split.captions), rows, make).tolist()]


def style_captions(split: world.WorldSplit, style: str, seed: int = 0) -> list[str]:
    """One caption per image in a held-out ``style`` (never seen in training)."""
    if style not in world.HELD_OUT_FAMILIES:
        raise ValueError(f"unknown caption style {style!r}; known: {world.HELD_OUT_FAMILIES}")
    return [world.caption_scene(s, style, np.random.default_rng([seed, i, world.HELD_OUT_FAMILIES.index(style)]))
            for i, s in enumerate(split.scenes)]


def _parallel(fn, chunks, workers, desc, progress):
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(chunks) == 1:
        parts = [fn(c) for c in tqdm(chunks, desc=desc, disable=not progress, leave=False)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            parts = list(tqdm(ex.map(fn, chunks), total=len(chunks), desc=desc, disable=not progress, leave=False))
    return np.concatenate(parts)
