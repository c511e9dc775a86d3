"""Train the embedded world's source model (``qshift train-world-model``).

Contrastive (symmetric InfoNCE) training on rendered scenes with generic augmentation only:
small translations and rescaling, brightness / contrast / saturation jitter (no hue: captions name
colours), mild Gaussian blur, Gaussian pixel noise (std up to 0.12, ImageNet-C's severity-1/2 level,
on half the images), mild JPEG re-encoding, no flips (captions say left and right), and on the text
side one-edit misspellings of 10 % of words (our own generic edit, not the benchmark's nlpaug
keyboard / OCR models), as web-trained retrieval models see noisy text.  Each image is paired with a
caption from a random source family, and image→text logits also see one *hard negative* caption
per image (the same scene with one attribute, position or binding changed), which teaches the
towers attribute binding.  The benchmark's corruption functions, held-out caption styles and
rendering domains are never used here.

This module runs the training (and the clean evaluation it logs); the recipe is
:mod:`qshift.train.recipe`, the rendered pool :mod:`qshift.train.world_pool`, the augmentations
:mod:`qshift.train.image_augment` and :mod:`qshift.train.text_augment`, the zeroing of unused n-gram
rows :mod:`qshift.train.unseen_pieces`; their public names are re-exported here as before.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qshift.data import world
from qshift.models.world_model import WorldDualEncoder, WorldModelConfig, insert_image_mlp_norms
from qshift.retrieval.metrics import retrieval_metrics
# re-exported: the training's public names, as before the split into modules
from qshift.train.image_augment import AUGMENTATIONS, augment, illuminate, smooth_field  # noqa: F401
from qshift.train.recipe import TrainConfig
from qshift.train.text_augment import drop_pieces, misspell, typo_table, word_pieces_with_typos  # noqa: F401
from qshift.train.unseen_pieces import trained_pieces_by_init, zero_unseen_pieces  # noqa: F401
from qshift.train.world_pool import N_HARD, Pool, build_pool, perturb_scene  # noqa: F401


# -------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_split(model: WorldDualEncoder, split: world.WorldSplit, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Clean i2t and t2i metrics of ``model`` on ``split``."""
    model.eval()
    imgs = split.images()
    zi = torch.cat([model.encode_image(imgs[s:s + batch_size]) for s in range(0, len(imgs), batch_size)])
    zt = torch.cat([model.encode_text(split.captions[s:s + batch_size]) for s in range(0, len(split.captions), batch_size)])
    image_ids = torch.arange(len(imgs))
    cap_ids = torch.as_tensor(split.caption_image)
    return {
        "i2t": retrieval_metrics(zi @ zt.T, image_ids, cap_ids),
        "t2i": retrieval_metrics(zt @ zi.T, cap_ids, image_ids),
    }


# --------------------------------------------------------------------------------- training

def _param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "pieces" in name or name.endswith((".pos", ".cls")) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def parent_record(card: dict) -> dict:
    """What a fine-tuned model's card keeps of the checkpoint it started from: how that was made and
    how long the whole chain of trainings took (the 60-minute budget is for the chain)."""
    own = float(card.get("total_seconds", 0.0))
    return {"command": card.get("command"), "total_seconds": own,
            "chain_total_seconds": float(card.get("chain_total_seconds", own)),
            "train_config": card.get("train_config"), "augmentations": card.get("augmentations"),
            "parent": card.get("parent")}


def train_world_model(cfg: TrainConfig, model_cfg: WorldModelConfig | None = None, out: str | Path | None = None,
                      progress: bool = True, log=None) -> tuple[WorldDualEncoder, dict]:
    """Train a world dual encoder from scratch; returns the model and a training record."""
    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    if cfg.train_towers not in ("both", "text", "image"):
        raise ValueError(f"train_towers must be 'both', 'text' or 'image', got {cfg.train_towers!r}")
    if cfg.init_from is not None:
        if model_cfg is not None:
            raise ValueError("init_from takes the model configuration from the checkpoint; do not pass model_cfg")
        model = WorldDualEncoder.load(cfg.init_from).float()
        parent = parent_record(model.card)
        log(f"fine-tuning from {cfg.init_from} (towers trained: {cfg.train_towers})")
    else:
        parent = None
        if cfg.train_towers != "both":
            raise ValueError("training a single tower needs init_from (the other tower must come from somewhere)")
        model = WorldDualEncoder(model_cfg or WorldModelConfig(stem_norm=cfg.stem_norm,
                                                               image_mlp_norm=bool(cfg.mlp_norm)))
    if cfg.standardise_input is not None:
        model.cfg = replace(model.cfg, standardise_input=bool(cfg.standardise_input))
        model.visual.standardise_input = bool(cfg.standardise_input)
        log(f"input standardisation: {'on' if cfg.standardise_input else 'off'}")
    frozen = {"text": model.visual, "image": model.text}.get(cfg.train_towers)
    if frozen is not None:
        frozen.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    pool = build_pool(cfg, progress=progress)
    t_pool = time.time() - t0
    log(f"pool: {len(pool.images)} scenes, vocab {len(pool.vocab)} words, rendered in {t_pool:.0f}s")
    if cfg.init_from is not None and cfg.mlp_norm is not None and cfg.mlp_norm != model.cfg.image_mlp_norm:
        if not cfg.mlp_norm:
            raise ValueError("the checkpoint has mid-MLP LayerNorms; a fine-tune cannot remove them")
        if cfg.train_towers == "text":
            raise ValueError("inserting image mid-MLP LayerNorms needs the image tower trained (--train-towers "
                             "image or both)")
        insert_image_mlp_norms(model, model.preprocess_images(pool.images[:512]))
        log("inserted mid-MLP LayerNorms into the image blocks (fitted on 512 clean training scenes)")
    table = typo_table(model, pool.vocab, cfg.typo_variants, cfg.seed, cfg.typo_max_edits)
    val = world.load_split("val")
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    trainable = [p for p in model.parameters() if p.requires_grad]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = torch.zeros(model.text.pieces.num_embeddings, dtype=torch.bool)
    history = []
    N, n_fam = pool.pos_words.shape[:2]
    bar = tqdm(range(cfg.steps), desc="training", disable=not progress)
    t_train = time.time()
    for step in bar:
        model.train()
        idx = torch.randint(N, (cfg.batch_size,), generator=gen)
        fam = torch.randint(n_fam, (cfg.batch_size,), generator=gen)
        x = augment(pool.images[idx], gen, cfg.noise_p, cfg.noise_std_max, cfg.illum_p, cfg.illum_amp_max)
        words = pool.pos_words[idx, fam].long()
        if cfg.hard_negatives:
            hn = torch.randint(pool.neg_words.shape[1], (cfg.batch_size,), generator=gen)
            neg = pool.neg_words[idx, hn].long()
            L = max(words.shape[1], neg.shape[1])
            words = torch.cat([F.pad(words, (0, L - words.shape[1])), F.pad(neg, (0, L - neg.shape[1]))])
        keep = int((words > 0).any(0).nonzero().max()) + 1
        pieces = drop_pieces(word_pieces_with_typos(table, words[:, :keep], cfg.typo_p, gen), cfg.piece_dropout, gen)
        seen[pieces.unique()] = True
        with torch.set_grad_enabled(cfg.train_towers != "text"):
            zi = F.normalize(model.visual(x), dim=-1)
        with torch.set_grad_enabled(cfg.train_towers != "image"):
            zt = F.normalize(model.text(pieces), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        B = cfg.batch_size
        logits = scale * zi @ zt.T  # [B, B(+B)]
        target = torch.arange(B)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m = evaluate_split(model, val)
            rec = {"step": step + 1, "loss": loss.item(), "minutes": (time.time() - t0) / 60,
                   "val_i2t_R@1": m["i2t"]["R@1"], "val_t2i_R@1": m["t2i"]["R@1"]}
            history.append(rec)
            log(f"step {step + 1}: loss {loss.item():.3f}  val i2t R@1 {m['i2t']['R@1']:.1f}  "
                f"t2i R@1 {m['t2i']['R@1']:.1f}  ({rec['minutes']:.1f} min)")
    model.eval()
    zeroed = 0
    if cfg.zero_unseen_pieces and cfg.init_from is None:
        zeroed = zero_unseen_pieces(model, seen)
        log(f"n-gram buckets never used in training, zeroed: {zeroed} of {len(seen) - 1}")
    record = {
        "train_config": asdict(cfg),
        "model_config": asdict(model.cfg),
        "world_variant": world.world_variant(),
        "augmentations": {**AUGMENTATIONS, **({"noise_p": cfg.noise_p} if cfg.noise_p is not None else {}),
                          **({"noise_std": (0.0, cfg.noise_std_max)} if cfg.noise_std_max is not None else {}),
                          "piece_dropout": cfg.piece_dropout, "typo_p": cfg.typo_p, "typo_max_edits": cfg.typo_max_edits,
                          "illum_p": cfg.illum_p, "illum_amp_max": cfg.illum_amp_max},
        "hard_negatives_per_image": N_HARD if cfg.hard_negatives else 0,
        "pool_seconds": round(t_pool, 1),
        "train_seconds": round(time.time() - t_train, 1),
        "total_seconds": round(time.time() - t0, 1),
        "history": history,
        "hardware": {"platform": platform.platform(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "unseen_pieces_zeroed": zeroed,
    }
    record["parent"] = parent
    record["chain_total_seconds"] = round(record["total_seconds"] + (parent or {}).get("chain_total_seconds", 0.0), 1)
    if out is not None:
        model.save(out, card=record)
    return model, record
