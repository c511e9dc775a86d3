"""Checkpoints of a service's adaptation state: atomic, checked on resume, never half-written.

A checkpoint is two files in the state folder: ``state-<batches>-<stamp>.pt`` (:meth:`qshift.Adapter.save_state`,
tensors only) and ``checkpoint.json``, which names that state file with its SHA-256, the service's
counters and the identity of what was served (model, direction, gallery, method and config).  The JSON is
written last, atomically: it is the commit point, so a process killed at any moment leaves either the
previous checkpoint or the new one, and the state file the JSON names is never deleted before the JSON
that replaces it is in place.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import qshift
from qshift.api import Adapter, StateFileError
from qshift.atomic import clean_stale_tmp, write_text_atomic
from qshift.errors import UserError

META = "checkpoint.json"
LOCK = ".lock"
#: version of checkpoint.json's layout
CHECKPOINT_FORMAT = 1
#: the identity fields a checkpoint must share with the server that resumes from it, and their names
IDENTITY_FIELDS = {"model": "model", "direction": "direction", "gallery": "gallery", "method": "method",
                   "config": "method config"}


class CheckpointRefused(UserError):
    """A checkpoint that this server must not resume from (another model, gallery or method; corrupt)."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointStore:
    """The checkpoints of one service in ``folder``; ``identity`` is what the service serves (JSON values)."""

    def __init__(self, folder: str | Path, identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--state-dir {self.folder} is a file; give a folder for the checkpoints")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --state-dir {self.folder}: {e.strerror or e}") from e
        clean_stale_tmp(self.folder)
        self.identity = json.loads(json.dumps(identity))  # as it reads back from the JSON
        self.last: dict[str, Any] | None = None
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold the folder for this process (until it exits): a second server on the same folder would
        delete the state files this one's checkpoint names."""
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"--state-dir {self.folder} is in use by another running server; give each server "
                            "its own folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release :meth:`lock` (the process's exit releases it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def meta_path(self) -> Path:
        return self.folder / META

    def read(self) -> dict[str, Any] | None:
        """The current checkpoint's metadata, or None when the folder holds none."""
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointRefused(f"{self.meta_path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointRefused(f"{self.meta_path}: unsupported checkpoint format {got!r} "
                                    f"(this qshift reads format {CHECKPOINT_FORMAT})")
        return meta

    def save(self, adapter: Adapter, counters: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint ``adapter`` with the service's ``counters`` (``batches``, ``queries``, …); returns the
        metadata written.  Call it only from the thread that owns the adapter."""
        batches = int(counters.get("batches", 0))
        name = f"state-{batches:09d}-{time.time_ns()}.pt"
        path = adapter.save_state(self.folder / name)
        meta = {"format": CHECKPOINT_FORMAT, "qshift": qshift.__version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "state_file": name,
                "state_sha256": file_sha256(path), **counters, "identity": self.identity}
        write_text_atomic(self.meta_path, json.dumps(meta, indent=1))
        for old in self.folder.glob("state-*.pt"):  # only after the JSON names the new one
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last = meta
        return meta

    def check(self, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint made for another model, direction, gallery, method or config, saying which."""
        saved = meta.get("identity")
        if not isinstance(saved, dict):
            raise CheckpointRefused(f"{self.meta_path}: the checkpoint records no identity")
        diffs = []
        for key, label in IDENTITY_FIELDS.items():
            there, here = saved.get(key), self.identity.get(key)
            if there == here:
                continue
            if isinstance(there, dict) and isinstance(here, dict):  # name only the entries that differ
                keys = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
                there, here = {k: there.get(k) for k in keys}, {k: here.get(k) for k in keys}
            diffs.append(f"{label}: {_short(there)} in the checkpoint, {_short(here)} here")
        if diffs:
            raise CheckpointRefused(f"{self.meta_path} was made by another setup ({'; '.join(diffs)}); resume it "
                                    "with the same --model/--weights, gallery, --method and --set, or give another "
                                    "--state-dir (or --fresh to start from the source and replace it)")

    def resume(self, adapter: Adapter) -> dict[str, Any] | None:
        """Load the folder's checkpoint into ``adapter`` after checking it in full; None when there is none.
        Raises :class:`CheckpointRefused` (the adapter unchanged) when it does not belong to this service."""
        meta = self.read()
        if meta is None:
            return None
        self.check(meta)
        state = self.folder / str(meta.get("state_file", ""))
        if not state.is_file():
            raise CheckpointRefused(f"{self.meta_path} names {state.name}, which is missing")
        if file_sha256(state) != meta.get("state_sha256"):
            raise CheckpointRefused(f"{state}: its SHA-256 differs from the one {META} records (changed or corrupt)")
        try:
            adapter.load_state(state)
        except StateFileError as e:
            raise CheckpointRefused(str(e)) from e
        self.last = meta
        return meta


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "…"
