"""Zeroing the text tower's n-gram embedding rows that training never used (so an unseen n-gram, e.g. a
test-time typo's, adds nothing to its word), and finding those rows in a model trained before that step."""
from __future__ import annotations

import torch

from qshift.models.world_model import WorldDualEncoder


def zero_unseen_pieces(model: WorldDualEncoder, seen: torch.Tensor) -> int:
    """Zero the text tower's n-gram embedding rows whose bucket is not in ``seen`` (bool [n_buckets]).

    An n-gram bucket that training never used still holds its random initialisation; at test time a
    misspelt word's new n-grams would add that noise to the word.  Zeroed, they add nothing, and a typo
    keeps the (scaled) meaning of the n-grams it shares with the correct word.  Words made only of
    seen n-grams (every clean caption of the world) encode exactly as before.  Returns the rows zeroed
    (the padding row 0 is zero already and not counted)."""
    emb = model.text.pieces.weight
    if seen.shape != (emb.shape[0],) or seen.dtype != torch.bool:
        raise ValueError(f"seen must be a bool tensor of shape ({emb.shape[0]},), got {seen.dtype} {tuple(seen.shape)}")
    unseen = ~seen.clone()
    unseen[0] = False
    with torch.no_grad():
        emb[unseen] = 0
    return int(unseen.sum())


def trained_pieces_by_init(model: WorldDualEncoder, seed: int = 0, tol: float = 2e-3) -> torch.Tensor:
    """For a model trained from scratch by :func:`~qshift.train.world_training.train_world_model` with ``seed``: the bool mask of n-gram
    buckets training used, found by rebuilding the seeded initialisation (a bucket never used gets no
    gradient, and AdamW without weight decay on the embeddings leaves it exactly at its initial value;
    ``tol`` is the relative change below which a row counts as unmoved, above fp16 rounding).  Used to apply :func:`zero_unseen_pieces` to a model trained before that step
    existed (v6; the result is the shipped v6.1)."""
    torch.manual_seed(seed)
    init = WorldDualEncoder(model.cfg).text.pieces.weight.detach()
    trained = model.text.pieces.weight.detach().float()
    moved = (trained - init).norm(dim=1) / init.norm(dim=1).clamp(min=1e-6)
    seen = moved > tol
    seen[0] = True
    return seen
