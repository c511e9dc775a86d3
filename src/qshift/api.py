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
from qshift.models.protocol import RetrievalModel
from qshift.retrieval.encode import encode_batched

STATE_FORMAT = 1


MODEL_SPECS = ("world", "openclip:ARCH", "hf-clip:PATH", "hf-blip:PATH", "custom:module:factory")


def load_model(name: str = "world", direction: str = "i2t", weights: str | Path | None = None, *,
               preprocess: str = "model", device: str = "cpu", **options: Any) -> RetrievalModel:
    """A RetrievalModel from a spec (the CLI's ``--model``):

    - ``world``: the shipped embedded model (``weights``: another file);
    - ``openclip:ARCH``: open_clip architecture ARCH, ``weights`` = a pretrained tag or a checkpoint path;
    - ``hf-clip:PATH`` / ``hf-blip:PATH``: a ``transformers`` CLIP / BLIP retrieval model saved in PATH;
    - ``custom:module:factory``: ``module.factory(direction=..., weights=..., **options)`` returns one.

    ``direction`` is ``"i2t"`` (image queries, text gallery) or ``"t2i"``; ``preprocess`` is the
    model's own transform (``model``) or TCR's (``tcr``); ``options`` go to the backbone loader
    (``quick_gelu``, ``autocast``, ``grad_checkpointing``, …).
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    modality = "image" if direction == "i2t" else "text"
    kind, _, rest = name.partition(":")
    if kind == "world" and not rest:
        from qshift.models.world_model import WorldRetrievalModel, load_world_model

        return WorldRetrievalModel(load_world_model(weights), modality)
    if kind == "openclip" and rest:
        from qshift.models.openclip_model import load_openclip

        return load_openclip(rest, None if weights is None else str(weights), modality, preprocess=preprocess,
                             device=device, **options)
    if kind in ("hf-clip", "hf-blip") and rest:
        from qshift.models.hf_models import load_hf_blip, load_hf_clip

        loader = load_hf_clip if kind == "hf-clip" else load_hf_blip
        return loader(rest, modality, preprocess=preprocess, device=device, **options)
    if kind == "custom" and rest.count(":") == 1:
        import importlib

        module, factory = rest.split(":")
        fn = getattr(importlib.import_module(module), factory, None)
        if fn is None:
            raise ValueError(f"{module} has no attribute {factory!r}")
        model = fn(direction=direction, weights=weights, **options)
        missing = [a for a in ("encode_query", "encode_gallery", "adaptable_parameters", "query_modality")
                   if not hasattr(model, a)]
        if missing:
            raise TypeError(f"{name} returned {type(model).__name__}, which lacks {missing} (the RetrievalModel protocol)")
        return model
    raise ValueError(f"unknown model spec {name!r}; expected one of {', '.join(MODEL_SPECS)}")


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
