"""Composed image retrieval (CIR) on real CLIP towers: open_clip (``openclip:ARCH``) or a Hugging Face CLIP
folder (``hf-clip:PATH``), fused by a CLIP4Cir combiner checkpoint or by a training-free fusion.

CLIP4Cir (Baldrati et al., 2022) saves its two stages as ``{"CLIP": state_dict, ...}`` (the fine-tuned CLIP,
OpenAI CLIP parameter names, which open_clip's OpenAI-style models share) and ``{"Combiner": state_dict, ...}``
(its fusion MLP).  :class:`Clip4CirCombiner` is our own module with CLIP4Cir's parameter names, so that
checkpoint loads as is; :func:`load_real_cir_model` builds the RetrievalModel.

Fusions: ``combiner`` (a combiner checkpoint; it reads the towers' *unnormalised* features, as CLIP4Cir
trains it), ``sum`` = normalise(î + t̂) and ``interp`` = normalise((1 − alpha) · î + alpha · t̂) over the
L2-normalised features (as :func:`qshift.models.cir_model.fuse`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qshift.errors import UserError
from qshift.models.cir_model import FUSIONS, fuse, split_composed_batch
from qshift.models.dual_tower import freeze_except_adaptable
from qshift.models.preprocess import images_to_tensor, tcr_transform

log = logging.getLogger(__name__)

#: the keys a CLIP4Cir combiner state dict must hold (``dynamic_scalar`` = Linear, ReLU, Dropout, Linear, Sigmoid)
COMBINER_KEYS: tuple[str, ...] = ("text_projection_layer.weight", "image_projection_layer.weight",
                                  "combiner_layer.weight", "output_layer.weight", "dynamic_scalar.0.weight",
                                  "dynamic_scalar.3.weight")
#: what an OpenAI TorchScript state dict carries besides parameters (OpenAI's build_model drops them too)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
#: CLIP4Cir's TargetPad ratio
TARGET_PAD_RATIO = 1.25


class Clip4CirCombiner(nn.Module):
    """CLIP4Cir's Combiner, with its parameter names.

    ``t' = dropout(relu(text_projection_layer(t)))``, ``i' = dropout(relu(image_projection_layer(i)))``,
    ``c = dropout(relu(combiner_layer([t', i'])))``, ``g = dynamic_scalar([t', i'])`` ∈ (0, 1) and the output
    ``normalise(output_layer(c) + g · t + (1 − g) · i)``.  No LayerNorm: test-time LayerNorm adaptation
    leaves it as loaded."""

    def __init__(self, clip_feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.clip_feature_dim, self.projection_dim, self.hidden_dim = clip_feature_dim, projection_dim, hidden_dim
        self.text_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.image_projection_layer = nn.Linear(clip_feature_dim, projection_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, clip_feature_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.dynamic_scalar = nn.Sequential(nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(hidden_dim, 1), nn.Sigmoid())

    @property
    def embed_dim(self) -> int:
        return self.clip_feature_dim

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, d] reference-image and text features (unnormalised CLIP features) → fused, L2-normalised [B, d]."""
        t = self.dropout1(F.relu(self.text_projection_layer(text)))
        i = self.dropout2(F.relu(self.image_projection_layer(image)))
        raw = torch.cat([t, i], dim=-1)
        combined = self.dropout3(F.relu(self.combiner_layer(raw)))
        g = self.dynamic_scalar(raw)
        return F.normalize(self.output_layer(combined) + g * text + (1 - g) * image, dim=-1)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str = "the state dict") -> "Clip4CirCombiner":
        """A combiner sized from ``state`` (CLIP4Cir's names), with ``state`` loaded, in eval mode."""
        missing = [k for k in COMBINER_KEYS if k not in state]
        if missing:
            shown = ", ".join(sorted(state)[:4]) + (", …" if len(state) > 4 else "")
            raise UserError(f"{where} is not a CLIP4Cir combiner: no {missing[0]!r} (its keys: {shown or 'none'})")
        try:
            proj, dim = (int(x) for x in state["text_projection_layer.weight"].shape)
            hidden = int(state["combiner_layer.weight"].shape[0])
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{where}: 'text_projection_layer.weight' is not a 2-D tensor") from e
        combiner = cls(dim, proj, hidden)
        try:
            combiner.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise UserError(f"{where}: the tensors do not form a combiner ({_mismatch(str(e))})") from e
        return combiner.eval()


def _mismatch(message: str) -> str:
    from qshift.models.openclip_model import _state_dict_mismatch  # the same one-line summary as open_clip's

    return _state_dict_mismatch(message)


def _read(path: str | Path, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file, another format, a pickle with code in it
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{p}: cannot be read as a {what} ({type(e).__name__}: {first[:160]})") from e


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without DataParallel's ``module.`` prefix (when every key has it)."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _tensors(state: Any) -> bool:
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_combiner(path: str | Path, device: str | torch.device = "cpu") -> Clip4CirCombiner:
    """A CLIP4Cir combiner from ``path``: ``{"Combiner": state_dict, ...}`` (what CLIP4Cir's combiner_train.py
    saves), or a bare state dict; a DataParallel ``module.`` prefix is dropped."""
    payload = _read(path, "combiner checkpoint")
    if isinstance(payload, dict) and "Combiner" in payload:
        state = payload["Combiner"]
    elif _tensors(payload):
        state = payload
    else:
        keys = ", ".join(map(str, list(payload)[:5])) if isinstance(payload, dict) else type(payload).__name__
        raise UserError(f"{path}: not a combiner checkpoint (found {keys}); expected {{'Combiner': state_dict}} as "
                        "CLIP4Cir saves it, or a bare combiner state dict")
    if not _tensors(state):
        raise UserError(f"{path}: 'Combiner' is not a state dict of tensors")
    return Clip4CirCombiner.from_state_dict(_strip_module(state), where=str(path)).to(device)


def read_clip4cir_clip(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The CLIP state dict of a CLIP4Cir fine-tuned checkpoint ``{"CLIP": state_dict, ...}`` at ``path``
    (``module.`` prefix and OpenAI's non-parameter entries dropped); None for any other file (a TorchScript
    archive, safetensors, an open_clip checkpoint), which open_clip's own loading reads."""
    from qshift.models.openclip_model import is_torchscript

    p = Path(path)
    if not p.is_file() or p.suffix in (".safetensors", ".npz") or is_torchscript(p):
        return None
    payload = None
    for mmap in (True, False):  # mmap reads only what is used, but not the legacy (pre-zip) format
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # not ours to judge: open_clip's own loading reports it
            continue
    if not (isinstance(payload, dict) and "CLIP" in payload):
        return None
    state = payload["CLIP"]
    if not _tensors(state):
        raise UserError(f"{p}: 'CLIP' is not a state dict of tensors (CLIP4Cir saves clip_model.state_dict())")
    return {k: v for k, v in _strip_module(state).items() if k not in _OPENAI_EXTRA_KEYS}


def load_clip_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load an OpenAI-named CLIP state dict into an open_clip model, every key matching (else a UserError)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{where}: its 'CLIP' weights do not match this open_clip architecture ({_mismatch(str(e))}); "
                        "pass the architecture CLIP4Cir fine-tuned (e.g. RN50x4, ViT-B-32)") from e


def target_pad(image: Image.Image, ratio: float = TARGET_PAD_RATIO) -> Image.Image:
    """CLIP4Cir's TargetPad: an image whose longer / shorter side exceeds ``ratio`` is padded (black, centred)
    so that the ratio is ``ratio``; others are returned as they are."""
    w, h = image.size
    long, short = max(w, h), min(w, h)
    if short == 0 or long / short <= ratio:
        return image
    target = int(long / ratio)
    pad_w, pad_h = max(0, target - w), max(0, target - h)
    canvas = Image.new(image.mode, (w + pad_w, h + pad_h))
    canvas.paste(image, (pad_w // 2, pad_h // 2))
    return canvas


# ------------------------------------------------------------------------------ towers

@dataclass
class CLIPTowers:
    """What :class:`RealComposedModel` needs from a CLIP: the query-side image tower ``image`` (pixels → [B, d]
    unnormalised), ``encode_text`` (texts → [B, d] unnormalised), the pixel ``transform`` (PIL → tensor), the
    whole model ``root`` (to freeze), the rule's adaptable parameters, the embedding size, device and an
    autocast context."""

    image: nn.Module
    encode_text: Callable[[list[str]], torch.Tensor]
    text_module: nn.Module
    transform: Callable
    root: nn.Module
    adaptable: Callable[[], list[tuple[str, nn.Parameter]]]
    embed_dim: int
    device: torch.device
    context: Callable[[], Any] = contextlib.nullcontext


class _HFImageTower(nn.Module):
    """A transformers CLIP's vision tower and projection as one module: pixels → projected pooled features."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class RealComposedModel:
    """RetrievalModel for composed image retrieval (direction ``cir``) over a real CLIP.

    A query batch is a list of ``(image, text)`` pairs (image: uint8 [H, W, 3], a PIL image or a path).
    ``encode_query`` encodes the references with the query-side image tower and the texts with the text
    tower and fuses them (``combiner`` / ``sum`` / ``interp``); ``encode_gallery`` uses ``gallery_image``, a
    frozen deep copy of the *source* image tower made here, so adapting the query side never changes the
    gallery's embeddings.

    Adaptable parameters (the rule): the LayerNorms the open_clip / Hugging Face loaders adapt for image
    queries *and* those they adapt for text queries — open_clip: ``visual.ln_pre``, every visual block's
    ``ln_1`` / ``ln_2``, ``visual.ln_post`` and every text block's ``ln_1`` / ``ln_2`` (not ``ln_final``);
    transformers CLIP: ``vision_model.pre_layrnorm``, every vision layer's ``layer_norm1`` / ``layer_norm2``,
    ``post_layernorm`` and every text layer's ``layer_norm1`` / ``layer_norm2`` (not ``final_layer_norm``).
    Named as in the backbone's state dict.  Nothing of the gallery copy and nothing of the combiner (CLIP4Cir's
    has no LayerNorm).  Those require gradients, every other parameter does not.
    """

    query_modality = "image+text"
    gallery_modality = "image"
    #: docs/method.md §2's rate for CLIP image and text queries
    default_lr: float = 3e-4

    def __init__(self, towers: CLIPTowers, combiner: Clip4CirCombiner | None = None, fusion: str = "combiner",
                 alpha: float = 0.5) -> None:
        _check_fusion(fusion, alpha, combiner is not None)
        if combiner is not None and combiner.embed_dim != towers.embed_dim:
            raise UserError(f"the combiner fuses {combiner.embed_dim}-d features; this CLIP's are {towers.embed_dim}-d "
                            "(a combiner trained on another CLIP?)")
        self.towers = towers
        self.combiner = combiner.to(towers.device).eval() if combiner is not None else None
        self.fusion, self.alpha = fusion, float(alpha)
        self.gallery_image = copy.deepcopy(towers.image).eval()
        modules = [towers.root, self.gallery_image] + ([self.combiner] if self.combiner is not None else [])
        freeze_except_adaptable(self, modules)

    @property
    def embed_dim(self) -> int:
        """The joint embedding's dimension."""
        return self.towers.embed_dim

    @property
    def device(self) -> torch.device:
        return self.towers.device

    def adaptable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = self.towers.adaptable()
        if not params:
            raise UserError("the adaptable-parameter rule selected no LayerNorm in this CLIP's towers")
        return params

    def query_tower(self) -> nn.Module:
        """The query side: the image tower, the text tower (and the combiner)."""
        parts = [self.towers.image, self.towers.text_module] + ([self.combiner] if self.combiner is not None else [])
        return nn.ModuleList(parts)

    def _pixels(self, images: Any) -> torch.Tensor:
        return images_to_tensor(images, self.towers.transform, self.device)

    def _split_batch(self, batch: Any) -> tuple[list[Any], list[str]]:
        images, texts = split_composed_batch(batch)
        for k, image in enumerate(images):
            if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8):
                raise UserError(f"composed query {k}: the image must be uint8 [H, W, 3], got {image.dtype} "
                                f"{tuple(image.shape)}")
            if not isinstance(image, (np.ndarray, Image.Image, str, Path)):
                raise UserError(f"composed query {k}: the image must be a uint8 array, a PIL image or a path, got "
                                f"{type(image).__name__}")
        return images, texts

    def encode_query(self, batch: list[tuple[Any, str]]) -> torch.Tensor:
        """(reference image, modification text) pairs → fused, L2-normalised [B, d] (differentiable)."""
        images, texts = self._split_batch(batch)
        pixels = self._pixels(images)
        with self.towers.context():
            zi = self.towers.image(pixels)
            zt = self.towers.encode_text(texts)
        zi, zt = zi.float(), zt.float()
        if self.fusion == "combiner":
            return self.combiner(zi, zt).float()
        return fuse(F.normalize(zi, dim=-1), F.normalize(zt, dim=-1), self.fusion, None, self.alpha)

    @torch.no_grad()
    def encode_gallery(self, images: Any) -> torch.Tensor:
        """Gallery images (uint8 [N, H, W, 3], or a list of arrays / PIL images / paths) → L2-normalised
        [N, d] by the frozen copy of the source image tower."""
        pixels = self._pixels(images)
        with self.towers.context():
            z = self.gallery_image(pixels)
        return F.normalize(z.float(), dim=-1)


def _check_fusion(fusion: str, alpha: float, has_combiner: bool) -> None:
    if fusion not in FUSIONS:
        raise UserError(f"unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
    if fusion == "combiner" and not has_combiner:
        raise UserError("fusion 'combiner' needs a combiner checkpoint (--combiner FILE: CLIP4Cir's "
                        "{'Combiner': state_dict}); or use the training-free fusion 'sum' / 'interp'")
    if fusion != "combiner" and has_combiner:
        raise UserError(f"fusion {fusion!r} is training-free; pass no combiner")
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")


def _padded(transform: Callable, ratio: float | None) -> Callable:
    if ratio is None:
        return transform
    if ratio < 1.0:
        raise UserError(f"target_pad must be a ratio ≥ 1 (CLIP4Cir uses {TARGET_PAD_RATIO}), got {ratio}")
    return lambda im: transform(target_pad(im, ratio))


def _names(root: nn.Module, params: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """``params`` renamed as in ``root``'s state dict (their own names when ``root`` does not hold them)."""
    full = {id(p): n for n, p in root.named_parameters()}
    return [(full.get(id(p), n), p) for n, p in params]


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """Warnings of these loggers (``""``: the root logger, where open_clip logs) silenced for the block."""
    loggers = [logging.getLogger(n or None) for n in logger_names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before):
            lg.setLevel(level)


def _openclip_towers(arch: str, weights: str | None, device: str, target_pad_ratio: float | None,
                     options: dict[str, Any]) -> CLIPTowers:
    from qshift.models import openclip_model as oc  # optional dependency (qshift[backbones])

    allowed = {n for n, p in inspect.signature(oc.load_openclip).parameters.items() if p.kind is p.KEYWORD_ONLY}
    _known_options(f"openclip:{arch}", options, allowed - {"device"})
    state = read_clip4cir_clip(weights) if weights is not None else None
    if state is not None:
        # CLIP4Cir fine-tunes OpenAI's CLIP: QuickGELU unless told otherwise; the weights are loaded just below,
        # so open_clip's "untrained model" warning for the random start does not apply
        options = {"quick_gelu": True, **options}
        with _quiet(oc.__name__, ""):
            rm = oc.load_openclip(arch, oc.RANDOM_WEIGHTS, "image", device=device, **options)
        load_clip_state(rm.clip, state, str(weights))
    else:
        rm = oc.load_openclip(arch, weights, "image", device=device, **options)
    model = rm.clip
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    if options.get("preprocess", "model") == "tcr":
        transform = tcr_transform(size)
    elif getattr(model.visual, "preprocess_cfg", None):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    else:
        import open_clip

        transform = open_clip.image_transform(size, is_train=False)
    text_tower = rm.towers["text"]

    def adaptable() -> list[tuple[str, nn.Parameter]]:
        return _names(model, oc.openclip_rule("image")(model.visual) + oc.openclip_rule("text")(text_tower))

    embed = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[-1])
    return CLIPTowers(model.visual, rm.encoders["text"], text_tower, _padded(transform, target_pad_ratio), model,
                      adaptable, embed, rm.device, rm._ctx)


def _hf_towers(path: str, device: str, target_pad_ratio: float | None, options: dict[str, Any]) -> CLIPTowers:
    from qshift.models import hf_models as hf  # optional dependency (qshift[backbones])

    allowed = {n for n, p in inspect.signature(hf.load_hf_clip).parameters.items() if p.kind is p.KEYWORD_ONLY}
    _known_options(f"hf-clip:{path}", options, allowed - {"device"})
    rm = hf.load_hf_clip(path, "image", device=device, **options)
    model = rm.hf_model
    size = int(model.config.vision_config.image_size)
    if options.get("preprocess", "model") == "tcr":
        transform = tcr_transform(size)
    else:
        transform = hf._processor_transform(Path(path), size, hf.CLIP_MEAN, hf.CLIP_STD)
    image = _HFImageTower(model.vision_model, model.visual_projection)

    def adaptable() -> list[tuple[str, nn.Parameter]]:
        return _names(model, hf.clip_rule("image")(model.vision_model) + hf.clip_rule("text")(model.text_model))

    return CLIPTowers(image, rm.encoders["text"], model.text_model, _padded(transform, target_pad_ratio), model,
                      adaptable, int(model.config.projection_dim), rm.device, rm._ctx)


def _known_options(spec: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"{spec}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(it takes {', '.join(sorted(allowed | {'target_pad'}))})")


def load_real_cir_model(spec: str, weights: str | Path | None = None, combiner: str | Path | None = None,
                        fusion: str = "combiner", alpha: float = 0.5, device: str = "cpu",
                        **options: Any) -> RealComposedModel:
    """A composed-retrieval RetrievalModel over a real CLIP.

    ``spec``: ``openclip:ARCH`` (``weights``: a CLIP4Cir ``{"CLIP": state_dict}`` file — QuickGELU by default,
    as OpenAI's CLIP — or anything :func:`qshift.models.openclip_model.load_openclip` takes: a checkpoint, a
    cached tag, ``"random"``) or ``hf-clip:PATH`` (a transformers CLIP folder; no ``weights``).  ``combiner``:
    a CLIP4Cir combiner checkpoint, required by (and only by) ``fusion="combiner"``; ``sum`` / ``interp``
    (text weight ``alpha``) are training-free.  ``options`` go to the backbone loader (``preprocess``,
    ``quick_gelu``, ``precision``, ``autocast``, …), plus ``target_pad`` (a ratio, e.g. CLIP4Cir's 1.25:
    pad elongated images before the transform)."""
    _check_fusion(fusion, alpha, combiner is not None)
    ratio = options.pop("target_pad", None)
    ratio = None if ratio is None else float(ratio)
    kind, _, rest = spec.partition(":")
    if kind == "openclip" and rest:
        towers = _openclip_towers(rest, None if weights is None else str(weights), device, ratio, options)
    elif kind == "hf-clip" and rest:
        if weights is not None:
            raise UserError(f"--model {spec} reads its weights from the folder {rest}; drop --weights {weights}")
        towers = _hf_towers(rest, device, ratio, options)
    else:
        raise UserError(f"unknown model spec {spec!r} for composed retrieval; expected openclip:ARCH or hf-clip:PATH")
    comb = load_combiner(combiner, towers.device) if combiner is not None else None
    return RealComposedModel(towers, comb, fusion=fusion, alpha=alpha)


__all__ = ["Clip4CirCombiner", "CLIPTowers", "RealComposedModel", "load_combiner", "load_real_cir_model",
           "read_clip4cir_clip", "load_clip_state", "target_pad"]
