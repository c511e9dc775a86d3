"""Model specs (the CLI's ``--model``) to a :class:`~qshift.models.protocol.RetrievalModel`."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from qshift.models.protocol import RetrievalModel

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
