"""``qshift train-world-model`` (train or fine-tune the embedded world's source model), ``qshift train-cir-model``
(the CIR world's combiner over the world towers) and ``qshift train-av-model`` (the video-audio world's model)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qshift.cli.common import (app, console)


@app.command("train-world-model")
def train_world_model_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the weights (.pt) and the model card (.md beside it).")]
    = Path("world_dual_encoder.pt"),
    seed: Annotated[int, typer.Option(help="Seed for the training scenes, initialisation and batches.")] = 0,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps (default: the shipped model's).")] = None,
    pool_size: Annotated[Optional[int], typer.Option(min=256, help="Rendered training scenes.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Validate every N steps.")] = None,
    typo_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of caption words misspelt.")] = None,
    typo_max_edits: Annotated[Optional[int], typer.Option(min=1, help="Edits per misspelling, 1..N.")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune from these weights instead of from scratch.")]
    = None,
    train_towers: Annotated[Optional[str], typer.Option(help="With --init-from: both | text | image (the other "
                                                             "tower stays frozen).")] = None,
    noise_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of training images given "
                                                     "Gaussian pixel noise (shipped: 0.5).")] = None,
    noise_std_max: Annotated[Optional[float], typer.Option(min=0.0, help="Largest std of the Gaussian pixel-noise "
                                                           "augmentation (default 0.04, as v6; v3: 0.12).")] = None,
    illum_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of training images blended "
                                                     "with a smooth grey illumination field (default 0, as "
                                                     "v6.1).")] = None,
    illum_amp_max: Annotated[Optional[float], typer.Option(min=0.0, help="Largest amplitude a of that field, "
                                                           "(x + a·P) / (1 + a); ImageNet-C fog severity 1 is "
                                                           "a = 1.5.")] = None,
    render_size: Annotated[Optional[int], typer.Option(min=96, help="Render training scenes at this size and "
                                                       "area-downsample to 96 px (the benchmark renders at "
                                                       "192; 96 reproduces v3).")] = None,
    standardise: Annotated[Optional[bool], typer.Option("--standardise/--no-standardise", help="Per-image input "
                                                        "standardisation in the image tower (default: as the "
                                                        "model configuration / checkpoint).")] = None,
    stem_norm: Annotated[Optional[bool], typer.Option("--stem-norm/--no-stem-norm", help="From scratch: a "
                                                      "channel LayerNorm after each stride-2 stem convolution, so "
                                                      "LayerNorm-only adaptation reaches low-level features "
                                                      "(default on, as v6; v3: off).")] = None,
    mlp_norm: Annotated[Optional[bool], typer.Option("--mlp-norm/--no-mlp-norm", help="A LayerNorm on each image "
                                                     "block's MLP hidden activations (NormFormer), more "
                                                     "LayerNorm parameters for adaptation (default off, as "
                                                     "v6.1). With --init-from, --mlp-norm inserts them into a "
                                                     "checkpoint without them.")] = None,
    zero_unseen_pieces: Annotated[Optional[bool], typer.Option(
        "--zero-unseen-pieces/--keep-unseen-pieces", help="From scratch: after training, zero the embeddings of "
        "n-gram buckets no training word used, so an unseen n-gram (a typo's) adds nothing to its word "
        "(default on, as the shipped model).")] = None,
) -> None:
    """Train the embedded world's source model from scratch, as the shipped one was trained (or fine-tune one:
    --init-from, --train-towers)."""
    from dataclasses import replace

    from qshift.train.model_card import write_model_card
    from qshift.train.world_training import TrainConfig, train_world_model

    cfg = TrainConfig(seed=seed)
    overrides = {k: v for k, v in {"steps": steps, "pool_size": pool_size, "eval_every": eval_every, "typo_p": typo_p,
                                   "typo_max_edits": typo_max_edits, "lr": lr,
                                   "init_from": str(init_from) if init_from else None,
                                   "train_towers": train_towers, "noise_p": noise_p,
                                   "standardise_input": standardise, "render_size": render_size,
                                   "noise_std_max": noise_std_max, "stem_norm": stem_norm,
                                   "illum_p": illum_p, "illum_amp_max": illum_amp_max, "mlp_norm": mlp_norm,
                                   "zero_unseen_pieces": zero_unseen_pieces}.items() if v is not None}
    cfg = replace(cfg, **overrides)
    if (cfg.illum_p > 0) != (cfg.illum_amp_max > 0):
        raise typer.BadParameter("--illum-p and --illum-amp-max go together: give both (> 0) or neither")
    if zero_unseen_pieces is not None and init_from is not None:
        raise typer.BadParameter("--zero-unseen-pieces / --keep-unseen-pieces apply to a model trained from "
                                 "scratch; a fine-tune keeps its checkpoint's zeroed buckets (they get no gradient)")
    if stem_norm is not None and init_from is not None:
        raise typer.BadParameter("--stem-norm / --no-stem-norm set the architecture of a model trained from "
                                 "scratch; a fine-tune keeps its checkpoint's")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, record = train_world_model(cfg, out=None, log=lambda s: console.print(s))
    card_path = write_model_card(model, record, out, command="qshift train-world-model " + " ".join(
        [f"--seed {seed}"] + [("--standardise" if v else "--no-standardise") if k == "standardise_input"
                              else ("--stem-norm" if v else "--no-stem-norm") if k == "stem_norm"
                              else ("--mlp-norm" if v else "--no-mlp-norm") if k == "mlp_norm"
                              else ("--zero-unseen-pieces" if v else "--keep-unseen-pieces")
                              if k == "zero_unseen_pieces"
                              else f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()]))
    console.print(f"weights: {out}\nmodel card: {card_path}")


def _flag(name: str, value) -> str:
    """The command-line flag that sets ``name`` to ``value`` (for the model card's command)."""
    bools = {"reword": ("--reword", "--no-reword"), "tune_text": ("--tune-text", "--freeze-text")}
    if name in bools:
        return bools[name][0 if value else 1]
    return f"--{name.replace('_', '-')} {value}"


@app.command("train-cir-model")
def train_cir_model_cmd(
    out: Annotated[Optional[Path], typer.Option(help="Where to write the CIR checkpoint (.pt: towers and combiner) "
                                                     "and the model card (.md beside it); default: the package's "
                                                     "shipped cir_model.pt.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the combiner's initialisation, batches and augmentation.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs over the cached train tokens (the best on "
                                                              "val is kept).")] = None,
    tower_lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate of the tuned tower "
                                                                    "layers.")] = None,
    tune_image_blocks: Annotated[Optional[int], typer.Option(min=0, help="Top image-tower blocks tuned (0: the "
                                                                         "image tower frozen).")] = None,
    tune_text: Annotated[Optional[bool], typer.Option("--tune-text/--freeze-text", help="Tune the text tower's "
                                                      "blocks and projection.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Keep the rendered-and-encoded tokens here, so a rerun "
                                                           "with the same data skips rendering.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help="Queries per InfoNCE batch.")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine).")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=1e-4, help="Fixed InfoNCE temperature.")] = None,
    train_queries: Annotated[Optional[int], typer.Option(min=1, help="Use the first N of the 10,000 train "
                                                                     "queries.")] = None,
    val_queries: Annotated[Optional[int], typer.Option(min=1, help="Select the epoch on the first N val queries "
                                                                   "(their own gallery rows; shipped: 1000).")] = None,
    test_queries: Annotated[Optional[int], typer.Option(min=1, help="Report the first N test queries (default: "
                                                                    "all 2,000).")] = None,
    hard_negatives: Annotated[Optional[int], typer.Option(min=0, max=5, help="Near-duplicates of each target used "
                                                                             "as hard negatives.")] = None,
    typo_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Per-word misspelling probability of "
                                                                           "the typo text variant (0: none).")] = None,
    reword: Annotated[Optional[bool], typer.Option("--reword/--no-reword", help="Also train on each text re-worded "
                                                   "in the source template families.")] = None,
    render_workers: Annotated[Optional[int], typer.Option(min=0, help="Processes rendering the scenes (0: in this "
                                                                      "one).")] = None,
    world_weights: Annotated[Optional[Path], typer.Option(help="The frozen world dual encoder (default: the "
                                                               "shipped one).")] = None,
) -> None:
    """Train the CIR world's source model (a combiner over the world towers, their top layers lightly tuned) as
    the shipped one was trained, and write its model card."""
    from dataclasses import replace

    from qshift.models.cir_model import shipped_cir_model_path
    from qshift.train.cir_training import CIRTrainConfig, train_cir_model

    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": temperature,
                                   "train_queries": train_queries, "val_queries": val_queries, "test_queries": test_queries, "hard_negatives": hard_negatives,
                                   "typo_p": typo_p, "reword": reword, "render_workers": render_workers,
                                   "tower_lr": tower_lr, "tune_image_blocks": tune_image_blocks, "tune_text": tune_text,
                                   "cache_dir": str(cache_dir) if cache_dir else None,
                                   "world_weights": str(world_weights) if world_weights else None}.items()
                 if v is not None}
    if world_weights is not None and not world_weights.is_file():
        raise typer.BadParameter(f"--world-weights: no file at {world_weights}")
    cfg = replace(CIRTrainConfig(seed=seed), **overrides)
    target = out if out is not None else shipped_cir_model_path()
    command = "qshift train-cir-model " + " ".join(
        [f"--seed {seed}"] + [_flag(k, v) for k, v in overrides.items() if k != "cache_dir"]
        + ([f"--out {out}"] if out is not None else []))
    _, record = train_cir_model(cfg, out=target, log=lambda s: console.print(s), command=command)
    console.print(f"weights: {target} ({record['weights']['bytes'] / 1e6:.1f} MB)\n"
                  f"model card: {target.with_suffix('.md')}")


@app.command("train-av-model")
def train_av_model_cmd(
    out: Annotated[Optional[Path], typer.Option(help="Where to write the AV checkpoint (.pt) and the model card "
                                                     "(.md beside it); default: the package's shipped av_model.pt.")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed for the initialisation, batches and augmentation.")] = 0,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs over the train clips (the best on val is "
                                                              "kept).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help="Clips per InfoNCE batch.")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine).")] = None,
    temperature: Annotated[Optional[float], typer.Option(min=1e-4, help="Fixed InfoNCE temperature.")] = None,
    train_clips: Annotated[Optional[int], typer.Option(min=2, help="Use the first N train clips.")] = None,
    val_clips: Annotated[Optional[int], typer.Option(min=2, help="Select the epoch on the first N val clips "
                                                                 "(shipped: 1000).")] = None,
    test_clips: Annotated[Optional[int], typer.Option(min=2, help="Report the first N test clips (default: all "
                                                                  "2,000).")] = None,
) -> None:
    """Train the video-audio world's source model (a CAV-MAE-shaped dual encoder, from scratch) as the shipped
    one was trained, and write its model card."""
    from dataclasses import replace

    from qshift.models.av_model import shipped_av_weights_path
    from qshift.train.av_training import AVTrainConfig, train_av_model

    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "temperature": temperature,
                                   "train_clips": train_clips, "val_clips": val_clips,
                                   "test_clips": test_clips}.items() if v is not None}
    cfg = replace(AVTrainConfig(seed=seed), **overrides)
    target = out if out is not None else shipped_av_weights_path()
    command = "qshift train-av-model " + " ".join(
        [f"--seed {seed}"] + [_flag(k, v) for k, v in overrides.items()] + ([f"--out {out}"] if out is not None else []))
    _, record = train_av_model(cfg, out=target, log=lambda s: console.print(s), command=command)
    console.print(f"weights: {target} ({record['weights']['bytes'] / 1e6:.1f} MB)\n"
                  f"model card: {target.with_suffix('.md')}")
