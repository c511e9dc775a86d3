"""A custom backbone for qshift, end to end: ``--model custom:custom_model:build``.

qshift calls the factory as ``build(direction=..., weights=..., **options)`` (plus ``device=...`` because this
one takes it) and expects a RetrievalModel back; docs/backbones.md ("Your own model") states the contract.
This file is the smallest honest instance: two tiny towers written with plain torch modules, one
checkpoint file holding both, the default adaptation rule (the query tower's LayerNorm affine parameters).

Run it (it saves untrained weights to a temporary file, loads them back through ``qshift.load_model`` and
adapts on three batches of random images against a few captions)::

    python examples/custom_model.py

Use it from the command line (the folder holding this file must be importable)::

    PYTHONPATH=examples qshift eval --model custom:custom_model:build --weights my_weights.pt \\
        --dataset coco --data-root /data/coco --benchmark coco/i2t
"""
from __future__ import annotations

import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qshift.errors import UserError
from qshift.models.dual_tower import DualTowerModel, freeze_except_adaptable, resolve_device
from qshift.models.preprocess import check_texts, images_to_tensor, tcr_transform
from qshift.models.protocol import RetrievalModel

IMAGE_SIZE = 32
N_BUCKETS = 4096


class ImageTower(nn.Module):
    """[B, 3, 32, 32] float → [B, embed_dim]: patch embedding, one transformer block, mean pool, projection."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, kernel_size=8, stride=8)
        self.ln_pre = nn.LayerNorm(width)
        self.block = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=2 * width, batch_first=True,
                                                norm_first=True, dropout=0.0)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.ln_pre(self.patches(x).flatten(2).transpose(1, 2))
        return self.proj(self.ln_post(self.block(tokens).mean(1)))


class TextTower(nn.Module):
    """Captions → [B, embed_dim]: the mean of hashed character-trigram embeddings, a LayerNorm, an MLP."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(N_BUCKETS, width, mode="mean")
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))

    @staticmethod
    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat trigram ids and per-caption offsets (what ``nn.EmbeddingBag`` takes)."""
        ids, offsets = [], []
        for text in texts:
            padded = f"  {text.lower()} "
            offsets.append(len(ids))
            ids += [zlib.crc32(padded[i:i + 3].encode()) % N_BUCKETS for i in range(len(padded) - 2)]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln(self.bag(ids, offsets)))


class TinyDualEncoder(nn.Module):
    """Both towers in one module, so one ``state_dict`` file holds the whole model."""

    def __init__(self, width: int = 32, embed_dim: int = 64) -> None:
        super().__init__()
        self.visual = ImageTower(width, embed_dim)
        self.text = TextTower(width, embed_dim)


def build(direction: str, weights: str | None = None, device: str = "cpu", width: int = 32,
          embed_dim: int = 64) -> RetrievalModel:
    """The RetrievalModel for ``direction`` (``i2t``: image queries against a caption gallery; ``t2i``: the
    reverse).  ``weights`` is a file written by :func:`save_weights` or ``"random"`` for an untrained model;
    ``width`` / ``embed_dim`` are this backbone's options (``load_model(..., width=64)``)."""
    if direction not in ("i2t", "t2i"):
        raise UserError(f"custom_model: direction must be i2t or t2i, got {direction!r}")
    dev = resolve_device(device)
    with torch.random.fork_rng():  # the "random" weights are the same on every call; the caller's RNG is untouched
        torch.manual_seed(0)
        encoder = TinyDualEncoder(width, embed_dim)
    if weights is None:
        raise UserError("custom_model needs --weights: a file saved by save_weights(), or 'random'")
    if weights != "random":
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"custom_model: weights file not found: {path}")
        try:
            encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError as e:  # missing / unexpected keys, other shapes
            raise UserError(f"custom_model: {path} does not match width={width}, embed_dim={embed_dim}") from e
    encoder.to(dev)
    transform = tcr_transform(IMAGE_SIZE)

    def encode_image(batch: Any) -> torch.Tensor:
        # a batch of images: uint8 RGB arrays [H, W, 3] (a list; sizes may differ), a uint8 array [B, H, W, 3],
        # PIL images or file paths, or an already transformed float tensor [B, 3, 32, 32]
        return encoder.visual(images_to_tensor(batch, transform, dev))

    def encode_text(batch: Any) -> torch.Tensor:
        # a batch of captions: a list of non-empty strings (perturbed ones too: typos, swapped words)
        ids, offsets = TextTower.tokenize(check_texts(batch))
        return encoder.text(ids.to(dev), offsets.to(dev))

    model = DualTowerModel({"image": encode_image, "text": encode_text},
                           {"image": encoder.visual, "text": encoder.text},
                           query_modality="image" if direction == "i2t" else "text", device=dev)
    # the factory owns requires_grad: everything frozen (eval mode), then exactly the rule's parameters
    # (here the default: every LayerNorm weight and bias of the query tower) get gradients back
    freeze_except_adaptable(model, [encoder])
    model.encoder = encoder  # so save_weights (and you) can reach the modules
    return model


def save_weights(model: RetrievalModel, path: str | Path) -> Path:
    """Write ``model``'s whole dual encoder (both towers) as one state-dict file that ``build`` reads."""
    torch.save(model.encoder.state_dict(), path)
    return Path(path)


def main() -> int:
    """Save untrained weights, load them through qshift's spec loader, adapt with Tent on three batches."""
    import numpy as np

    import qshift

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # make custom_model importable by qshift
    captions = ["a red dog on the mat", "a blue cat on the sofa", "a green bird in the tree", "a white horse"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_weights(build("i2t", "random"), Path(tmp) / "tiny.pt")
        model = qshift.load_model("custom:custom_model:build", "i2t", path)
        adapter = qshift.Adapter(model, captions, method="tent", lr=1e-3)
        before = [p.detach().clone() for _, p in model.adaptable_parameters()]
        for batch in range(3):
            images = rng.integers(0, 255, (4, 48, 40, 3), dtype=np.uint8)  # any size: resized to 32 x 32
            ids, scores = adapter.retrieve(images, k=2)
            print(f"batch {batch}: top-2 caption ids {ids.tolist()}")
        moved = sum(float((p.detach() - b).abs().sum()) for (_, p), b in zip(model.adaptable_parameters(), before))
        n = sum(p.numel() for _, p in model.adaptable_parameters())
        print(f"adapted {n} LayerNorm parameters of the image tower (total change {moved:.4f}); "
              "every other parameter is frozen")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
