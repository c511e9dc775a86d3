"""The library API: put online test-time adaptation in front of a retrieval model in a few lines.

    import qshift
    model = qshift.load_model("world", direction="i2t")          # any RetrievalModel works
    adapter = qshift.Adapter(model, gallery_items, method="rest")  # embeds the gallery once
    for batch in query_batches:
        ids, scores = adapter.retrieve(batch, k=5)                 # adapts, then ranks the gallery
    adapter.save_state("stream.pt")                                # resume later with load_state
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from qshift.atomic import atomic_path
from qshift.methods import create
from qshift.methods.base import Method
from qshift.models.load import MODEL_SPECS, load_model  # noqa: F401  (the public API)
from qshift.models.protocol import RetrievalModel
from qshift.retrieval.encode import encode_batched

STATE_FORMAT = 1


class Adapter:
    """Online test-time adaptation of ``model``'s query tower against a frozen gallery.

    ``gallery`` is either the gallery's raw items (encoded once here with ``model.encode_gallery``)
    or precomputed, L2-normalised embeddings [N, d] (pass ``gallery_is_embedded=True``).
    ``gallery_ids`` maps gallery rows to the ids returned by :meth:`retrieve` (default: row numbers).
    ``method`` and ``config`` are as for :func:`qshift.methods.create` (``steps``, ``lr``, ``scoring``,
    and the method's own options).
    """

    def __init__(self, model: RetrievalModel, gallery: Any, method: str = "rest", *,
                 gallery_ids: Any = None, gallery_is_embedded: bool = False, batch_size: int = 256,
                 **config: Any) -> None:
        if len(gallery) == 0:
            raise ValueError("the gallery is empty: pass the gallery items (captions, images, …) to retrieve from")
        if gallery_is_embedded:
            emb = torch.as_tensor(gallery, dtype=torch.float32)
            if emb.ndim != 2:
                raise ValueError(f"gallery embeddings must be [N, d], got {tuple(emb.shape)}")
            norms = emb.norm(dim=1)
            if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise ValueError("gallery embeddings must be L2-normalised")
        else:
            emb = encode_batched(model.encode_gallery, gallery, batch_size, desc="gallery")
        self.model = model
        self.gallery = emb.detach()
        self.gallery_ids = torch.arange(len(emb)) if gallery_ids is None else torch.as_tensor(gallery_ids)
        if len(self.gallery_ids) != len(emb):
            raise ValueError(f"{len(self.gallery_ids)} gallery ids for {len(emb)} gallery items")
        self.method_name, self.config = method, dict(config)
        self.method: Method = create(method, model, self.gallery, gallery_ids=self.gallery_ids, **config)

    def adapt(self, queries: Any) -> torch.Tensor:
        """Adapt on one batch of queries; return its online query–gallery scores [B, N]."""
        if len(queries) == 0:
            raise ValueError("empty query batch")
        scores, self.last_record = self.method.adapt_batch(queries)
        return scores

    def retrieve(self, queries: Any, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt on the batch, then return the top-``k`` gallery ids [B, k] and their scores."""
        _check_k(k)
        scores = self.adapt(queries)
        k = min(k, scores.shape[1])
        top = scores.topk(k, dim=1)
        return self.gallery_ids[top.indices], top.values

    def search(self, queries: Any, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank the gallery with the current parameters, without adapting."""
        _check_k(k)
        scores = self.method.scores(queries)
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return self.gallery_ids[top.indices], top.values

    def reset(self) -> None:
        """Back to the source parameters and a fresh method state."""
        self.method.reset()

    def _gallery_fingerprint(self) -> str:
        return hashlib.sha256(self.gallery.numpy().tobytes()).hexdigest()[:16]

    def save_state(self, path: str | Path) -> Path:
        """Save the adaptation state (adapted parameters, optimizer, queue, counters) atomically."""
        payload = {"format": STATE_FORMAT, "method": self.method_name, "config": self.config,
                   "gallery": self._gallery_fingerprint(), "state": self.method.state_dict()}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    def load_state(self, path: str | Path) -> None:
        """Resume from :meth:`save_state`; the method, its config and the gallery must match."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adaptation state not found: {path}")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: unsupported state format {payload.get('format')!r}")
        if payload["method"] != self.method_name:
            raise ValueError(f"{path}: state is for method {payload['method']!r}, this adapter runs {self.method_name!r}")
        if payload["gallery"] != self._gallery_fingerprint():
            raise ValueError(f"{path}: state was saved against a different gallery")
        if payload["config"] != self.config:
            raise ValueError(f"{path}: method config differs: saved {payload['config']}, now {self.config}")
        self.method.load_state_dict(payload["state"])


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (results per query; more than the gallery holds returns "
                         f"the whole gallery), got {k!r}")
