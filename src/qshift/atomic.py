"""Atomic file writes: a reader, or a crash half-way, never sees a half-written result, table or README.

Also the checks of an output folder before a run writes there, and the cleaning of the temporary files
that a killed writer left behind."""
from __future__ import annotations

import os
import re
import time
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


_TMP = re.compile(r"\.(\d+)\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_tmp(folder: str | Path, recursive: bool = False, max_age_s: float = 86400.0) -> list[Path]:
    """Remove the ``*.<pid>.tmp`` files :func:`atomic_path` left in ``folder`` when its writer was killed:
    those whose process is gone (or that are older than ``max_age_s``); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in (folder.rglob("*.tmp") if recursive else folder.glob("*.tmp")):
        m = _TMP.search(tmp.name)
        if not m or not tmp.is_file():
            continue
        pid = int(m.group(1))
        try:
            old = time.time() - tmp.stat().st_mtime > max_age_s
        except OSError:
            continue
        if (pid != os.getpid() and not _alive(pid)) or old:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def prepare_output_dir(folder: str | Path) -> Path:
    """Make sure results can be written to ``folder`` before any work starts: create it, check that it
    is a writable folder (``ValueError`` naming the problem otherwise), and clean stale temporary files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output folder {folder} is a file; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".qshift-write-probe.{os.getpid()}.tmp"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write results to {folder}: {e.strerror or e}") from e
    clean_stale_tmp(folder)
    return folder


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
