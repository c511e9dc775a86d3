"""Train the CIR world's combiner (``qshift train-cir-model``) and write its model card.

CLIP4Cir's second stage: the world dual encoder (:mod:`qshift.models.world_model`) stays frozen, so the
gallery tower is exactly the shipped world model's and training is a cheap pass over cached features.
Every reference image, modification text and target image of the clean ``train`` split of
:mod:`qshift.data.cir_world` is encoded once (images rendered at the world's render size, by
``render_workers`` processes); a :class:`qshift.models.cir_model.Combiner` is then trained with a batch
InfoNCE loss (fixed temperature) of the fused query against the target images of the batch, plus, per
query, one near-duplicate of its target from the train gallery as a hard negative.  Augmentation is
generic only: feature dropout, the modification text re-worded in the *source* text families
(:data:`qshift.data.cir_world.SOURCE_TEXT_FAMILIES`; never the held-out ones) and one-edit misspellings
(:func:`qshift.train.text_augment.misspell`); never the benchmark's corruptions, perturbations or render
domains.  The epoch is selected on the clean ``val`` split by R@1 (reference removed).
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qshift.atomic import write_text_atomic
from qshift.bench.backbone import file_digest
from qshift.data import world
from qshift.data.cir_world import SOURCE_TEXT_FAMILIES, CIRSplit, load_cir_split
from qshift.models.cir_model import Combiner, fuse, save_combiner
from qshift.models.world_model import WorldDualEncoder, load_world_model, shipped_weights_path
from qshift.retrieval.cir_metrics import cirr_metrics
from qshift.train.text_augment import misspell

#: the metrics the card reports (percent)
CARD_METRICS: tuple[str, ...] = ("R@1", "R@5", "R@10", "R@50", "R_s@1", "R_s@2", "R_s@3")
#: the text weights tried for the ``interp`` fusion on val
INTERP_ALPHAS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))


@dataclass
class CIRTrainConfig:
    """The combiner's training recipe; the defaults made the shipped ``cir_combiner.pt``."""
    seed: int = 0
    epochs: int = 80
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    proj_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    #: dropout on the frozen towers' input features (generic feature-level augmentation)
    feature_dropout: float = 0.1
    #: fixed InfoNCE temperature (CLIP4Cir's logit scale 100 is 0.01)
    temperature: float = 0.02
    #: train queries used (the first N of the 10,000); None = all
    train_queries: int | None = None
    #: near-duplicates of the target (from its train gallery group) rendered per query as hard negatives
    hard_negatives: int = 1
    #: each query's text is also re-worded in every source family (a seeded draw of the world's templates)
    reword: bool = True
    #: per-word probability of a one-edit misspelling in one extra variant of each text (0: none)
    typo_p: float = 0.1
    #: val queries (the first N, with their own gallery rows) the epoch is selected on; None = all 2,000
    val_queries: int | None = 1000
    render_workers: int = 2
    world_weights: str | None = None


# ------------------------------------------------------------------------------------- features

def _render_chunk(scenes: list[world.Scene]) -> np.ndarray:
    return np.stack([world.render_scene(s) for s in scenes])


@torch.no_grad()
def encode_scenes(model: WorldDualEncoder, scenes: list[world.Scene], workers: int = 2, chunk: int = 128,
                  progress: bool = True, desc: str = "rendering") -> torch.Tensor:
    """Render ``scenes`` (the world's default render size; ``workers`` processes, 0 = here) and encode them
    with ``model``'s image tower: L2-normalised [N, d], in order."""
    model.eval()
    parts = [scenes[s:s + chunk] for s in range(0, len(scenes), chunk)]
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(scenes), desc=desc, disable=not progress, unit="img")
    if workers <= 0:
        for p in parts:
            out.append(model.encode_image(_render_chunk(p)))
            bar.update(len(p))
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            pending: deque = deque()
            it = iter(parts)
            for p in it:  # at most 2 chunks per worker in flight, so memory stays bounded
                pending.append((len(p), ex.submit(_render_chunk, p)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                n, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((len(nxt), ex.submit(_render_chunk, nxt)))
                out.append(model.encode_image(fut.result()))
                bar.update(n)
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, model.cfg.embed_dim)


@torch.no_grad()
def encode_texts(model: WorldDualEncoder, texts: list[str], batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model.encode_text(texts[s:s + batch_size]) for s in range(0, len(texts), batch_size)])


@dataclass
class EvalFeatures:
    """A CIR split's cached features: every gallery row, every query's text; the references are rows."""
    gallery: torch.Tensor
    texts: torch.Tensor
    metric_inputs: dict[str, torch.Tensor]

    @property
    def references(self) -> torch.Tensor:
        return self.gallery[self.metric_inputs["references"]]


def eval_features(model: WorldDualEncoder, split: CIRSplit, workers: int, progress: bool) -> EvalFeatures:
    gallery = encode_scenes(model, split.gallery, workers, progress=progress, desc=f"{split.name} gallery")
    inputs = {k: torch.as_tensor(v) for k, v in split.metric_inputs().items()}
    return EvalFeatures(gallery, encode_texts(model, split.texts), inputs)


@torch.no_grad()
def fusion_metrics(feats: EvalFeatures, fusion: str, combiner: Combiner | None = None,
                   alpha: float = 0.5) -> dict[str, float]:
    """CIRR metrics (reference removed; subset recall in the group) of one fusion on cached features."""
    if combiner is not None:
        combiner.eval()
    q = fuse(feats.references, feats.texts, fusion, combiner, alpha)
    return cirr_metrics(q @ feats.gallery.T, **feats.metric_inputs)


@dataclass
class TrainFeatures:
    references: torch.Tensor  # [Q, d]
    targets: torch.Tensor  # [Q, d]
    negatives: torch.Tensor  # [Q, k, d]
    texts: torch.Tensor  # [Q, V, d]: the text variants of each query
    n_variants: dict = field(default_factory=dict)


def _typo_text(text: str, p: float, rng: np.random.Generator) -> str:
    return " ".join(misspell(w, rng) if rng.random() < p else w for w in text.split(" "))


def train_features(model: WorldDualEncoder, split: CIRSplit, cfg: CIRTrainConfig, progress: bool) -> TrainFeatures:
    """Encode the train queries' references, targets, hard negatives and text variants once."""
    n = len(split) if cfg.train_queries is None else min(cfg.train_queries, len(split))
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 26]))
    negs = []
    for q in range(n):
        others = [int(r) for r in split.groups[q] if r != split.target[q]]
        negs.append([others[i] for i in rng.choice(len(others), size=cfg.hard_negatives, replace=False)]
                    if cfg.hard_negatives else [])
    scenes = ([split.references[q] for q in range(n)] + [split.gallery[int(split.target[q])] for q in range(n)]
              + [split.gallery[r] for row in negs for r in row])
    z = encode_scenes(model, scenes, cfg.render_workers, progress=progress, desc="train images")
    d = z.shape[1]
    variants = [list(split.texts[:n])]
    if cfg.reword:
        variants += [split.family_texts(f, seed=cfg.seed)[:n] for f in SOURCE_TEXT_FAMILIES]
    if cfg.typo_p > 0:
        variants.append([_typo_text(t, cfg.typo_p, rng) for t in split.texts[:n]])
    texts = torch.stack([encode_texts(model, v) for v in tqdm(variants, desc="train texts", disable=not progress)], 1)
    return TrainFeatures(z[:n], z[n:2 * n], z[2 * n:].reshape(n, cfg.hard_negatives, d), texts,
                         {"own": 1, "reworded": len(SOURCE_TEXT_FAMILIES) if cfg.reword else 0,
                          "typo": int(cfg.typo_p > 0)})


# --------------------------------------------------------------------------------------- training

def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fit_combiner(tf: TrainFeatures, val: EvalFeatures, cfg: CIRTrainConfig, progress: bool = True,
                 log=print) -> tuple[Combiner, list[dict], int]:
    """Train a combiner on cached features; returns the val-selected one, the history and its epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    d = tf.references.shape[1]
    combiner = Combiner(d, cfg.proj_dim, cfg.hidden_dim, cfg.dropout)
    opt = torch.optim.AdamW(combiner.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    Q, V = tf.texts.shape[:2]
    steps_per_epoch = max(1, Q // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.warmup_epochs * steps_per_epoch, total))
    best, best_epoch, best_state, history = -1.0, 0, None, []
    bar = tqdm(range(cfg.epochs), desc="combiner", disable=not progress)
    for epoch in bar:
        combiner.train()
        order = torch.randperm(Q, generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            B = len(idx)
            text = tf.texts[idx, torch.randint(V, (B,), generator=gen)]
            ref = F.dropout(tf.references[idx], cfg.feature_dropout)
            text = F.dropout(text, cfg.feature_dropout)
            q = combiner(ref, text)
            cand = torch.cat([tf.targets[idx], tf.negatives[idx].reshape(-1, d)])
            logits = q @ cand.T / cfg.temperature
            loss = F.cross_entropy(logits, torch.arange(B))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {s}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        m = fusion_metrics(val, "combiner", combiner)
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), **{f"val_{k}": m[k] for k in ("R@1", "R@10", "R_s@1")}}
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", val_R1=f"{m['R@1']:.1f}")
        if m["R@1"] > best:
            best, best_epoch = m["R@1"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in combiner.state_dict().items()}
    combiner.load_state_dict(best_state)
    log(f"selected epoch {best_epoch} of {cfg.epochs}: val R@1 {best:.2f}")
    return combiner.eval(), history, best_epoch


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(m[k], 2) for k in CARD_METRICS if k in m}


def train_cir_model(cfg: CIRTrainConfig, out: str | Path | None = None, progress: bool = True,
                    log=None, command: str | None = None) -> tuple[Combiner, dict]:
    """Train the combiner on frozen world towers, evaluate it and the training-free fusions on the clean
    val and test splits, and (with ``out``) save the weights and write the model card beside them."""
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.time()
    world_path = Path(cfg.world_weights) if cfg.world_weights else shipped_weights_path()
    model = load_world_model(world_path).float().eval()
    train, val, test = (load_cir_split(s) for s in ("train", "val", "test"))
    if cfg.val_queries is not None and cfg.val_queries < len(val):
        val = val.subset(cfg.val_queries)
    t_split = time.time() - t0
    tf = train_features(model, train, cfg, progress)
    t_train_feats = time.time() - t0 - t_split
    val_f = eval_features(model, val, cfg.render_workers, progress)
    test_f = eval_features(model, test, cfg.render_workers, progress)
    t_features = time.time() - t0
    log(f"features: {len(tf.references)} train queries ({tf.negatives.shape[1]} hard negatives, "
        f"{tf.texts.shape[1]} text variants each), val and test galleries; {t_features / 60:.1f} min")
    t1 = time.time()
    combiner, history, best_epoch = fit_combiner(tf, val_f, cfg, progress, log)
    t_fit = time.time() - t1
    alpha_val = {a: fusion_metrics(val_f, "interp", alpha=a)["R@1"] for a in INTERP_ALPHAS}
    alpha = max(alpha_val, key=lambda a: (alpha_val[a], -abs(a - 0.5)))
    metrics = {split: {"combiner": _rounded(fusion_metrics(f, "combiner", combiner)),
                       "sum": _rounded(fusion_metrics(f, "sum")),
                       f"interp(alpha={alpha})": _rounded(fusion_metrics(f, "interp", alpha=alpha))}
               for split, f in (("val", val_f), ("test", test_f))}
    record = {
        "command": command,
        "train_config": asdict(cfg),
        "combiner": {"embed_dim": combiner.embed_dim, "proj_dim": combiner.proj_dim,
                     "hidden_dim": combiner.hidden_dim,
                     "n_parameters": sum(p.numel() for p in combiner.parameters())},
        "data_names": {"train": train.name, "val": val.name, "test": test.name},
        "data": {k: {"seed": s.seed, "n_queries": len(s), "n_gallery": len(s.gallery),
                          "fingerprint": s.fingerprint()} for k, s in (("train", train), ("val", val), ("test", test))},
        "train_queries_used": len(tf.references),
        "text_variants": tf.n_variants,
        "render_size": world.RENDER_SIZE,
        "world_variant": world.world_variant(),
        "world_weights": {"file": world_path.name, "sha256": file_digest(world_path)},
        "selected_epoch": best_epoch,
        "interp_alpha_val_R@1": {str(a): round(r, 2) for a, r in alpha_val.items()},
        "metrics": metrics,
        "history": history,
        "seconds": {"splits": round(t_split, 1), "train_features": round(t_train_feats, 1),
                    "eval_features": round(t_features - t_split - t_train_feats, 1), "fit": round(t_fit, 1)},
        "hardware": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "render_workers": cfg.render_workers},
        "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
    }
    record["total_seconds"] = round(time.time() - t0, 1)
    log(f"test: combiner R@1 {metrics['test']['combiner']['R@1']:.1f}, sum {metrics['test']['sum']['R@1']:.1f}; "
        f"total {record['total_seconds'] / 60:.1f} min")
    if out is not None:
        out = Path(out)
        record["weights"] = {"file": out.name, "sha256": save_combiner(combiner, out),
                             "bytes": out.stat().st_size}
        write_text_atomic(out.with_suffix(".md"), render_cir_card(record))
    return combiner, record


# ------------------------------------------------------------------------------------- model card

def render_cir_card(card: dict) -> str:
    """The Markdown model card of a trained combiner (the full record as JSON at the end)."""
    tc, cb, sec = card["train_config"], card["combiner"], card["seconds"]
    w = card.get("weights", {})
    tv = card["text_variants"]
    lines = [
        "# Model card: the embedded CIR world's source model",
        "",
        f"Weights: `{w.get('file', '?')}` (a plain fp32 state dict of a `qshift.models.cir_model.Combiner`, "
        f"{cb['n_parameters'] / 1e6:.2f} M parameters, {w.get('bytes', 0) / 1e6:.1f} MB; SHA-256 `{w.get('sha256', '?')}`), "
        f"used with the world dual encoder `{card['world_weights']['file']}` (SHA-256 "
        f"`{card['world_weights']['sha256']}`). `qshift.models.cir_model.load_cir_model()` loads both.",
        "",
        "## How it was made",
        "",
        f"- Command: `{card.get('command') or 'qshift train-cir-model'}`",
        f"- Seed: {tc['seed']}. Data: the clean `{card['data_names']['train']}` split of `qshift.data.cir_world` "
        f"({card['train_queries_used']} of {card['data']['train']['n_queries']} queries), rendered at "
        f"{card['render_size']} px; the epoch selected on clean `{card['data_names']['val']}` by R@1 with the reference removed "
        f"(epoch {card['selected_epoch']} of {tc['epochs']}).",
        "- Stage: CLIP4Cir's second stage — the world image and text towers are frozen and only the combiner "
        "is trained. That keeps the gallery tower identical to the shipped world model (the gallery is encoded "
        "by it) and makes training a cheap pass over features cached once: each reference image, modification "
        "text and target image is encoded a single time.",
        f"- Objective: InfoNCE of the fused query against the batch's target images (batch {tc['batch_size']}, "
        f"fixed temperature {tc['temperature']}), plus {tc['hard_negatives']} near-duplicate(s) of each target "
        "from its train gallery group as hard negatives.",
        f"- Optimiser: AdamW (lr {tc['lr']}, weight decay {tc['weight_decay']}), {tc['warmup_epochs']} warm-up "
        f"epochs then cosine decay, {tc['epochs']} epochs.",
        f"- Augmentation, generic only: feature dropout {tc['feature_dropout']} on both inputs, combiner dropout "
        f"{tc['dropout']}; each query draws one of {sum(tv.values())} text variants: its own text"
        + (f", the text re-worded in each source template family ({', '.join(SOURCE_TEXT_FAMILIES)}; a seeded "
           "draw of the world's own templates)" if tv.get("reworded") else "")
        + (f", and one with one-edit misspellings of {tc['typo_p']:.0%} of its words (our own generic edit, not "
           "the benchmark's nlpaug keyboard / OCR models)" if tv.get("typo") else "")
        + ". The held-out text families (question, formal), the benchmark's image corruptions, text "
        "perturbations and render domains are never used.",
        f"- Wall time: {card['total_seconds'] / 60:.1f} min in all on {card['hardware']['cpu_count']} CPU cores "
        f"({card['hardware']['render_workers']} render processes): {sec['splits']:.0f} s generating splits, "
        f"{sec['train_features']:.0f} s rendering + encoding train, {sec['eval_features']:.0f} s rendering + "
        f"encoding the val and test galleries, {sec['fit']:.0f} s training the combiner "
        f"({card['hardware']['platform']}, torch {card['versions']['torch']}, numpy {card['versions']['numpy']}).",
        *([f"- World variant (not the standard world): {card['world_variant']}."] if card.get("world_variant") else []),
        "",
        "## Architecture",
        "",
        f"- Combiner: image and text features ({cb['embed_dim']}-d, L2-normalised) each → linear to "
        f"{cb['proj_dim']} → LayerNorm → ReLU → dropout; concatenated → linear to {cb['hidden_dim']} → "
        f"LayerNorm → ReLU → dropout → linear to {cb['embed_dim']} (the combined feature), and → linear to "
        f"{cb['hidden_dim']} → ReLU → dropout → linear → sigmoid (the gate g); output normalise(combined + "
        "g·text + (1 − g)·image). LayerNorm is the only normalisation, so LayerNorm-only test-time adaptation "
        "reaches the fusion.",
        "- Training-free fusions for comparison: `sum` = normalise(image + text) (= `interp` at alpha 0.5); "
        "`interp` = normalise((1 − alpha)·image + alpha·text), alpha chosen on val from "
        f"{INTERP_ALPHAS[0]}–{INTERP_ALPHAS[-1]}.",
        "",
        "## Clean metrics (percent; CIRR protocol: reference removed, R_s within the query's group)",
        "",
        "| split | fusion | " + " | ".join(CARD_METRICS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in CARD_METRICS) + " |",
    ]
    for split, fusions in card["metrics"].items():
        d = card["data"][split]
        for name, m in fusions.items():
            lines.append(f"| {card['data_names'][split]} ({d['n_queries']} q, {d['n_gallery']} g) | {name} | "
                         + " | ".join(f"{m[k]:.1f}" for k in CARD_METRICS) + " |")
    lines += [
        "",
        "Split fingerprints (SHA-256 of scenes, texts and rows): "
        + "; ".join(f"{card['data_names'][n]} `{d['fingerprint'][:16]}…`" for n, d in card["data"].items()) + ".",
        "",
        "## Validation during training",
        "",
        "| epoch | loss | val R@1 | val R@10 | val R_s@1 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    hist = card["history"]
    every = max(1, len(hist) // 12)
    for h in hist:
        if h["epoch"] % every == 0 or h["epoch"] in (1, card["selected_epoch"]):
            mark = " (selected)" if h["epoch"] == card["selected_epoch"] else ""
            lines.append(f"| {h['epoch']}{mark} | {h['loss']:.3f} | {h['val_R@1']:.1f} | {h['val_R@10']:.1f} | "
                         f"{h['val_R_s@1']:.1f} |")
    record = {k: v for k, v in card.items() if k != "history"}
    lines += ["", "## Full record", "", "```json", json.dumps(record, indent=2, default=str), "```", ""]
    return "\n".join(lines)
