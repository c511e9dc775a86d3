"""``qshift shifts preview``: a picture of every corruption and domain, and text examples."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qshift.atomic import save_figure_atomic
from qshift.data import world
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, corrupt_image
from qshift.shifts.text import LEVELS, TEXT_PERTURBATIONS, perturb_text


def draw_image_preview(out: str | Path, image_index: int = 0, seed: int = 0) -> Path:
    """Grid: one row per corruption (clean + severities 1–5), then one row of rendering domains."""
    import matplotlib  # imported here to pick the file backend before pyplot loads (no display)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = world.load_split("test")
    if not 0 <= image_index < len(test):
        raise ValueError(f"image_index must be in [0, {len(test)}), got {image_index}")
    scene = test.scenes[image_index]
    clean = world.render_scene(scene)
    n_rows, n_cols = len(CORRUPTIONS) + 1, len(SEVERITIES) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols + 1.6, 1.6 * n_rows + 0.8))
    for r, name in enumerate(CORRUPTIONS):
        for c in range(n_cols):
            ax = axes[r, c]
            img = clean if c == 0 else corrupt_image(clean, name, SEVERITIES[c - 1], image_index, seed)
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0:
                ax.set_title("clean" if c == 0 else f"severity {SEVERITIES[c - 1]}", fontsize=9)
    for c in range(n_cols):
        ax = axes[-1, c]
        ax.set_xticks([])
        ax.set_yticks([])
        if c < len(world.DOMAINS):
            ax.imshow(world.render_scene(scene, domain=world.DOMAINS[c]))
            ax.set_xlabel(world.DOMAINS[c], fontsize=9)
        else:
            ax.axis("off")
    axes[-1, 0].set_ylabel("QGS domains", rotation=0, ha="right", va="center", fontsize=9)
    caption = test.captions[int(np.flatnonzero(test.caption_image == image_index)[0])]
    fig.suptitle(f"Image corruptions (imagecorruptions-imaug) on test image {image_index}, seed {seed}\n"
                 f"\u201c{caption}\u201d", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    out = save_figure_atomic(fig, out, dpi=90)
    plt.close(fig)
    return out


def text_examples(image_index: int = 0, seed: int = 0, levels: tuple[int, ...] = (3, 6)) -> list[str]:
    """Lines showing one caption under every text perturbation and held-out style."""
    test = world.load_split("test")
    k = int(np.flatnonzero(test.caption_image == image_index)[0])
    caption = test.captions[k]
    lines = [f"clean caption: {caption}"]
    for p in TEXT_PERTURBATIONS:
        for lvl in levels:
            if lvl in LEVELS:
                lines.append(f"{p:>18} level {lvl}: {perturb_text(caption, p, lvl, k, seed)}")
    rng = np.random.default_rng(seed)
    for style in world.HELD_OUT_FAMILIES:
        lines.append(f"{'style ' + style:>18}        : {world.caption_scene(test.scenes[image_index], style, rng)}")
    return lines
