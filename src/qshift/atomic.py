"""Atomic file writes: a reader, or a crash half-way, never sees a half-written result, table or README."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; when the block ends without error it
    replaces ``path`` in one step, otherwise it is removed and ``path`` is left as it was.

    The temporary name ends in ``.tmp`` (not in ``path``'s suffix), so globs such as ``*.json`` never
    pick it up; writers that infer a format from the suffix must be given the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format is taken from ``path``'s suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path
