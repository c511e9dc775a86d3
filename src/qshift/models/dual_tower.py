"""A RetrievalModel over any two towers (the "bring your own towers" adapter and the base of the
real-backbone adapters): one tower encodes the queries (differentiable), the other the gallery."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qshift.errors import UserError
from qshift.models.protocol import RetrievalModel, TwoTowerBase, layernorm_affine_parameters

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
            raise UserError(f"query_modality must be one of {sorted(encoders)}, got {query_modality!r}")
        others = [m for m in encoders if m != query_modality]
        self.query_modality = query_modality
        self.gallery_modality = gallery_modality or (others[0] if others else query_modality)
        if self.gallery_modality not in encoders:
            raise UserError(f"no encoder for gallery modality {self.gallery_modality!r}")
        if autocast not in AUTOCAST:
            raise UserError(f"autocast must be one of {', '.join(str(k) for k in AUTOCAST if k)}, got {autocast!r}")
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
            raise UserError(f"{modality} encoder returned shape {tuple(z.shape)}, expected [B, d]")
        return F.normalize(z.float(), dim=-1)

    def query_tower(self) -> nn.Module:
        return self.towers[self.query_modality]

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        tower = self.query_tower()
        params = self._rule(tower) if self._rule is not None else layernorm_affine_parameters(tower)
        if not params:
            raise UserError(f"the adaptable-parameter rule selected nothing in the {self.query_modality} tower")
        return params


def named_layernorms(module: nn.Module, keep: Callable[[str], bool], prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """LayerNorm affine parameters of ``module`` whose module name passes ``keep``."""
    pre = f"{prefix}." if prefix else ""
    return [(pre + n, p) for n, p in layernorm_affine_parameters(module) if keep(n.rsplit(".", 1)[0])]


def freeze_all(modules: Iterable[nn.Module]) -> None:
    """Eval mode and ``requires_grad=False`` for every parameter of ``modules``.

    The methods never change ``requires_grad``: they only read ``model.adaptable_parameters()`` and update
    those tensors.  So the adapter that freezes must then re-enable exactly its rule's parameters — which is
    what :func:`freeze_except_adaptable` does, and what every backbone adapter calls."""
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)


def freeze_except_adaptable(model: RetrievalModel, modules: Iterable[nn.Module]) -> None:
    """Freeze every parameter of ``modules`` (eval mode), then give gradients back to exactly
    ``model.adaptable_parameters()``: the one place a backbone adapter sets ``requires_grad``."""
    freeze_all(modules)
    for _, p in model.adaptable_parameters():
        p.requires_grad_(True)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine; a :class:`UserError` naming the fix
    otherwise (a misspelt name, CUDA without a CUDA GPU, ``cuda:7`` on a machine with fewer GPUs)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible to torch (driver, CUDA_VISIBLE_DEVICES?)")
            raise UserError(f"--device {device}: {why}; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {device}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                            f"(cuda:0 to cuda:{n - 1})")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise UserError(f"--device {device}: unsupported device type {dev.type!r}; use cpu or cuda")
    if not available():
        raise UserError(f"--device {device}: no {dev.type} device is available here; use --device cpu")
    return dev
