"""A RetrievalModel over any two towers (the "bring your own towers" adapter and the base of the
real-backbone adapters): one tower encodes the queries (differentiable), the other the gallery."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qshift.models.protocol import TwoTowerBase, layernorm_affine_parameters

MODALITIES = ("image", "text")
AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DualTowerModel(TwoTowerBase):
    """Query / gallery encoders built from per-modality towers.

    ``encoders`` maps a modality to a function ``batch -> [B, d]`` (unnormalised features are fine);
    ``towers`` maps a modality to its ``nn.Module`` (whose parameters the rule selects from);
    ``adaptable`` is either a callable ``(tower) -> [(name, param)]`` or ``None`` for every LayerNorm
    affine parameter of the query tower.  ``autocast`` (``bf16`` / ``fp16``) runs the encoders under
    ``torch.autocast`` on ``device``; embeddings are returned in float32 and L2-normalised.
    ``default_lr`` is the backbone's protocol learning rate (docs/method.md §2: 3e-5 for BLIP text queries);
    ``None`` leaves it to the query modality's default.
    """

    def __init__(self, encoders: dict[str, Callable[[Any], torch.Tensor]], towers: dict[str, nn.Module],
                 query_modality: str, gallery_modality: str | None = None,
                 adaptable: Callable[[nn.Module], list[tuple[str, nn.Parameter]]] | None = None,
                 device: str | torch.device = "cpu", autocast: str | None = None,
                 default_lr: float | None = None) -> None:
        if query_modality not in encoders:
            raise ValueError(f"query_modality must be one of {sorted(encoders)}, got {query_modality!r}")
        others = [m for m in encoders if m != query_modality]
        self.query_modality = query_modality
        self.gallery_modality = gallery_modality or (others[0] if others else query_modality)
        if self.gallery_modality not in encoders:
            raise ValueError(f"no encoder for gallery modality {self.gallery_modality!r}")
        if autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {list(AUTOCAST)}, got {autocast!r}")
        self.encoders, self.towers = encoders, towers
        self.device = torch.device(device)
        self.autocast = AUTOCAST[autocast]
        self._rule = adaptable
        #: the backbone's protocol learning rate when a run does not set one (None: by query modality)
        self.default_lr = default_lr

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _encode(self, modality: str, batch: Any) -> torch.Tensor:
        with self._ctx():
            z = self.encoders[modality](batch)
        if z.ndim != 2:
            raise ValueError(f"{modality} encoder returned shape {tuple(z.shape)}, expected [B, d]")
        return F.normalize(z.float(), dim=-1)

    def query_tower(self) -> nn.Module:
        return self.towers[self.query_modality]

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        tower = self.query_tower()
        params = self._rule(tower) if self._rule is not None else layernorm_affine_parameters(tower)
        if not params:
            raise ValueError(f"the adaptable-parameter rule selected nothing in the {self.query_modality} tower")
        return params


def named_layernorms(module: nn.Module, keep: Callable[[str], bool], prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """LayerNorm affine parameters of ``module`` whose module name passes ``keep``."""
    pre = f"{prefix}." if prefix else ""
    return [(pre + n, p) for n, p in layernorm_affine_parameters(module) if keep(n.rsplit(".", 1)[0])]


def freeze_all(modules: Iterable[nn.Module]) -> None:
    """Eval mode and no gradients for every parameter; methods re-enable what they adapt."""
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
