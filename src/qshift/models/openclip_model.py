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

Weights are explicit: a checkpoint file, an open_clip pretrained tag whose file is already in the local
cache (qshift never lets open_clip download), or ``"random"`` for untrained weights (logged as a warning).
Nothing given is an error, never a silently random model.
"""
from __future__ import annotations

import difflib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from qshift.errors import UserError
from qshift.models.dual_tower import DualTowerModel, freeze_except_adaptable, named_layernorms, resolve_device
from qshift.models.preprocess import PREPROCESS_MODES, check_texts, images_to_tensor, tcr_transform

log = logging.getLogger(__name__)

#: the ``weights`` value that asks for an untrained (randomly initialised) model, on purpose
RANDOM_WEIGHTS = "random"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz", ".ckpt")


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (the format of OpenAI's released CLIP checkpoints)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def needs_quick_gelu(arch: str, pretrained: str | None) -> bool:
    """Whether ``arch`` with ``pretrained`` (a tag or a file) must use QuickGELU."""
    if arch.lower().endswith("-quickgelu"):
        return True
    if pretrained is None or pretrained == RANDOM_WEIGHTS:
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


def resolve_arch(arch: str) -> str:
    """A registered open_clip architecture name; a model-config JSON path is registered under its stem."""
    if arch.endswith(".json"):
        cfg = Path(arch)
        if not cfg.is_file():
            raise UserError(f"open_clip architecture config not found: {cfg} (pass an existing JSON file or a "
                            "registered name such as ViT-B-16)")
        try:
            open_clip.add_model_config(cfg)
        except ValueError as e:  # json.JSONDecodeError
            raise UserError(f"{cfg}: not a valid open_clip model config (JSON): {e}") from e
        arch = cfg.stem
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(known[:5])}, …"
        raise UserError(f"unknown open_clip architecture {arch!r}; {hint} (open_clip.list_models() lists all; "
                        "or pass the path of a model-config JSON)")
    return arch


def cached_tag_file(arch: str, tag: str, cache_dir: str | None = None) -> str | None:
    """The local file of open_clip pretrained ``tag`` of ``arch`` if it is already cached (where open_clip
    itself would look: the Hugging Face hub cache, or ``~/.cache/clip`` for URL weights), else ``None``.
    Never touches the network."""
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    if cfg.get("file"):
        return cfg["file"] if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return found
        return None
    url = cfg.get("url", "")
    if url:
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        return str(target) if target.is_file() else None
    return None


def resolve_weights(arch: str, pretrained: str | None, cache_dir: str | None = None) -> str:
    """What ``pretrained`` names for ``arch``: ``"random"``, ``"file"`` or ``"tag"`` (a cached one); a
    :class:`UserError` saying what to pass otherwise (no weights, a missing file, an unknown or uncached tag)."""
    tags = open_clip.list_pretrained_tags_by_model(arch)
    shown = ", ".join(tags[:8]) + (f", … ({len(tags) - 8} more: open_clip.list_pretrained_tags_by_model)"
                                   if len(tags) > 8 else "")
    tag_hint = f"its pretrained tags: {shown}" if tags else "it has no open_clip pretrained tags"
    if pretrained is None:
        raise UserError(f"openclip:{arch} needs --weights: a checkpoint file, a cached pretrained tag ({tag_hint}), "
                        f"or '{RANDOM_WEIGHTS}' for an untrained model")
    if pretrained == RANDOM_WEIGHTS:
        return "random"
    if Path(pretrained).is_file():
        return "file"
    if open_clip.is_pretrained_cfg(arch, pretrained):
        if cached_tag_file(arch, pretrained, cache_dir) is None:
            where = f"cache_dir {cache_dir}" if cache_dir else "the local cache"
            raise UserError(f"--weights {pretrained}: open_clip tag {pretrained!r} of {arch} is not in {where}, and "
                            "qshift does not download weights; pass the checkpoint file's path instead")
        return "tag"
    if Path(pretrained).is_dir():
        raise UserError(f"--weights {pretrained} is a folder; pass the checkpoint file inside it")
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
        raise UserError(f"--weights {pretrained}: checkpoint file not found (check the path)")
    raise UserError(f"--weights {pretrained!r} is neither a file nor an open_clip pretrained tag of {arch} "
                    f"({tag_hint}; or '{RANDOM_WEIGHTS}')")


def _state_dict_mismatch(message: str) -> str:
    """A one-line summary of torch's multi-line ``load_state_dict`` error."""
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)")):
        found = re.search(pattern, message)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {label} key{'s' if len(keys) != 1 else ''} (e.g. {keys[0] if keys else '?'})")
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", message)
    if sizes:
        name, ckpt, model = sizes[0]
        parts.append(f"{len(sizes)} shape mismatch{'es' if len(sizes) != 1 else ''} (e.g. {name}: checkpoint "
                     f"{ckpt}, architecture {model})")
    return "; ".join(parts) or " ".join(message.split())[:200]


def _create(arch: str, pretrained: str | None, **kwargs: Any):
    """open_clip's ``create_model_and_transforms`` with a user file's failures as one-line UserErrors."""
    try:
        model, _, own = open_clip.create_model_and_transforms(arch, pretrained=pretrained, **kwargs)
    except (pickle.UnpicklingError, EOFError) as e:
        unsafe = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
        why = (f"it pickles objects torch.load(weights_only=True) refuses ({unsafe.group(0)}); re-save its "
               "state_dict alone" if unsafe else "not a file torch.save wrote; is it the right file?")
        raise UserError(f"--weights {pretrained}: cannot be read as a PyTorch checkpoint: {why}") from e
    except RuntimeError as e:
        text = str(e)
        if "Error(s) in loading state_dict" in text:
            raise UserError(f"--weights {pretrained} does not match open_clip architecture {arch}: "
                            f"{_state_dict_mismatch(text)}; pass the architecture it was trained with "
                            "(or its model-config JSON)") from e
        if any(k in text for k in ("PytorchStreamReader", "invalid load key", "central directory", "invalid header")):
            raise UserError(f"--weights {pretrained}: the file is damaged or not a checkpoint "
                            f"({' '.join(text.split())[:160]})") from e
        raise
    except (AssertionError, ValueError, KeyError, IndexError) as e:  # open_clip's own checks of a checkpoint
        if pretrained is None:
            raise
        raise UserError(f"--weights {pretrained} does not fit open_clip architecture {arch} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:160] or 'a tensor of another shape'}); "
                        "pass the architecture it was trained with (or its model-config JSON)") from e
    return model, own


def check_vocabulary(model: Any, tokenizer: Any, arch: str) -> None:
    """A :class:`UserError` if the tokenizer emits ids past the model's token-embedding table."""
    n_tokens = getattr(tokenizer, "vocab_size", None)
    table = getattr(model, "token_embedding", None)
    rows = getattr(table, "num_embeddings", None)
    if isinstance(n_tokens, int) and isinstance(rows, int) and n_tokens > rows:
        raise UserError(f"openclip:{arch}: its tokenizer has {n_tokens} tokens but the text tower embeds only {rows} "
                        "(text_cfg.vocab_size in the model config); make them agree")


def load_openclip(arch: str, pretrained: str | None = None, query_modality: str = "image", *,
                  preprocess: str = "model", device: str = "cpu", quick_gelu: bool | None = None,
                  precision: str = "fp32", autocast: str | None = None, grad_checkpointing: bool = False,
                  cache_dir: str | None = None) -> DualTowerModel:
    """An open_clip model as a RetrievalModel.

    ``pretrained`` is a checkpoint path, a pretrained tag already in the local cache, or ``"random"``
    (untrained weights, logged as a warning); ``None`` is a :class:`UserError`.  ``arch`` is a registered
    open_clip name or the path of a model-config JSON (registered on the fly).  ``autocast`` (``bf16`` /
    ``fp16``) and ``grad_checkpointing`` are for large towers.
    """
    if preprocess not in PREPROCESS_MODES:
        raise UserError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    dev = resolve_device(device)
    arch = resolve_arch(arch)
    kind = resolve_weights(arch, pretrained, cache_dir)
    if kind == "random":
        log.warning("openclip:%s with weights 'random': an untrained model; its retrieval numbers mean nothing", arch)
    qg = needs_quick_gelu(arch, pretrained) if quick_gelu is None else quick_gelu
    if kind == "file" and is_torchscript(pretrained):
        from open_clip.openai import load_openai_model

        try:
            model = load_openai_model(pretrained, precision=precision, device=dev, jit=False)
        except (RuntimeError, KeyError) as e:
            raise UserError(f"--weights {pretrained}: a TorchScript file that is not an OpenAI CLIP checkpoint "
                            f"({' '.join(str(e).split())[:160]})") from e
        own = open_clip.image_transform(model.visual.image_size, is_train=False)
    else:
        model, own = _create(arch, None if kind == "random" else pretrained, precision=precision, device=dev,
                             force_quick_gelu=qg, cache_dir=cache_dir)
    model.quick_gelu = qg  # recorded for result files and tests
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except OSError as e:  # a Hugging Face tokenizer that is not cached
        raise UserError(f"openclip:{arch}: its tokenizer cannot be loaded offline ({' '.join(str(e).split())[:160]})"
                        ) from e
    check_vocabulary(model, tokenizer, arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    transform = own if preprocess == "model" else tcr_transform(int(size))
    text_tower = model.text if hasattr(model, "text") else _TextTower(model)  # CustomTextCLIP keeps it apart

    def enc_image(batch: Any) -> torch.Tensor:
        return model.encode_image(images_to_tensor(batch, transform, dev))

    def enc_text(batch: Any) -> torch.Tensor:
        return model.encode_text(tokenizer(check_texts(batch)).to(dev))

    rm = DualTowerModel({"image": enc_image, "text": enc_text}, {"image": model.visual, "text": text_tower},
                        query_modality, adaptable=openclip_rule(query_modality), device=dev, autocast=autocast)
    freeze_except_adaptable(rm, [model])
    rm.clip = model
    return rm
