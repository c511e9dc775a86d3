"""A grid's backbone and data: one RetrievalModel per direction from the same specs as ``qshift run``
(``world``, ``openclip:ARCH``, ``hf-clip:PATH``, ``hf-blip:PATH``, ``custom:module:factory``), its
identity for result files and staleness, each cell started from the source parameters, and the real
dataset its benchmarks read."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qshift.models.load import load_model
from qshift.bench.world_data import WORLD_VERSION
from qshift.data import world
from qshift.data.retrieval_datasets import load_dataset
from qshift.models.protocol import RetrievalModel, default_lr
from qshift.data.task import task_of
from qshift.models.av_model import shipped_av_weights_path
from qshift.models.cir_model import shipped_cir_model_path
from qshift.models.world_model import shipped_weights_path

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json", ".txt", ".model")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, or of every weight / config / tokenizer file of a folder (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.suffix in _WEIGHT_SUFFIXES)
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


#: the identity key naming a task's own checkpoint in a world-model cell of that task (absent from other
#: cells' identities), and where the shipped one lies: the world model answers the composed task with the
#: CIR checkpoint and the video-audio task with the AV model
TASK_IDENTITY_KEYS: dict[str, tuple[str, Callable[[], Path]]] = {
    "composed": ("cir_weights_sha256", shipped_cir_model_path),
    "video-audio": ("av_weights_sha256", shipped_av_weights_path),
}
CIR_IDENTITY_KEY = TASK_IDENTITY_KEYS["composed"][0]


def world_identity(weights: str | Path | None = None, task: str | None = None, *,
                   all_tasks: bool = False) -> dict[str, Any]:
    """The embedded world model's identity: its weights file (SHA-256) and the world's rendering version;
    for a ``task`` with its own checkpoint (:data:`TASK_IDENTITY_KEYS`), also that checkpoint's digest
    (``weights``, else the shipped one); ``all_tasks``: every shipped task checkpoint present."""
    path = Path(weights) if weights else shipped_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"world-model weights not found: {path}")
    out = {"weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "world_version": WORLD_VERSION,
           "render_size": world.RENDER_SIZE, **world.world_variant()}
    for name, (key, shipped) in TASK_IDENTITY_KEYS.items():
        if name == task:
            own = Path(weights) if weights else shipped()
            if not own.is_file():
                raise FileNotFoundError(f"{name} model weights not found: {own}")
            out[key] = file_digest(own)
        elif all_tasks and shipped().is_file():
            out[key] = file_digest(Path(weights) if weights else shipped())
    return out


def same_model(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a cell's recorded backbone identity is ``current``'s: equal once the task-checkpoint keys are
    dropped, and equal in such a key too when the cell (a composed or video-audio cell) recorded one."""
    if not isinstance(recorded, dict):
        return False
    keys = {k for k, _ in TASK_IDENTITY_KEYS.values()}
    strip = lambda d: {k: v for k, v in d.items() if k not in keys}  # noqa: E731
    if strip(recorded) != strip(current):
        return False
    return all(k not in recorded or recorded[k] == current.get(k) for k in keys)


class GridBackbone:
    """The models a grid runs, one per direction (loaded on first use), and the dataset they read."""

    def __init__(self, model: str = "world", weights: str | None = None, *, dataset: str | None = None,
                 data_root: str | None = None, annotation: str | None = None, preprocess: str = "model",
                 device: str = "cpu", options: dict[str, Any] | None = None) -> None:
        if model == "world" and dataset is not None:
            raise ValueError("the embedded world model cannot read real datasets; set model: openclip:ARCH, "
                             "hf-clip:PATH, hf-blip:PATH or custom:module:factory")
        if dataset is not None and data_root is None:
            raise ValueError("a grid over a real dataset needs data_root (the folder with its images and annotation)")
        self.spec, self.weights, self.preprocess, self.device = model, weights, preprocess, device
        self.options = dict(options or {})
        self.dataset = None if dataset is None else load_dataset(dataset, data_root, annotation)
        self._dataset_spec = {"dataset": dataset, "data_root": data_root, "annotation": annotation}
        self._models: dict[str, RetrievalModel] = {}
        self._source: dict[str, list[torch.Tensor]] = {}
        self.identity = self._identity()

    def _identity(self) -> dict[str, Any]:
        out = self._base_identity()
        if self.options:  # a backbone option changes the model (a fusion, a combiner file): it is part of its identity
            out["options"] = {k: self.options[k] for k in sorted(self.options)}
            combiner = self.options.get("combiner")
            if isinstance(combiner, str) and Path(combiner).is_file():
                out["combiner_sha256"] = file_digest(combiner)
        return out

    def _base_identity(self) -> dict[str, Any]:
        if self.spec == "world":
            return world_identity(self.weights)
        out: dict[str, Any] = {"model": self.spec, "weights": self.weights, "preprocess": self.preprocess}
        local = [p for p in (self.weights, self.spec.partition(":")[2]) if p and Path(p).exists()]
        if local:
            out["weights_sha256"] = file_digest(local[0])
        if self.dataset is not None:
            fp = getattr(self.dataset, "fingerprint", None)
            if callable(fp):  # a CIR dataset names its annotation files' digest itself
                out.update({"dataset": self._dataset_spec["dataset"], "annotation_sha256": fp()})
            elif isinstance(fp, dict):  # the annotation file actually read, whichever name it had
                out.update({k: fp[k] for k in ("dataset", "format", "annotation", "annotation_sha256", "n_images",
                                               "n_captions") if k in fp})
            else:
                out["dataset"] = self._dataset_spec["dataset"]
                ann = self._dataset_spec["annotation"]
                out["annotation_sha256"] = file_digest(ann) if ann else None
                out["n_images"], out["n_captions"] = len(self.dataset), len(self.dataset.captions)
        return out

    def identity_for(self, direction: str) -> dict[str, Any]:
        """The identity a cell of ``direction`` records: :attr:`identity`, plus the task checkpoint's digest
        for the world model's composed and video-audio directions."""
        task = task_of(direction).name
        if self.spec == "world" and task in TASK_IDENTITY_KEYS:
            return {**self.identity, **world_identity(self.weights, task)}
        return self.identity

    def model(self, direction: str) -> RetrievalModel:
        """The model for ``direction`` with its adaptable parameters at their source values."""
        if direction not in self._models:
            m = load_model(self.spec, direction, self.weights, preprocess=self.preprocess, device=self.device,
                           **self.options)
            self._models[direction] = m
            self._source[direction] = [p.detach().clone() for _, p in m.adaptable_parameters()]
        m = self._models[direction]
        with torch.no_grad():
            for (_, p), s in zip(m.adaptable_parameters(), self._source[direction], strict=True):
                p.copy_(s)
        return m

    def lr_default(self, direction: str) -> float:
        """The backbone's protocol learning rate for ``direction`` (what an unset ``lr`` resolves to)."""
        return default_lr(self.model(direction))
