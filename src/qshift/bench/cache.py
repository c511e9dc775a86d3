"""On-disk cache for shifted query sets, so a grid of methods corrupts each set once.

Entries are keyed by everything that determines their content (world seed and split, shift name,
severity / level, shift seed, library version) and written atomically.  The folder is
``$QSHIFT_CACHE`` or ``~/.cache/qshift``; ``QSHIFT_CACHE=off`` disables caching.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qshift.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    env = os.environ.get("QSHIFT_CACHE")
    if env and env.lower() in ("off", "0", "none", "false"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "qshift"


def cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def cached_array(spec: dict[str, Any], make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()`` once per ``spec``; later calls load the saved array."""
    root = cache_dir()
    if root is None:
        return make()
    path = root / f"{spec.get('kind', 'item')}-{cache_key(spec)}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("unreadable cache entry %s (%s); recomputing", path, e)
    out = make()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out, allow_pickle=False)
        write_text_atomic(path.with_suffix(".json"), json.dumps(spec, sort_keys=True, indent=1))
    except OSError as e:
        log.warning("could not write cache entry %s: %s", path, e)
    return out


def cached_texts(spec: dict[str, Any], make: Callable[[], list[str]]) -> list[str]:
    """Like ``cached_array`` for a list of strings."""
    arr = cached_array(spec, lambda: np.asarray(make(), dtype=np.str_))
    return [str(x) for x in arr.tolist()]
