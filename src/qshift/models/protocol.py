"""The RetrievalModel protocol every backbone adapter implements."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from qshift.errors import UserError


#: docs/method.md §2 learning rates by query modality; a backbone may set its own (``model.default_lr``: BLIP
#: text queries 3e-5, the embedded world model 1e-3 — see ``default_lr``)
DEFAULT_LR = {"image": 3e-4, "text": 3e-4}


def default_lr(model: RetrievalModel) -> float:
    """The protocol learning rate of ``model`` when a run does not set one: the backbone's own
    (``model.default_lr``) if it declares one, else docs/method.md §2's rate for its query modality."""
    own = getattr(model, "default_lr", None)
    return float(own) if own is not None else DEFAULT_LR.get(model.query_modality, 3e-4)


@runtime_checkable
class RetrievalModel(Protocol):
    """A dual encoder seen from the query side.

    ``query_modality`` / ``gallery_modality`` name the towers' inputs ("image", "text", …);
    ``encode_query`` is differentiable, ``encode_gallery`` runs without gradients, both return
    L2-normalised [B, d] embeddings.  ``adaptable_parameters`` is the named rule of what test-time
    adaptation may change (by default the query tower's LayerNorm affine parameters); the adapter owns
    ``requires_grad``: those parameters require gradients (everything else should not), because the
    methods only read the list and update its tensors.  An adapter may also set ``default_lr``, its
    backbone's protocol learning rate (see :func:`default_lr`).
    """

    query_modality: str
    gallery_modality: str

    def encode_query(self, batch: Any) -> torch.Tensor: ...

    def encode_gallery(self, batch: Any) -> torch.Tensor: ...

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]: ...


PROTOCOL_METHODS = ("encode_query", "encode_gallery", "adaptable_parameters")
PROTOCOL_ATTRIBUTES = ("query_modality", "gallery_modality")


def check_retrieval_model(model: Any, where: str, query_modality: str | None = None) -> RetrievalModel:
    """``model`` if it keeps the RetrievalModel contract, else a :class:`UserError` naming ``where`` (e.g. the
    ``custom:module:factory`` spec that built it) and what is wrong: a missing method or attribute, a query
    modality other than ``query_modality``, adaptable parameters that are not (name, tensor) pairs or that do
    not require gradients."""
    missing = [a for a in PROTOCOL_ATTRIBUTES if not isinstance(getattr(model, a, None), str)]
    missing += [a for a in PROTOCOL_METHODS if not callable(getattr(model, a, None))]
    if missing:
        raise UserError(f"{where} returned {type(model).__name__}, which lacks {', '.join(missing)} of the "
                        "RetrievalModel protocol (docs/backbones.md, 'Your own model')")
    if query_modality is not None and model.query_modality != query_modality:
        raise UserError(f"{where} returned a model whose query_modality is {model.query_modality!r}; this "
                        f"direction queries with {query_modality!r} (build the model for the direction passed)")
    for item in model.adaptable_parameters():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise UserError(f"{where}: adaptable_parameters() must return (name, parameter) pairs, got "
                            f"{type(item).__name__}")
        if not item[1].requires_grad:
            raise UserError(f"{where}: adaptable parameter {item[0]!r} has requires_grad=False; the model must "
                            "enable gradients on what adaptable_parameters() returns (methods only read that list)")
    return model


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (newlines folded), cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TwoTowerBase:
    """Shared plumbing of the adapters: ``encode_query`` / ``encode_gallery`` from one ``_encode``.

    A subclass sets ``query_modality`` / ``gallery_modality`` and implements
    ``_encode(modality, batch) -> [B, d]`` (L2-normalised) and ``query_tower()``.
    """

    query_modality: str
    gallery_modality: str

    def _encode(self, modality: str, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def query_tower(self) -> nn.Module:
        raise NotImplementedError

    def encode_query(self, batch: Any) -> torch.Tensor:
        return self._encode(self.query_modality, batch)

    @torch.no_grad()
    def encode_gallery(self, batch: Any) -> torch.Tensor:
        return self._encode(self.gallery_modality, batch)


def layernorm_affine_parameters(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the weight and bias of every ``nn.LayerNorm`` inside ``module``."""
    out: list[tuple[str, nn.Parameter]] = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for p_name, p in mod.named_parameters(recurse=False):
                full = ".".join(x for x in (prefix, mod_name, p_name) if x)
                out.append((full, p))
    return out
