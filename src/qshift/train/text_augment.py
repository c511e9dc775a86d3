"""Caption-side regularisation of the world model's training: fixed one-edit (or few-edit) misspellings
of words, looked up per word with some probability, and n-gram piece dropout (like BPE-dropout)."""
from __future__ import annotations

import numpy as np
import torch

from qshift.models.world_model import WorldDualEncoder

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def misspell(word: str, rng: np.random.Generator, edits: int = 1) -> str:
    """``word`` with ``edits`` successive random character edits (insert, delete, substitute or
    adjacent swap); words shorter than 3 characters are left alone."""
    if len(word) < 3:
        return word
    for _ in range(edits - 1):
        word = _one_edit(word, rng) if len(word) >= 3 else word
    return _one_edit(word, rng) if len(word) >= 3 else word


def _one_edit(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(len(word)))
    op = int(rng.integers(4))
    c = _LETTERS[int(rng.integers(26))]
    if op == 0:
        return word[:i] + c + word[i:]
    if op == 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + c + word[i + 1:]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def typo_table(model: WorldDualEncoder, vocab: list[str], k: int, seed: int, max_edits: int = 1) -> torch.Tensor:
    """[V, 1 + k, P] piece ids: slot 0 the word itself, slots 1..k fixed misspellings of it, each with
    1..``max_edits`` edits."""
    if max_edits < 1:
        raise ValueError(f"max_edits must be at least 1, got {max_edits}")
    tok = model.tokenizer
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))

    def variant(w: str) -> tuple[int, ...]:
        # with max_edits == 1 no extra number is drawn, so the shipped table is reproduced exactly
        edits = 1 if max_edits == 1 else int(rng.integers(1, max_edits + 1))
        return tok.word_pieces(misspell(w, rng, edits))

    rows = [[tok.word_pieces(w) if w else ()] + [variant(w) if w else () for _ in range(k)] for w in vocab]
    P = max(len(r) for row in rows for r in row)
    out = torch.zeros(len(vocab), 1 + k, P, dtype=torch.long)
    for i, row in enumerate(rows):
        for j, r in enumerate(row):
            out[i, j, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def word_pieces_with_typos(table: torch.Tensor, words: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Look up [B, L] word ids in a :func:`typo_table`, each word misspelt with probability ``p``."""
    if p <= 0:
        return table[words, 0]
    k = table.shape[1] - 1
    slot = torch.randint(1, k + 1, words.shape, generator=gen)
    slot = torch.where(torch.rand(words.shape, generator=gen) < p, slot, torch.zeros_like(slot))
    return table[words, slot]


def drop_pieces(pieces: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each non-padding piece with probability ``p``; a word that would lose all keeps its own."""
    if p <= 0:
        return pieces
    real = pieces > 0
    drop = (torch.rand(pieces.shape, generator=gen) < p) & real
    emptied = (real & ~drop).sum(-1) == 0
    drop[emptied] = False
    return pieces.masked_fill(drop, 0)
