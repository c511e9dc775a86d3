"""What a server serves: one model, one gallery, one method — the :class:`qshift.Adapter` and the pieces
the API needs around it (query decoding, gallery ids, identity, counters, checkpoints).

:func:`build_service` makes one from the same spec strings as ``qshift run`` (``--model``, ``--weights``,
``--method``, ``--set``) plus a gallery: the embedded world split's captions or images, a real dataset's,
or a precomputed embeddings file.  Only the batcher's worker thread calls the methods that touch the
adapter (:meth:`Service.adapt`, :meth:`Service.reset`, :meth:`Service.checkpoint`)."""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qshift.api import Adapter
from qshift.bench.backbone import GridBackbone
from qshift.data.pipeline import LazyImages
from qshift.data.world import load_split
from qshift.engine import parse_settings
from qshift.errors import UserError
from qshift.methods.base import method_class
from qshift.retrieval.index import index_paths, load_index
from qshift.serve.checkpoints import CheckpointStore
from qshift.serve.inputs import InputLimits, QueryCodec

log = logging.getLogger("qshift.serve")


class Service:
    """The adapter and what surrounds it.  ``gallery_ids`` names each gallery row in answers;
    ``identity`` (JSON values) is what a checkpoint must match to be resumed here."""

    def __init__(self, adapter: Adapter, gallery_ids: list[str], identity: dict[str, Any], *,
                 batch_size: int = 64, limits: InputLimits | None = None, store: CheckpointStore | None = None,
                 checkpoint_every: int = 0, episodic: bool = False) -> None:
        if len(gallery_ids) != len(adapter.gallery):
            raise UserError(f"{len(gallery_ids)} gallery ids for {len(adapter.gallery)} gallery items")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        self.adapter, self.gallery_ids, self.identity = adapter, list(map(str, gallery_ids)), identity
        self.batch_size, self.store, self.checkpoint_every = batch_size, store, checkpoint_every
        self.episodic = episodic
        self.codec = QueryCodec(adapter.model, limits)
        self.counters: dict[str, Any] = {"batches": 0, "queries": 0}
        self.resumed: dict[str, Any] | None = None
        self.state_digest = self.digest()

    @property
    def n_gallery(self) -> int:
        return len(self.gallery_ids)

    def protocol(self) -> dict[str, Any]:
        """The protocol in force (the method's knobs, its learning rate resolved, and B)."""
        return {**self.adapter.method.protocol.as_dict(), "batch_size": self.batch_size}

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the adapted parameters: which state is being served."""
        h = hashlib.sha256()
        for p in self.adapter.method.params:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ the worker's side
    def adapt(self, batch: Any) -> torch.Tensor:
        """Adapt on one batch and return its scores [B, N] (all or nothing, as :meth:`Adapter.adapt`)."""
        if self.episodic:
            self.adapter.reset()
        scores = self.adapter.adapt(batch)
        self.counters["batches"] += 1
        self.counters["queries"] += len(scores)
        self.state_digest = self.digest()
        if self.adapter.last_record.get("collapse_reset"):
            log.warning("collapse guard reset the adapter to the source at batch %d (signals %s; %d resets so far)",
                        self.counters["batches"], self.adapter.last_record.get("guard"),
                        self.adapter.collapse_resets)
        return scores

    def checkpoint_due(self) -> bool:
        return (self.store is not None and self.checkpoint_every > 0
                and self.counters["batches"] % self.checkpoint_every == 0)

    def checkpoint(self) -> dict[str, Any]:
        """Write a checkpoint now (needs a state folder)."""
        if self.store is None:
            raise UserError("no state folder: start the server with --state-dir DIR to checkpoint")
        t0 = time.perf_counter()
        meta = self.store.save(self.adapter, {**self.counters, "state_digest": self.state_digest})
        log.info("checkpoint at batch %d: %s (%.0f ms)", self.counters["batches"], self.store.folder / meta["state_file"],
                 1000 * (time.perf_counter() - t0))
        return meta

    def reset(self) -> None:
        """Back to the source parameters and a fresh method state (the service's counters go on)."""
        self.adapter.reset()
        self.state_digest = self.digest()
        log.info("reset to the source parameters after batch %d", self.counters["batches"])

    def resume(self) -> dict[str, Any] | None:
        """Resume from the state folder's checkpoint, if any (a refusal raises, the adapter unchanged)."""
        if self.store is None:
            return None
        meta = self.store.resume(self.adapter)
        if meta is not None:
            self.counters.update({k: int(meta.get(k, 0)) for k in ("batches", "queries")})
            self.state_digest = self.digest()
            self.resumed = {k: meta.get(k) for k in ("batches", "saved_at", "state_file", "state_digest")}
            log.info("resumed from %s: batch %d, saved %s", self.store.meta_path, self.counters["batches"],
                     meta.get("saved_at"))
        return meta


def gallery_fingerprint(embeddings: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of the gallery's embeddings."""
    return hashlib.sha256(embeddings.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def service_identity(model: dict[str, Any], direction: str, gallery: dict[str, Any], adapter: Adapter) -> dict:
    """What a checkpoint records and a resuming server must match."""
    return {"model": model, "direction": direction,
            "gallery": {**gallery, "n": len(adapter.gallery), "sha256": gallery_fingerprint(adapter.gallery)},
            "method": adapter.method_name, "config": dict(adapter.config)}


@dataclass
class ServeSpec:
    """A service from spec strings, as ``qshift serve`` takes them."""

    method: str = "rest"
    settings: list[str] = field(default_factory=list)
    model: str = "world"
    weights: str | None = None
    direction: str = "i2t"
    split: str = "test1k"  # the world split whose captions / images are the gallery
    dataset: str | None = None
    data_root: str | None = None
    annotation: str | None = None
    gallery_embeddings: str | None = None  # a .npy [N, d] file, L2-normalised, from this model's gallery tower
    gallery_ids: str | None = None  # a text file, one id per line (default: row numbers)
    device: str = "cpu"
    preprocess: str = "model"
    state_dir: str | None = None
    checkpoint_every: int = 50
    fresh: bool = False
    limits: InputLimits = field(default_factory=InputLimits)


def build_service(spec: ServeSpec) -> Service:
    """Load the model and gallery, build the adapter (collapse guard on unless ``--set reset=…`` says
    otherwise), and resume from the state folder's checkpoint unless ``spec.fresh``.  Every mistake is a
    :class:`~qshift.errors.UserError` (or ``ValueError`` / ``FileNotFoundError``) naming the flag or file."""
    cfg = parse_settings(spec.method, spec.settings)
    explicit = {s.partition("=")[0].strip() for s in spec.settings}
    protocol = cfg.protocol if "reset" in explicit else cfg.protocol.replace(reset="on-collapse")
    if method_class(spec.method).uses_labels:
        raise UserError(f"method {spec.method!r} needs the queries' labels, which a live service does not have")
    if protocol.reset == "reset_each_domain":
        raise UserError("--set reset=reset_each_domain needs domain labels, which a live service does not have; "
                        "use on-collapse, episodic or never")
    sources = [n for n, v in (("--dataset", spec.dataset), ("--gallery-embeddings", spec.gallery_embeddings)) if v]
    if len(sources) > 1:
        raise UserError("give one gallery: --dataset or --gallery-embeddings, not both")
    if spec.gallery_ids and not spec.gallery_embeddings:
        raise UserError("--gallery-ids goes with --gallery-embeddings")
    if spec.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be 0 (only on shutdown / request) or more, got {spec.checkpoint_every}")
    store_dir = None if spec.state_dir is None else Path(spec.state_dir)
    backbone = GridBackbone(spec.model, spec.weights, dataset=spec.dataset, data_root=spec.data_root,
                            annotation=spec.annotation, preprocess=spec.preprocess, device=spec.device)
    model = backbone.model(spec.direction)
    items, ids, gallery_info, embedded = _gallery(spec, backbone, model)
    config = {**{k: v for k, v in protocol.as_dict().items() if k != "batch_size"}, **cfg.method_options}
    torch.manual_seed(cfg.seed)
    adapter = Adapter(model, items, spec.method, gallery_is_embedded=embedded,
                      gallery_index=_saved_index(spec, protocol, items), **config)
    identity = service_identity({"spec": spec.model, **backbone.identity}, spec.direction, gallery_info, adapter)
    store = None if store_dir is None else CheckpointStore(store_dir, identity)
    if store is not None:
        store.lock()
    service = Service(adapter, ids, identity, batch_size=protocol.batch_size, limits=spec.limits, store=store,
                      checkpoint_every=spec.checkpoint_every, episodic=protocol.reset == "episodic")
    if not spec.fresh:
        service.resume()
    return service


def _saved_index(spec: ServeSpec, protocol: Any, embeddings: Any) -> Any:
    """The index ``qshift index build`` wrote beside ``--gallery-embeddings``, for a top-K service
    (``--set candidates=K``); None (the protocol's ``index`` is built at start) when there is none."""
    if not protocol.candidates or not spec.gallery_embeddings:
        return None
    path, sidecar = index_paths(spec.gallery_embeddings)
    if not sidecar.is_file():
        return None
    index = load_index(path, embeddings, params=protocol.index_params or None)
    log.info("gallery index %s (%s, %s) loaded from %s", index.kind, index.params or "default search",
             f"{index.ntotal} items", path)
    return index


def _gallery(spec: ServeSpec, backbone: Any, model: Any) -> tuple[Any, list[str], dict[str, Any], bool]:
    """(items or embeddings, ids, description, embedded?) of the gallery a spec names."""
    modality = getattr(model, "gallery_modality", None)
    if spec.gallery_embeddings:
        path = Path(spec.gallery_embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"--gallery-embeddings {path} not found")
        try:
            emb = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"--gallery-embeddings {path}: not a .npy array ({e})") from e
        if emb.dtype.kind != "f" or emb.ndim != 2:
            raise UserError(f"--gallery-embeddings {path}: expected a float array [N, d], got {emb.dtype} {emb.shape}")
        ids = _read_ids(spec.gallery_ids, len(emb)) if spec.gallery_ids else [str(i) for i in range(len(emb))]
        return torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)), ids, {"source": path.name}, True
    ds = backbone.dataset
    if ds is not None:
        if modality == "text":
            return list(ds.captions), [str(i) for i in range(len(ds.captions))], \
                {"source": "dataset captions", **_plain(ds.fingerprint)}, False
        root = Path(spec.data_root)
        ids = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in map(Path, ds.image_paths)]
        return LazyImages(ds), ids, {"source": "dataset images", **_plain(ds.fingerprint)}, False
    if spec.model != "world":
        raise UserError(f"--model {spec.model} needs a gallery: --dataset with --data-root, or --gallery-embeddings")
    split = load_split(spec.split)
    if modality == "text":
        return list(split.captions), [str(i) for i in range(len(split.captions))], \
            {"source": f"world {split.name} captions"}, False
    return _WorldImages(split), [str(i) for i in range(len(split))], {"source": f"world {split.name} images"}, False


class _WorldImages:
    """A world split's images rendered on access, a slice at a time (the gallery encoder's batches)."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: slice) -> np.ndarray:
        return self.split.images(list(range(len(self.split)))[k])


def _read_ids(path: str, n: int) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--gallery-ids {p} not found")
    ids = [line.strip() for line in p.read_text().splitlines()]
    if ids and not ids[-1]:
        ids.pop()
    if len(ids) != n or not all(ids):
        raise UserError(f"--gallery-ids {p}: {len(ids)} lines{' (some empty)' if not all(ids) else ''} for {n} "
                        "gallery embeddings; give one non-empty id per line")
    return ids


def _plain(value: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(value).items() if isinstance(v, (str, int, float, bool, type(None)))}
