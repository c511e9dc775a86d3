"""The embedded CIR world's source model: the world dual encoder's towers and a fusion of their features.

A composed query (reference image, modification text) is encoded by the world model's image and text
towers (:mod:`qshift.models.world_model`) and fused into one L2-normalised embedding that retrieves the
target image.  The fusion is a :class:`Combiner` shaped like CLIP4Cir's (Baldrati et al., 2022), trained
with the towers' top layers lightly tuned (``qshift train-cir-model``, :mod:`qshift.train.cir_training`;
one checkpoint with towers and combiner, and its card, in ``qshift/models/weights/cir_model.*``), or one
of two training-free fusions (``sum``, ``interp``) over the untuned world towers.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qshift.errors import UserError
from qshift.models.checkpoint import half_state, read_checkpoint, save_checkpoint
from qshift.models.dual_tower import freeze_except_adaptable
from qshift.models.protocol import layernorm_affine_parameters
from qshift.models.world_model import WorldDualEncoder, load_world_model

SHIPPED_CIR_MODEL = "cir_model.pt"
#: the ``format`` tag of a CIR checkpoint (:func:`save_cir_model`)
CIR_FORMAT = "qshift-cir-v1"
FUSIONS: tuple[str, ...] = ("combiner", "sum", "interp")


class Combiner(nn.Module):
    """CLIP4Cir-style fusion of an image and a text feature (both [B, d], L2-normalised).

    Each feature is projected (linear → ``ln_image`` / ``ln_text`` → ReLU → dropout); the concatenation
    goes through an MLP (linear → ``ln_mix`` → ReLU → dropout → linear to d) to the *combined* feature and
    through a second MLP to a scalar gate g = sigmoid(·) ∈ (0, 1); the output is
    ``normalise(combined + g · text + (1 − g) · image)`` (the gate mixes the input features, as CLIP4Cir's).
    LayerNorm is the only normalisation, so LayerNorm-only test-time adaptation reaches the fusion."""

    def __init__(self, embed_dim: int = 128, proj_dim: int = 256, hidden_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_dim, self.proj_dim, self.hidden_dim = embed_dim, proj_dim, hidden_dim
        self.image_proj = nn.Linear(embed_dim, proj_dim)
        self.text_proj = nn.Linear(embed_dim, proj_dim)
        self.ln_image = nn.LayerNorm(proj_dim)
        self.ln_text = nn.LayerNorm(proj_dim)
        self.mix = nn.Linear(2 * proj_dim, hidden_dim)
        self.ln_mix = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, embed_dim)
        self.gate_hidden = nn.Linear(2 * proj_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, d] image and text features → fused, L2-normalised [B, d]."""
        i = self.dropout(F.relu(self.ln_image(self.image_proj(image))))
        t = self.dropout(F.relu(self.ln_text(self.text_proj(text))))
        raw = torch.cat([i, t], dim=-1)
        combined = self.out(self.dropout(F.relu(self.ln_mix(self.mix(raw)))))
        g = torch.sigmoid(self.gate(self.dropout(F.relu(self.gate_hidden(raw)))))
        return F.normalize(combined + g * text + (1 - g) * image, dim=-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str = "the state dict") -> "Combiner":
        """A combiner whose sizes are read off ``state`` (a plain ``state_dict()``), with ``state`` loaded."""
        try:
            proj_dim, embed_dim = state["image_proj.weight"].shape
            hidden_dim = state["mix.weight"].shape[0]
        except (KeyError, AttributeError, ValueError, TypeError) as e:
            raise UserError(f"{where} is not a CIR combiner state dict (no 2-D 'image_proj.weight' / "
                            f"'mix.weight'; as `qshift train-cir-model` writes)") from e
        combiner = cls(int(embed_dim), int(proj_dim), int(hidden_dim))
        try:
            combiner.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).splitlines()[0])
            raise UserError(f"{where}: the tensors do not form a combiner ({first})") from e
        return combiner.eval()


def split_composed_batch(batch: Any) -> tuple[list[Any], list[str]]:
    """A composed query batch — a non-empty list of (image, text) pairs, each text a non-empty str — as its
    images (unchecked: each model checks the kinds it reads) and texts; a one-line UserError otherwise."""
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        what = "an empty list" if isinstance(batch, (list, tuple)) else type(batch).__name__
        raise UserError(f"a composed query batch is a non-empty list of (image, text) pairs, got {what}")
    images, texts = [], []
    for k, pair in enumerate(batch):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise UserError(f"composed query {k} is not an (image, text) pair: {type(pair).__name__}")
        image, text = pair
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"composed query {k}: the text must be a non-empty str, got {text!r}")
        images.append(image)
        texts.append(text)
    return images, texts


def fuse(image: torch.Tensor, text: torch.Tensor, fusion: str, combiner: Combiner | None = None,
         alpha: float = 0.5) -> torch.Tensor:
    """Fuse L2-normalised [B, d] features: ``combiner``; ``sum`` = normalise(image + text); ``interp`` =
    normalise((1 − alpha) · image + alpha · text)."""
    if fusion == "combiner":
        if combiner is None:
            raise ValueError("fusion 'combiner' needs a combiner")
        return combiner(image, text)
    if fusion == "sum":
        return F.normalize(image + text, dim=-1)
    if fusion == "interp":
        return F.normalize((1 - alpha) * image + alpha * text, dim=-1)
    raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")


class ComposedRetrievalModel:
    """RetrievalModel adapter for composed image retrieval (direction ``cir``) over a ``WorldDualEncoder``.

    A query batch is a list of ``(image, text)`` pairs (image: uint8 [H, W, 3] as the world renders it;
    text: the modification text).  ``encode_query`` encodes the references with the image tower ``visual``
    and the texts with ``text``, then fuses them (``fusion``: ``combiner``, ``sum`` or ``interp`` with the
    text weight ``alpha``).  ``encode_gallery`` (uint8 [N, H, W, 3]) uses ``gallery_visual``, a frozen deep
    copy of the *source* image tower made here, so adapting the query-side image tower never changes the
    gallery's embeddings.

    Adaptable parameters (the rule): every LayerNorm weight and bias of the query-side image tower
    (``visual.``), the text tower (``text.``) and the combiner (``combiner.``); nothing of the gallery copy.
    Those require gradients, every other parameter does not.
    """

    query_modality = "image+text"
    gallery_modality = "image"
    #: as the world model's (:class:`qshift.models.world_model.WorldRetrievalModel`)
    default_lr: float = 1e-3

    def __init__(self, encoder: WorldDualEncoder, combiner: Combiner | None = None, fusion: str = "combiner",
                 alpha: float = 0.5) -> None:
        if fusion not in FUSIONS:
            raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
        if fusion == "combiner" and combiner is None:
            raise UserError("fusion 'combiner' needs a combiner (load_cir_model loads the shipped one)")
        if fusion != "combiner" and combiner is not None:
            raise UserError(f"fusion {fusion!r} is training-free; pass no combiner")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {alpha}")
        if combiner is not None and combiner.embed_dim != encoder.cfg.embed_dim:
            raise UserError(f"the combiner fuses {combiner.embed_dim}-d features; the world model's are "
                            f"{encoder.cfg.embed_dim}-d")
        self.encoder = encoder.eval()
        self.combiner = combiner.to(encoder.logit_scale.device).eval() if combiner is not None else None
        self.fusion, self.alpha = fusion, float(alpha)
        self.gallery_visual = copy.deepcopy(encoder.visual).eval()
        freeze_except_adaptable(self, [m for m in (self.encoder, self.combiner, self.gallery_visual) if m is not None])

    @property
    def embed_dim(self) -> int:
        """The joint embedding's dimension."""
        return self.encoder.cfg.embed_dim

    @property
    def device(self) -> torch.device:
        return self.encoder.logit_scale.device

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = layernorm_affine_parameters(self.encoder.visual, prefix="visual")
        params += layernorm_affine_parameters(self.encoder.text, prefix="text")
        if self.combiner is not None:
            params += layernorm_affine_parameters(self.combiner, prefix="combiner")
        return params

    def _split_batch(self, batch: Any) -> tuple[np.ndarray, list[str]]:
        pairs, texts = split_composed_batch(batch)
        images = []
        for k, image in enumerate(pairs):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise UserError(f"composed query {k}: the image must be uint8 [H, W, 3], got {image.dtype} "
                                f"{tuple(image.shape)}")
            images.append(image)
        if len({im.shape for im in images}) > 1:
            raise UserError(f"the images of one composed query batch must share one size, got "
                            f"{sorted({im.shape for im in images})}")
        return np.stack(images), texts

    def encode_query(self, batch: list[tuple[np.ndarray, str]]) -> torch.Tensor:
        """(reference image, modification text) pairs → fused, L2-normalised [B, d] (differentiable)."""
        images, texts = self._split_batch(batch)
        pixels = self.encoder.preprocess_images(images).to(self.device)
        zi = F.normalize(self.encoder.visual(pixels), dim=-1)
        zt = self.encoder.encode_text(texts)
        return fuse(zi, zt, self.fusion, self.combiner, self.alpha)

    @torch.no_grad()
    def encode_gallery(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [N, H, W, 3] gallery images → L2-normalised [N, d] by the frozen source image tower."""
        pixels = self.encoder.preprocess_images(images).to(self.device)
        return F.normalize(self.gallery_visual(pixels), dim=-1)


def shipped_cir_model_path() -> Path:
    """The shipped CIR source model's checkpoint (``qshift/models/weights/cir_model.pt``)."""
    return Path(str(resources.files("qshift.models") / "weights" / SHIPPED_CIR_MODEL))


def save_cir_model(encoder: WorldDualEncoder, combiner: Combiner, path: str | Path, card: dict | None = None) -> str:
    """Write a CIR checkpoint atomically: the (tuned) world towers in the world model's own format (fp16
    ``config`` / ``state_dict``, so :meth:`WorldDualEncoder.load` reads it) plus ``combiner`` (fp32) and the
    model-card record (``card``, without its per-epoch history); returns the file's SHA-256."""
    record = {k: v for k, v in (card or {}).items() if k != "history"}
    save_checkpoint(path, {"format": CIR_FORMAT, "config": asdict(encoder.cfg),
                           "state_dict": half_state(encoder.state_dict()),
                           "combiner": half_state(combiner.state_dict(), half=False)}, record)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIR model weights not found at {path}; check the path, or make them with "
                                "`qshift train-cir-model --out FILE`")
    payload = read_checkpoint(path, "CIR model checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CIR_FORMAT \
            or not {"config", "state_dict", "combiner"} <= set(payload):
        raise UserError(f"{path} is not a qshift CIR model checkpoint (expected format {CIR_FORMAT!r} with the "
                        "keys 'config', 'state_dict' and 'combiner', as `qshift train-cir-model` writes)")
    return payload


def load_cir_model(path: str | Path | None = None, fusion: str = "combiner", alpha: float = 0.5,
                   world_path: str | Path | None = None, device: str | torch.device = "cpu") -> ComposedRetrievalModel:
    """The CIR source model saved at ``path`` (default: the shipped ``cir_model.pt``): its towers and
    combiner.  The training-free fusions (``sum``, ``interp``) read no combiner: they fuse the towers of
    ``path`` when it is given, else those of the world model (``load_world_model(world_path)``)."""
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    if fusion != "combiner" and path is None:
        encoder = load_world_model(world_path).to(device)
        return ComposedRetrievalModel(encoder, None, fusion=fusion, alpha=alpha)
    p = Path(path) if path is not None else shipped_cir_model_path()
    if path is None and not p.is_file():
        raise FileNotFoundError(f"CIR model weights not found at {p}; the shipped weights are missing: reinstall qshift")
    payload = _read_checkpoint(p)
    try:
        encoder = WorldDualEncoder.load(p)
    except ValueError as e:
        raise UserError(str(e)) from e
    combiner = Combiner.from_state_dict(payload["combiner"], where=str(p)) if fusion == "combiner" else None
    return ComposedRetrievalModel(encoder.to(device), combiner, fusion=fusion, alpha=alpha)
