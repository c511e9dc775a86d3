"""Hugging Face ``transformers`` backbones from a local directory: ``CLIPModel`` (``--model
hf-clip:PATH``) and ``BlipForImageTextRetrieval`` (``--model hf-blip:PATH``).

BLIP is used through its contrastive (ITC) embeddings — the projected, normalised CLS features of
each tower, no ITM re-ranking — which is what TCR evaluates.

Adaptable parameters (TCR's choices):
- CLIP image queries: ``vision_model.pre_layrnorm`` (sic, the transformers name), every encoder
  layer's ``layer_norm1`` / ``layer_norm2``, ``post_layernorm``; CLIP text queries: every text encoder
  layer's ``layer_norm1`` / ``layer_norm2``, not ``final_layer_norm``;
- BLIP image queries: every LayerNorm of the ViT; BLIP text queries: every LayerNorm of the BERT text
  encoder (embeddings, self-attention and output; the cross-attention ones get no gradient in ITC).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qshift.models.dual_tower import DualTowerModel, freeze_all, named_layernorms
from qshift.models.preprocess import CLIP_MEAN, CLIP_STD, check_texts, images_to_tensor, tcr_transform

def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {p} (expected the output of save_pretrained)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: no config.json; is this a Hugging Face model directory?")
    return p


def _processor_transform(path: Path, size: int, mean, std):
    """The model's own image transform from its saved image processor (resize + crop + normalise)."""
    from torchvision import transforms as T

    cfg_file = path / "preprocessor_config.json"
    if cfg_file.is_file():
        import json

        cfg = json.loads(cfg_file.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        s = cfg.get("size", size)
        short = s.get("shortest_edge") if isinstance(s, dict) else s
        height = s.get("height") if isinstance(s, dict) else None
        crop = cfg.get("crop_size")
        crop = (crop.get("height") if isinstance(crop, dict) else crop) if cfg.get("do_center_crop") else None
        if height:  # BLIP-style: resize to a square
            return T.Compose([T.Resize((height, s.get("width", height)), interpolation=T.InterpolationMode.BICUBIC),
                              T.ToTensor(), T.Normalize(mean, std)])
        steps = [T.Resize(short or size, interpolation=T.InterpolationMode.BICUBIC)]
        if crop:
            steps.append(T.CenterCrop(crop))
        return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    return tcr_transform(size, mean, std)


def _tokenizer(path: Path, max_length: int):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{path}: no tokenizer files (vocab.json + merges.txt for CLIP, vocab.txt for BLIP): {e}")

    def run(texts):
        return tok(check_texts(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return run


def clip_rule(modality: str):
    if modality == "image":
        return lambda vm: named_layernorms(vm, lambda n: n in ("pre_layrnorm", "post_layernorm")
                                           or n.endswith((".layer_norm1", ".layer_norm2")), prefix="vision_model")
    return lambda tm: named_layernorms(tm, lambda n: n.endswith((".layer_norm1", ".layer_norm2")), prefix="text_model")


#: docs/method.md §2: BLIP text queries adapt at 3e-5 (TCR's setting), not the 3e-4 of every other query
BLIP_TEXT_LR = 3e-5


def blip_rule(modality: str):
    prefix = "vision_model" if modality == "image" else "text_encoder"
    return lambda tower: named_layernorms(tower, lambda n: True, prefix=prefix)


def _load(cls, path: str | Path, what: str, device: str, grad_checkpointing: bool, preprocess: str):
    """(model, folder, image transform) for a saved transformers model, in eval mode on ``device``."""
    if preprocess not in ("model", "tcr"):
        raise ValueError(f"preprocess must be 'model' or 'tcr', got {preprocess!r}")
    p = _check_dir(path, what)
    model = cls.from_pretrained(str(p)).to(device).eval()
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    size = model.config.vision_config.image_size
    # tcr: square resize to the config's size (384 for the BLIP retrieval checkpoints), CLIP mean / std
    transform = _processor_transform(p, size, CLIP_MEAN, CLIP_STD) if preprocess == "model" else tcr_transform(size)
    freeze_all([model])
    return model, p, transform


def _wrap(model, encoders, towers, query_modality: str, rule, device: str, autocast: str | None,
          default_lr: float | None = None) -> DualTowerModel:
    rm = DualTowerModel(encoders, towers, query_modality, adaptable=rule(query_modality), device=device,
                        autocast=autocast, default_lr=default_lr)
    for _, prm in rm.adaptable_parameters():
        prm.requires_grad_(True)
    rm.hf_model = model
    return rm


def load_hf_clip(path: str | Path, query_modality: str = "image", *, preprocess: str = "model",
                 device: str = "cpu", autocast: str | None = None, grad_checkpointing: bool = False) -> DualTowerModel:
    """A ``transformers`` CLIPModel saved in ``path`` as a RetrievalModel."""
    from transformers import CLIPModel

    model, p, transform = _load(CLIPModel, path, "CLIP model", device, grad_checkpointing, preprocess)
    tok = _tokenizer(p, model.config.text_config.max_position_embeddings)

    def enc_image(batch: Any) -> torch.Tensor:
        out = model.vision_model(pixel_values=images_to_tensor(batch, transform, device))
        return model.visual_projection(out.pooler_output)

    def enc_text(batch: Any) -> torch.Tensor:
        t = {k: v.to(device) for k, v in tok(batch).items()}
        out = model.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        return model.text_projection(out.pooler_output)

    return _wrap(model, {"image": enc_image, "text": enc_text}, {"image": model.vision_model, "text": model.text_model},
                 query_modality, clip_rule, device, autocast)


def load_hf_blip(path: str | Path, query_modality: str = "image", *, preprocess: str = "model",
                 device: str = "cpu", autocast: str | None = None, grad_checkpointing: bool = False) -> DualTowerModel:
    """A ``transformers`` BlipForImageTextRetrieval saved in ``path``, through its ITC embeddings."""
    from transformers import BlipForImageTextRetrieval

    model, p, transform = _load(BlipForImageTextRetrieval, path, "BLIP model", device, grad_checkpointing, preprocess)
    tok = _tokenizer(p, 35)

    def enc_image(batch: Any) -> torch.Tensor:
        hidden = model.vision_model(pixel_values=images_to_tensor(batch, transform, device))[0]
        return model.vision_proj(hidden[:, 0, :])

    def enc_text(batch: Any) -> torch.Tensor:
        t = {k: v.to(device) for k, v in tok(batch).items()}
        hidden = model.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"])[0]
        return model.text_proj(hidden[:, 0, :])

    return _wrap(model, {"image": enc_image, "text": enc_text},
                 {"image": model.vision_model, "text": model.text_encoder}, query_modality, blip_rule, device, autocast,
                 default_lr=BLIP_TEXT_LR if query_modality == "text" else None)
