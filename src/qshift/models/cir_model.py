"""The embedded CIR world's source model: the world dual encoder's towers and a fusion of their features.

A composed query (reference image, modification text) is encoded by the world model's image and text
towers (:mod:`qshift.models.world_model`) and fused into one L2-normalised embedding that retrieves the
target image.  The fusion is a :class:`Combiner` shaped like CLIP4Cir's (Baldrati et al., 2022), trained
with the towers frozen (``qshift train-cir-model``, :mod:`qshift.train.cir_training`; weights and card in
``qshift/models/weights/cir_combiner.*``), or one of two training-free fusions (``sum``, ``interp``).
"""
from __future__ import annotations

import copy
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qshift.errors import UserError
from qshift.models.dual_tower import freeze_except_adaptable
from qshift.models.protocol import layernorm_affine_parameters
from qshift.models.world_model import WorldDualEncoder, load_world_model

SHIPPED_COMBINER = "cir_combiner.pt"
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
        if not isinstance(batch, (list, tuple)) or len(batch) == 0:
            what = "an empty list" if isinstance(batch, (list, tuple)) else type(batch).__name__
            raise UserError(f"a composed query batch is a non-empty list of (image, text) pairs, got {what}")
        images, texts = [], []
        for k, pair in enumerate(batch):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise UserError(f"composed query {k} is not an (image, text) pair: {type(pair).__name__}")
            image, text = pair
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise UserError(f"composed query {k}: the image must be uint8 [H, W, 3], got {image.dtype} "
                                f"{tuple(image.shape)}")
            if not isinstance(text, str):
                raise UserError(f"composed query {k}: the text must be a str, got {type(text).__name__}")
            images.append(image)
            texts.append(text)
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


def shipped_combiner_path() -> Path:
    return Path(str(resources.files("qshift.models") / "weights" / SHIPPED_COMBINER))


def save_combiner(combiner: Combiner, path: str | Path) -> str:
    """Write ``combiner``'s plain fp32 state dict atomically; returns the file's SHA-256."""
    from qshift.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({k: v.detach().float().cpu().clone() for k, v in combiner.state_dict().items()}, tmp)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_combiner(path: str | Path) -> Combiner:
    """The combiner saved at ``path`` (a plain state dict, read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIR combiner weights not found at {path}; check the path, or make them with "
                                "`qshift train-cir-model --out FILE`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, another format, a pickle with code in it
        raise UserError(f"{path} is not a readable CIR combiner checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a CIR combiner checkpoint (expected a plain state dict of tensors, as "
                        "`qshift train-cir-model` writes)")
    return Combiner.from_state_dict(state, where=str(path))


def load_cir_model(path: str | Path | None = None, fusion: str = "combiner", alpha: float = 0.5,
                   world_path: str | Path | None = None, device: str | torch.device = "cpu") -> ComposedRetrievalModel:
    """The shipped CIR source model: the world dual encoder (``load_world_model(world_path)``) and the
    combiner saved at ``path`` (default the shipped ``cir_combiner.pt``); the training-free fusions
    (``sum``, ``interp``) read no combiner file."""
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    combiner = None
    if fusion == "combiner":
        p = Path(path) if path is not None else shipped_combiner_path()
        if path is None and not p.is_file():
            raise FileNotFoundError(f"CIR combiner weights not found at {p}; the shipped weights are missing: "
                                    "reinstall qshift")
        combiner = load_combiner(p)
    encoder = load_world_model(world_path).to(device)
    return ComposedRetrievalModel(encoder, combiner, fusion=fusion, alpha=alpha)
