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

Loading checks the folder before trusting it, each failure a one-line :class:`~qshift.errors.UserError`:
the model class in ``config.json`` (a CLIP folder passed as ``hf-blip`` or the reverse, a BLIP captioning
checkpoint), the tokenizer files and their vocabulary (present, more than special tokens, not all [UNK],
within the text tower's embedding table, CLIP's end-of-text id), and the weights (no key missing, no shape
different from the config: transformers would otherwise initialise those randomly and go on).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torchvision import transforms as T
import transformers
from transformers import AutoTokenizer, BlipForImageTextRetrieval, CLIPModel

from qshift.errors import UserError
from qshift.models.dual_tower import DualTowerModel, freeze_except_adaptable, named_layernorms, resolve_device
from qshift.models.preprocess import (CLIP_MEAN, CLIP_STD, PREPROCESS_MODES, check_texts, images_to_tensor,
                                      tcr_transform)

log = logging.getLogger(__name__)

#: the files a saved tokenizer may consist of (any one of them makes a tokenizer loadable)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
#: the words every real English tokenizer knows; a tokenizer that maps all of them to [UNK] is broken
PROBE_TEXT = "a photo of a dog"

#: what each spec expects in ``config.json``: model_type, the class qshift loads, a hint at the other spec
KINDS = {
    "hf-clip": ("clip", "CLIPModel", "a CLIPModel folder (e.g. openai/clip-vit-base-patch16)"),
    "hf-blip": ("blip", "BlipForImageTextRetrieval",
                "a BlipForImageTextRetrieval folder (an ITM/ITC checkpoint, e.g. Salesforce/blip-itm-base-coco)"),
}


def _check_dir(path: str | Path, spec: str) -> tuple[Path, dict]:
    """The folder and its parsed ``config.json``, checked to hold the model class ``spec`` loads."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{spec}:{p}: folder not found (expected the output of save_pretrained)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{spec}:{p}: no config.json; is this a Hugging Face model folder (save_pretrained)?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: expected a JSON object (a transformers model config)")
    model_type, cls_name, what = KINDS[spec]
    found, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if found != model_type:
        other = next((s for s, (t, _, _) in KINDS.items() if t == found), None)
        hint = f"; use --model {other}:{p}" if other else ""
        raise UserError(f"{spec}:{p}: config.json says model_type {found!r}, but {spec} needs {what}{hint}")
    if archs and cls_name not in archs:
        raise UserError(f"{spec}:{p}: config.json holds a {', '.join(archs)}, but {spec} needs {what}")
    return p, cfg


def _processor_transform(path: Path, size: int, mean, std):
    """The model's own image transform from its saved image processor (resize + crop + normalise)."""
    cfg_file = path / "preprocessor_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_file}: not valid JSON ({e})") from e
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


def load_tokenizer(path: Path, spec: str, text_config: Any) -> Any:
    """The tokenizer saved in ``path``, checked against the text tower's config ``text_config``: its files
    exist, it knows more than its special tokens and more than [UNK], it fits the embedding table, and (CLIP)
    its end-of-text id is the one the text tower pools at."""
    where = f"{spec}:{path}"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        need = "vocab.json + merges.txt" if spec == "hf-clip" else "vocab.txt"
        raise UserError(f"{where}: no tokenizer files (tokenizer.json, or {need}); save the model's tokenizer "
                        "into the folder with tokenizer.save_pretrained(PATH)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where}: its tokenizer files cannot be loaded ({' '.join(str(e).split())[:160]})") from e
    n, special = len(tok), set(tok.all_special_ids)
    if n <= len(special):
        raise UserError(f"{where}: the tokenizer's vocabulary holds only its {n} special tokens (damaged "
                        "tokenizer files?); save the model's real tokenizer into the folder")
    probe = [i for i in tok(PROBE_TEXT)["input_ids"] if i not in special or i == tok.unk_token_id]
    if tok.unk_token_id is not None and probe and all(i == tok.unk_token_id for i in probe):
        raise UserError(f"{where}: the tokenizer maps every word of {PROBE_TEXT!r} to its unknown token; every "
                        "caption would get the same ids (a vocabulary file of another model?)")
    rows = getattr(text_config, "vocab_size", None)
    if isinstance(rows, int) and n > rows:
        raise UserError(f"{where}: the tokenizer has {n} tokens but the text tower's embedding table has {rows} "
                        "rows (text_config.vocab_size); the tokenizer belongs to another model")
    eos = getattr(text_config, "eos_token_id", None)
    if spec == "hf-clip" and eos not in (None, 2) and tok.eos_token_id != eos:
        # CLIP pools the text at the first eos_token_id (the legacy id 2 means "at the largest id")
        raise UserError(f"{where}: the tokenizer's end-of-text id is {tok.eos_token_id}, the text config's "
                        f"eos_token_id is {eos}; every caption would be pooled at the wrong position")
    return tok


def _tokenize(tok: Any, max_length: int):
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


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report (a multi-line table) is ours to summarise in one line: silence it."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(before)


def _weights(cls, path: Path, spec: str, config: Any):
    """``cls`` from ``path`` with every weight present and of the config's shape (else a UserError)."""
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(path), config=config, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
    except OSError as e:  # no weights file, or an unreadable one
        raise UserError(f"{spec}:{path}: cannot read the weights ({' '.join(str(e).split())[:200]})") from e
    missing, mismatched = sorted(info.get("missing_keys") or []), sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight{'s' if len(missing) != 1 else ''} missing (e.g. {missing[0]})")
        if mismatched:
            first = mismatched[0]
            name = (f"{first[0]}: checkpoint {list(first[1])}, config {list(first[2])}"
                    if isinstance(first, tuple) and len(first) == 3 else str(first))
            parts.append(f"{len(mismatched)} of another shape than config.json says (e.g. {name})")
        raise UserError(f"{spec}:{path}: the checkpoint does not match its config.json: {'; '.join(parts)}; "
                        "they would be initialised randomly")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s:%s: %d checkpoint weights are not used by %s (e.g. %s)", spec, path, len(unexpected),
                    cls.__name__, unexpected[0])
    return model


def _load(cls, path: str | Path, spec: str, device: str, grad_checkpointing: bool, preprocess: str):
    """(model, tokenizer, image transform) for a saved transformers model, checked, in eval mode on ``device``."""
    if preprocess not in PREPROCESS_MODES:
        raise UserError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    dev = resolve_device(device)
    p, _ = _check_dir(path, spec)
    try:
        config = cls.config_class.from_pretrained(str(p))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{spec}:{p}: config.json cannot be read as a {cls.config_class.__name__} "
                        f"({' '.join(str(e).split())[:160]})") from e
    tok = load_tokenizer(p, spec, config.text_config)
    model = _weights(cls, p, spec, config).to(dev).eval()
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    size = model.config.vision_config.image_size
    # tcr: square resize to the config's size (384 for the BLIP retrieval checkpoints), CLIP mean / std
    transform = _processor_transform(p, size, CLIP_MEAN, CLIP_STD) if preprocess == "model" else tcr_transform(size)
    return model, tok, transform, dev


def _wrap(model, encoders, towers, query_modality: str, rule, device: torch.device, autocast: str | None,
          default_lr: float | None = None) -> DualTowerModel:
    rm = DualTowerModel(encoders, towers, query_modality, adaptable=rule(query_modality), device=device,
                        autocast=autocast, default_lr=default_lr)
    freeze_except_adaptable(rm, [model])
    rm.hf_model = model
    return rm


def load_hf_clip(path: str | Path, query_modality: str = "image", *, preprocess: str = "model",
                 device: str = "cpu", autocast: str | None = None, grad_checkpointing: bool = False) -> DualTowerModel:
    """A ``transformers`` CLIPModel saved in ``path`` (with its tokenizer) as a RetrievalModel."""
    model, tok, transform, dev = _load(CLIPModel, path, "hf-clip", device, grad_checkpointing, preprocess)
    tokenize = _tokenize(tok, model.config.text_config.max_position_embeddings)

    def enc_image(batch: Any) -> torch.Tensor:
        out = model.vision_model(pixel_values=images_to_tensor(batch, transform, dev))
        return model.visual_projection(out.pooler_output)

    def enc_text(batch: Any) -> torch.Tensor:
        t = {k: v.to(dev) for k, v in tokenize(batch).items()}
        out = model.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        return model.text_projection(out.pooler_output)

    return _wrap(model, {"image": enc_image, "text": enc_text}, {"image": model.vision_model, "text": model.text_model},
                 query_modality, clip_rule, dev, autocast)


def load_hf_blip(path: str | Path, query_modality: str = "image", *, preprocess: str = "model",
                 device: str = "cpu", autocast: str | None = None, grad_checkpointing: bool = False) -> DualTowerModel:
    """A ``transformers`` BlipForImageTextRetrieval saved in ``path`` (with its tokenizer), through its ITC
    embeddings."""
    model, tok, transform, dev = _load(BlipForImageTextRetrieval, path, "hf-blip", device, grad_checkpointing,
                                       preprocess)
    tokenize = _tokenize(tok, 35)

    def enc_image(batch: Any) -> torch.Tensor:
        hidden = model.vision_model(pixel_values=images_to_tensor(batch, transform, dev))[0]
        return model.vision_proj(hidden[:, 0, :])

    def enc_text(batch: Any) -> torch.Tensor:
        t = {k: v.to(dev) for k, v in tokenize(batch).items()}
        hidden = model.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"])[0]
        return model.text_proj(hidden[:, 0, :])

    return _wrap(model, {"image": enc_image, "text": enc_text},
                 {"image": model.vision_model, "text": model.text_encoder}, query_modality, blip_rule, dev, autocast,
                 default_lr=BLIP_TEXT_LR if query_modality == "text" else None)
