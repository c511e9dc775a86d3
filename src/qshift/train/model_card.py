"""Model card for a trained world model: command, seed, time, augmentations, clean metrics, test hash."""
from __future__ import annotations

import json
from pathlib import Path

from qshift.atomic import write_text_atomic
from qshift.bench.evaluate import evaluate_world_split
from qshift.data import world
from qshift.models.world_model import WorldDualEncoder


def clean_metrics(model: WorldDualEncoder) -> dict[str, dict[str, dict[str, float]]]:
    """Clean i2t / t2i metrics on ``test`` (2,000 images) and ``test1k``."""
    out = {}
    for name in ("test", "test1k"):
        rows = evaluate_world_split(model, world.load_split(name))
        out[name] = {r.direction: {k: round(v, 2) for k, v in r.metrics.items()} for r in rows}
    return out


def write_model_card(model: WorldDualEncoder, record: dict, weights_path: str | Path, command: str) -> Path:
    """Evaluate, then save the weights with the card embedded and a Markdown card beside them."""
    weights_path = Path(weights_path)
    test = world.load_split("test")
    card = dict(record)
    card["command"] = command
    card["clean_metrics"] = clean_metrics(model)
    card["test_set"] = {"name": "test", "seed": test.seed, "n_images": len(test), "n_captions": len(test.captions),
                        "sha256": test.fingerprint()}
    model.save(weights_path, card=card)
    md = weights_path.with_suffix(".md")
    write_text_atomic(md, render_card(card, weights_path.name))
    return md


def refresh_model_card(weights_path: str | Path) -> Path:
    """Re-measure a saved model's clean metrics on the current benchmark (e.g. after the default render
    size changed) and rewrite its card, keeping its training record and command."""
    weights_path = Path(weights_path)
    model = WorldDualEncoder.load(weights_path).float()
    record = dict(model.card)
    command = record.pop("command")
    return write_model_card(model, record, weights_path, command)


def render_card(card: dict, weights_name: str) -> str:
    tc, mc = card["train_config"], card["model_config"]
    lines = [
        "# Model card: the embedded world's source model",
        "",
        f"Weights: `{weights_name}` (fp16, {card['n_parameters'] / 1e6:.2f} M parameters). "
        "A dual encoder for the embedded image–caption world of `qshift.data.world`.",
        "",
        "## How it was made",
        "",
        f"- Command: `{card['command']}`",
        f"- Seed: {tc['seed']}; {tc['steps']} AdamW steps of batch {tc['batch_size']} "
        f"(lr {tc['lr']}, weight decay {tc['weight_decay']}, warm-up {tc['warmup']}, cosine decay) over "
        f"{tc['pool_size']} rendered training scenes (train seed {world.TRAIN_SEED + 1000 * tc['seed']}).",
        f"- Training time: {card['total_seconds'] / 60:.1f} min in all ({card['pool_seconds']:.0f} s rendering, "
        f"{card['train_seconds'] / 60:.1f} min optimising) on {card['hardware']['cpu_count']} CPU cores "
        f"({card['hardware']['platform']}), torch {card['versions']['torch']}.",
        *_lineage_lines(card),
        *([f"- Afterwards: {card['post_hoc']}"] if card.get("post_hoc") else []),
        f"- Objective: symmetric InfoNCE with a learnt temperature; image→text logits also see "
        f"{card['hard_negatives_per_image']} hard-negative captions per image (one drawn per step): the same scene "
        "with one attribute, position or binding changed.",
        "- Augmentations (generic; no flips, no hue changes): "
        + ", ".join(f"{k}={v}" for k, v in card["augmentations"].items()) + ".",
        _overlap_line(card),
        f"- Training scenes rendered at {tc.get('render_size', 96)} px and area-downsampled to the "
        f"{mc['image_size']} px input, as the benchmark's images are (world.RENDER_SIZE = {world.RENDER_SIZE}).",
        *([f"- World variant (not the standard world): {card['world_variant']}."] if card.get("world_variant") else []),
        "",
        "## Architecture",
        "",
        f"- Image tower: preprocessing area-downsamples larger renders (the benchmark's {world.RENDER_SIZE} px) to "
        f"{mc['image_size']} px → fixed Gaussian low-pass (σ = {mc.get('prefilter_sigma', 0.0)} px; 0 = none) → "
        + ("per-image standardisation (channel means removed, divided by the pooled std) → "
           if mc.get("standardise_input") else "") +
        f"conv stem (channels {mc['stem_channels']}, "
        + ("a channel LayerNorm after each stride-2 convolution" if mc.get("stem_norm") else "no normalisation")
        + f") → {mc['image_size']} px input as "
        f"{(mc['image_size'] // 4 // mc['patch']) ** 2} tokens + CLS → `ln_pre` → {mc['image_depth']} pre-LN blocks "
        f"(width {mc['image_width']}, {mc['heads']} heads"
        + (", a LayerNorm `ln_mlp` on each MLP's hidden activations (NormFormer)" if mc.get("image_mlp_norm") else "")
        + f") → `ln_post` → linear to {mc['embed_dim']}-d.",
        f"- Text tower: each word is the mean of its hashed character n-gram embeddings (n = "
        f"{mc['tokenizer']['ngram_sizes']}, {mc['tokenizer']['n_buckets']} buckets; typo-tolerant) → "
        f"{mc['text_depth']} pre-LN blocks (width {mc['text_width']}) → `ln_final` on CLS → linear to {mc['embed_dim']}-d."
        + (f" The {card['unseen_pieces_zeroed']} n-gram buckets no training word used are zero, so an n-gram the "
           "model never saw (a typo's) adds nothing to its word instead of an untrained random vector."
           if card.get("unseen_pieces_zeroed") else ""),
        "- LayerNorm is the only normalisation layer, so LayerNorm-only test-time adaptation applies as for CLIP.",
        "",
        "## Clean metrics (percent, any-positive Recall@K)",
        "",
        "| split | direction | R@1 | R@5 | R@10 | mAP |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for split, dirs in card["clean_metrics"].items():
        for d, m in dirs.items():
            lines.append(f"| {split} | {d} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['mAP']:.1f} |")
    ts = card["test_set"]
    lines += [
        "",
        f"Test set: `{ts['name']}` (seed {ts['seed']}, {ts['n_images']} images, {ts['n_captions']} captions), "
        f"SHA-256 of its pixels and captions: `{ts['sha256']}`.",
        "",
        "## Validation during training",
        "",
        "| step | minutes | loss | val i2t R@1 | val t2i R@1 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for h in card["history"]:
        lines.append(f"| {h['step']} | {h['minutes']:.1f} | {h['loss']:.3f} | {h['val_i2t_R@1']:.1f} | {h['val_t2i_R@1']:.1f} |")
    lines += ["", "Full record (JSON) is embedded in the weights file: `torch.load(path)['card']`.", ""]
    return "\n".join(lines)


def _lineage_lines(card: dict) -> list[str]:
    lines, parent, depth = [], card.get("parent"), 0
    while parent:
        depth += 1
        lines.append(f"- {'Fine-tuned from' if depth == 1 else 'which was fine-tuned from'} a checkpoint made by "
                     f"`{parent.get('command')}` ({float(parent.get('total_seconds', 0)) / 60:.1f} min).")
        parent = parent.get("parent")
    if lines:
        lines.append(f"- The whole chain of trainings took {float(card.get('chain_total_seconds', 0)) / 60:.1f} min.")
    return lines


def _overlap_line(card: dict) -> str:
    aug = card["augmentations"]
    noise = float(aug.get("noise_std", (0, 0))[1])
    edits = int(aug.get("typo_max_edits", 1))
    noise_txt = (f"Gaussian pixel noise with std up to {noise} is the same kind of noise as ImageNet-C's gaussian_noise "
                 f"{'at severities 1–2 (0.08, 0.12)' if noise >= 0.08 else 'but well below its severity 1 (std 0.08)'}")
    typo_txt = (f"typo_p = {aug.get('typo_p')} misspells words with {'one random edit' if edits == 1 else f'1–{edits} random edits'} "
                "(our own generic insert / delete / substitute / swap, not the benchmark's nlpaug keyboard / OCR models, "
                "which change about 30 % of a chosen word's characters)")
    illum = float(aug.get("illum_amp_max", 0.0)) if float(aug.get("illum_p", 0.0)) > 0 else 0.0
    if illum > 0:
        typo_txt += (f"; a smooth grey illumination field blended in at amplitude up to {illum} "
                     f"(on {float(aug['illum_p']):.0%} of the images) has the form of ImageNet-C's fog "
                     f"{'below' if illum < 1.5 else 'at or above'} its severity 1 (a = 1.5) and lowers contrast as "
                     "its contrast corruption does")
    return (f"- Overlap with the benchmark, stated plainly: {noise_txt}; {typo_txt}. The benchmark's corruption "
            "functions themselves, its held-out caption styles and its rendering domains are never used in training.")


def card_json(card: dict) -> str:
    return json.dumps(card, indent=2)
