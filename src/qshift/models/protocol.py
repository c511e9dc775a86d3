"""The RetrievalModel protocol every backbone adapter implements."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


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
    adaptation may change (by default the query tower's LayerNorm affine parameters).  An adapter may
    also set ``default_lr``, its backbone's protocol learning rate (see :func:`default_lr`).
    """

    query_modality: str
    gallery_modality: str

    def encode_query(self, batch: Any) -> torch.Tensor: ...

    def encode_gallery(self, batch: Any) -> torch.Tensor: ...

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]: ...


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
