"""The library API: put online test-time adaptation in front of a retrieval model in a few lines.

    import qshift
    model = qshift.load_model("world", direction="i2t")          # any RetrievalModel works
    adapter = qshift.Adapter(model, gallery_items, method="rest")  # embeds the gallery once
    for batch in query_batches:
        ids, scores = adapter.retrieve(batch, k=5)                 # adapts, then ranks the gallery
    adapter.save_state("stream.pt")                                # resume later with load_state
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
import weakref
import zipfile
from pathlib import Path
from typing import Any

import torch

import qshift
from qshift.atomic import atomic_path
from qshift.errors import NonFiniteError, UserError
from qshift.methods import create
from qshift.methods.base import Method
from qshift.models.load import MODEL_SPECS, load_model  # noqa: F401  (the public API)
from qshift.models.protocol import RetrievalModel
from qshift.retrieval.encode import encode_batched

#: version of the state-file layout written by :meth:`Adapter.save_state` (1: pickled, never loaded now)
STATE_FORMAT = 2

# the Adapter that owns each model object (an Adapter changes its model's parameters in place)
_OWNERS: "weakref.WeakValueDictionary[int, Adapter]" = weakref.WeakValueDictionary()


class StateFileError(UserError):
    """A state file that cannot be loaded into this adapter; the adapter is unchanged."""


class Adapter:
    """Online test-time adaptation of ``model``'s query tower against a frozen gallery.

    ``gallery`` is either the gallery's raw items (encoded once here with ``model.encode_gallery``)
    or precomputed, L2-normalised embeddings [N, d] (pass ``gallery_is_embedded=True``).
    ``gallery_ids`` maps gallery rows to the ids returned by :meth:`retrieve` (default: row numbers).
    ``method`` and ``config`` are as for :func:`qshift.methods.create` (``steps``, ``lr``, ``scoring``,
    ``reset`` — ``"on-collapse"`` turns on the collapse guard — and the method's own options).
    For a large gallery, ``candidates=K`` scores each query against its top-K gallery items from an
    index (``index="IVF4096,Flat"`` builds a FAISS one; ``gallery_index`` passes one built or loaded
    with :mod:`qshift.retrieval.index`); see docs/large-galleries.md.

    An Adapter changes its model's adaptable parameters in place and snapshots them, as given, as the
    source state that :meth:`reset` restores.  A model already held by another live Adapter is refused
    (its parameters would be shared, and the second Adapter's "source" would be the first's adapted
    weights); pass ``copy_model=True`` to adapt an independent deep copy instead, or :meth:`close` the
    first Adapter (which puts the source parameters back) before reusing the model.
    """

    def __init__(self, model: RetrievalModel, gallery: Any, method: str = "rest", *,
                 gallery_ids: Any = None, gallery_is_embedded: bool = False, batch_size: int = 256,
                 copy_model: bool = False, gallery_index: Any = None, **config: Any) -> None:
        if len(gallery) == 0:
            raise UserError("the gallery is empty: pass the gallery items (captions, images, …) to retrieve from")
        if gallery_is_embedded:
            emb = torch.as_tensor(gallery, dtype=torch.float32)
            if emb.ndim != 2:
                raise UserError(f"gallery embeddings must be [N, d], got {tuple(emb.shape)}")
            if not bool(torch.isfinite(emb).all()):
                raise UserError("gallery embeddings hold NaN or inf")
            norms = emb.norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise UserError("gallery embeddings must be L2-normalised")
            dim = getattr(model, "embed_dim", None)
            if dim is not None and emb.shape[1] != dim:
                raise UserError(f"gallery embeddings have dimension {emb.shape[1]}, the model embeds in {dim}")
        owner = _OWNERS.get(id(model))
        if copy_model:
            model = copy.deepcopy(model)
            if owner is not None:  # the copy starts from the true source, not from the owner's adapted weights
                with torch.no_grad():
                    for (_, p), s in zip(model.adaptable_parameters(), owner.method.source_state, strict=True):
                        p.copy_(s)
        elif owner is not None:
            raise UserError("this model is already adapted by another Adapter, which changes its parameters in "
                            "place; pass copy_model=True for an independent copy, or close() the other Adapter")
        if not gallery_is_embedded:
            emb = encode_batched(model.encode_gallery, gallery, batch_size, desc="gallery")
        self.model = model
        self.gallery = emb.detach()
        self.gallery_ids = torch.arange(len(emb)) if gallery_ids is None else torch.as_tensor(gallery_ids)
        if len(self.gallery_ids) != len(emb):
            raise UserError(f"{len(self.gallery_ids)} gallery ids for {len(emb)} gallery items")
        self.method_name, self.config = method, dict(config)
        self.method: Method = create(method, model, self.gallery, gallery_ids=self.gallery_ids,
                                     gallery_index=gallery_index, **config)
        self.last_record: dict = {}
        _OWNERS[id(model)] = self

    def adapt(self, queries: Any) -> torch.Tensor:
        """Adapt on one batch of queries; return its online query–gallery scores [B, N] (finite, or a
        :class:`~qshift.errors.NonFiniteError` with the adapter as before the batch).  With
        ``candidates=K`` the scores are [B, K] over the gallery rows ``self.method.last_cols``."""
        if len(queries) == 0:
            raise UserError("empty query batch")
        scores, self.last_record = self.method.adapt_batch(queries)
        return scores

    def retrieve(self, queries: Any, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt on the batch, then return the top-``k`` gallery ids [B, k] and their scores."""
        _check_k(k)
        scores = self.adapt(queries)
        rows, values = self.method.top(scores, k)
        return self.gallery_ids[rows], values

    def search(self, queries: Any, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank the gallery with the current parameters, without adapting."""
        _check_k(k)
        if len(queries) == 0:
            raise UserError("empty query batch")
        scores = self.method.scores(queries)
        rows, values = self.method.top(scores, k)
        return self.gallery_ids[rows], values

    def reset(self) -> None:
        """Back to the source parameters and a fresh method state."""
        self.method.reset()

    @property
    def collapse_resets(self) -> int:
        """How often the collapse guard (``reset="on-collapse"``) has sent the adapter back to the source."""
        return 0 if self.method.guard is None else self.method.guard.fired

    def close(self) -> None:
        """Put the model's source parameters back and release it (another Adapter may then take it)."""
        self.method.reset()
        if _OWNERS.get(id(self.model)) is self:
            del _OWNERS[id(self.model)]

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _gallery_fingerprint(self) -> str:
        return hashlib.sha256(self.gallery.cpu().numpy().tobytes()).hexdigest()[:16]

    def _config_json(self) -> str:
        try:
            return json.dumps(self.config, sort_keys=True)
        except TypeError as e:
            raise UserError(f"the adapter's config cannot be saved (not plain values): {e}") from e

    def save_state(self, path: str | Path) -> Path:
        """Save the adaptation state (adapted parameters, optimizer, queue, counters) atomically, as
        tensors and plain containers only (it loads with ``torch.load(weights_only=True)``)."""
        payload = {"format": STATE_FORMAT, "qshift": qshift.__version__, "method": self.method_name,
                   "config": self._config_json(), "gallery": self._gallery_fingerprint(),
                   "parameters": {n: list(p.shape) for n, p in self.method.named_params},
                   "state": self.method.state_dict()}
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a folder; give the state file's path")
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    def load_state(self, path: str | Path) -> None:
        """Resume from :meth:`save_state`.  The file is read without running any code from it
        (``weights_only=True``) and validated in full — format, method, config, gallery, parameter names,
        shapes and finiteness — before anything is copied in; any failure raises :class:`StateFileError`
        and leaves the adapter exactly as it was."""
        path = Path(path)
        if not path.is_file():
            raise StateFileError(f"adaptation state not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise StateFileError(f"{path}: refused: it holds objects other than tensors and plain containers "
                                 f"(not a qshift state file, or one from before format {STATE_FORMAT}); nothing "
                                 "in it was run") from e
        except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise StateFileError(f"{path}: not a readable state file (truncated or corrupt?): "
                                 f"{type(e).__name__}: {e}") from e
        self._check_payload(path, payload)
        try:
            self.method.load_state_dict(payload["state"])
        except (ValueError, NonFiniteError) as e:
            raise StateFileError(f"{path}: {e}") from e

    def _check_payload(self, path: Path, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise StateFileError(f"{path}: not a qshift state file (a {type(payload).__name__}, not a mapping)")
        if payload.get("format") != STATE_FORMAT:
            raise StateFileError(f"{path}: unsupported state format {payload.get('format')!r} "
                                 f"(this qshift reads format {STATE_FORMAT})")
        missing = [k for k in ("method", "config", "gallery", "parameters", "state") if k not in payload]
        if missing:
            raise StateFileError(f"{path}: state file lacks {missing}")
        if payload["method"] != self.method_name:
            raise StateFileError(f"{path}: state is for method {payload['method']!r}, this adapter runs "
                                 f"{self.method_name!r}")
        if payload["gallery"] != self._gallery_fingerprint():
            raise StateFileError(f"{path}: state was saved against a different gallery")
        if payload["config"] != self._config_json():
            raise StateFileError(f"{path}: method config differs: saved {payload['config']}, now "
                                 f"{self._config_json()}")
        here = {n: list(p.shape) for n, p in self.method.named_params}
        if payload["parameters"] != here:
            raise StateFileError(f"{path}: state was saved for other adaptable parameters "
                                 f"({len(payload['parameters'])} saved, {len(here)} here): another model?")
        try:
            self.method.check_state_dict(payload["state"])
        except ValueError as e:
            raise StateFileError(f"{path}: {e}") from e


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k must be a positive integer (results per query; more than the gallery holds returns "
                        f"the whole gallery), got {k!r}")
