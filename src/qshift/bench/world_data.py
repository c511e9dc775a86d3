"""Shifted query sets of the embedded world, built in parallel and cached on disk."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from qshift.bench.cache import cached_array, cached_texts
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


def _render_chunk(args):
    scenes, domain = args
    return np.stack([world.render_scene(s, domain=domain) for s in scenes])


def domain_images(split: world.WorldSplit, domain: str = "source", workers: int | None = None,
                  progress: bool = False) -> np.ndarray:
    """The split's images rendered in ``domain`` (uint8 [N, H, W, 3]); cached."""
    if domain not in world.DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {world.DOMAINS}")

    def make() -> np.ndarray:
        chunks = [(split.scenes[s:s + 250], domain) for s in range(0, len(split), 250)]
        return _parallel(_render_chunk, chunks, workers, f"rendering {domain}", progress)

    return cached_array({"kind": "render", "domain": domain, **_split_spec(split)}, make)


def _corrupt_chunk(args):
    images, ids, corruption, severity, seed = args
    return image_shifts.corrupt_batch(images, corruption, severity, ids, seed)


def corrupted_images(split: world.WorldSplit, corruption: str, severity: int, seed: int = 0,
                     workers: int | None = None, progress: bool = False) -> np.ndarray:
    """The split's source images under ``corruption`` at ``severity``; item ``i`` seeded by image index ``i``."""
    if corruption not in image_shifts.available_corruptions():
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(image_shifts.available_corruptions())}")
    clean = domain_images(split, "source", workers)

    def make() -> np.ndarray:
        chunks = [(clean[s:s + 100], range(s, min(s + 100, len(clean))), corruption, severity, seed)
                  for s in range(0, len(clean), 100)]
        return _parallel(_corrupt_chunk, chunks, workers, f"{corruption}/{severity}", progress)

    spec = {"kind": "corrupt", "corruption": corruption, "severity": severity, "shift_seed": seed,
            "library": image_shifts.library_version(), **_split_spec(split)}
    return cached_array(spec, make)


def perturbed_captions(split: world.WorldSplit, perturbation: str, level: int, seed: int = 0) -> list[str]:
    """Every caption of the split under ``perturbation`` at ``level``; caption ``k`` seeded by ``k``."""
    if perturbation not in text_shifts.TEXT_PERTURBATIONS:
        raise ValueError(f"unknown text perturbation {perturbation!r}; known: {text_shifts.TEXT_PERTURBATIONS}")

    def make() -> list[str]:
        return text_shifts.perturb_texts(split.captions, perturbation, level, range(len(split.captions)), seed)

    from importlib import metadata
    spec = {"kind": "perturb", "perturbation": perturbation, "level": level, "shift_seed": seed,
            "nlpaug": metadata.version("nlpaug"), **_split_spec(split)}
    return cached_texts(spec, make)


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
