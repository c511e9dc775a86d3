"""open_clip backbones (``--model openclip:ARCH``), any architecture name with a pretrained tag or a
local checkpoint.

Adaptable parameters (TCR's choice): image queries — ``visual.ln_pre``, every visual block's
``ln_1`` / ``ln_2``, ``visual.ln_post``; text queries — every text block's ``ln_1`` / ``ln_2``, not
``ln_final``.

QuickGELU: OpenAI's CLIP weights were trained with QuickGELU, and open_clip builds ``ViT-B-16``
with nn.GELU unless told otherwise (it only warns).  :func:`needs_quick_gelu` decides: the
``-quickgelu`` architecture names and every pretrained tag whose open_clip metadata says
``quick_gelu`` (e.g. ``openai``) get it, as does OpenAI's own TorchScript checkpoint file; any other
local file holding OpenAI weights needs ``quick_gelu=True`` (or the ``-quickgelu`` name).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from qshift.models.dual_tower import DualTowerModel, freeze_all, named_layernorms
from qshift.models.preprocess import check_texts, images_to_tensor, tcr_transform


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (the format of OpenAI's released CLIP checkpoints)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def needs_quick_gelu(arch: str, pretrained: str | None) -> bool:
    """Whether ``arch`` with ``pretrained`` (a tag or a file) must use QuickGELU."""
    import open_clip

    if arch.lower().endswith("-quickgelu"):
        return True
    if pretrained is None:
        return False
    if Path(pretrained).is_file():
        return is_torchscript(pretrained)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
    return bool(cfg.get("quick_gelu", False))


def openclip_rule(modality: str):
    """The adaptable-parameter rule for an open_clip query tower."""
    def image_rule(visual):
        return named_layernorms(visual, lambda n: n in ("ln_pre", "ln_post") or n.endswith((".ln_1", ".ln_2")),
                                prefix="visual")

    def text_rule(text):
        return named_layernorms(text, lambda n: n.endswith((".ln_1", ".ln_2")) and n != "ln_final")

    return image_rule if modality == "image" else text_rule


class _TextTower(torch.nn.Module):
    """The text-side modules of an open_clip CLIP, as one module (for parameter selection)."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final


def load_openclip(arch: str, pretrained: str | None = None, query_modality: str = "image", *,
                  preprocess: str = "model", device: str = "cpu", quick_gelu: bool | None = None,
                  precision: str = "fp32", autocast: str | None = None, grad_checkpointing: bool = False,
                  cache_dir: str | None = None) -> DualTowerModel:
    """An open_clip model as a RetrievalModel; ``pretrained`` is a tag or a local checkpoint path.

    ``arch`` is a registered open_clip name or the path of a model-config JSON (registered on the fly).
    ``autocast`` (``bf16`` / ``fp16``) and ``grad_checkpointing`` are for large towers.
    """
    import open_clip

    if arch.endswith(".json") and Path(arch).is_file():  # a custom architecture config, registered by file
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; e.g. {', '.join(open_clip.list_models()[:5])}, …")
    if pretrained is not None and (("/" in pretrained) or pretrained.endswith((".pt", ".bin", ".safetensors"))) \
            and not Path(pretrained).is_file():
        raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
    qg = needs_quick_gelu(arch, pretrained) if quick_gelu is None else quick_gelu
    if pretrained is not None and Path(pretrained).is_file() and is_torchscript(pretrained):
        from open_clip.openai import load_openai_model

        model = load_openai_model(pretrained, precision=precision, device=device, jit=False)
        own = open_clip.image_transform(model.visual.image_size, is_train=False)
    else:
        model, _, own = open_clip.create_model_and_transforms(arch, pretrained=pretrained, precision=precision,
                                                              device=device, force_quick_gelu=qg,
                                                              cache_dir=cache_dir)
    model.quick_gelu = qg  # recorded for result files and tests
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = own if preprocess == "model" else tcr_transform(int(size))
    if preprocess not in ("model", "tcr"):
        raise ValueError(f"preprocess must be 'model' or 'tcr', got {preprocess!r}")
    text_tower = model.text if hasattr(model, "text") else _TextTower(model)  # CustomTextCLIP keeps it apart
    freeze_all([model])

    def enc_image(batch: Any) -> torch.Tensor:
        return model.encode_image(images_to_tensor(batch, transform, device))

    def enc_text(batch: Any) -> torch.Tensor:
        return model.encode_text(tokenizer(check_texts(batch)).to(device))

    rm = DualTowerModel({"image": enc_image, "text": enc_text}, {"image": model.visual, "text": text_tower},
                        query_modality, adaptable=openclip_rule(query_modality), device=device, autocast=autocast)
    for _, p in rm.adaptable_parameters():
        p.requires_grad_(True)
    rm.clip = model
    return rm
