"""A typo-tolerant subword tokenizer: each word is the bag of its hashed character n-grams.

Like fastText, a word ``w`` is represented by the hashed ids of ``<w>`` itself and of every
character n-gram (n = 2..4) of ``<w>``.  A typo changes only the few n-grams that touch the edited
character, so a misspelt word still shares most of its pieces with the correct one — the property
that real BPE tokenisers (CLIP, BLIP) have and whole-word vocabularies with an UNK token lack.
Encoding is deterministic (CRC-32 hashing) and needs no vocabulary file.
"""
from __future__ import annotations

import re
import zlib
from functools import lru_cache

import torch

# a word is a run of letters/digits, possibly joined by symbols inside it ("l*a+rge" stays one
# word, so a typo with a symbol still shares n-grams with "large"); lone punctuation is its own token
_WORD_RE = re.compile(r"[a-z0-9]+(?:[^\sa-z0-9]+[a-z0-9]+)*|[^\sa-z0-9]")


class NgramTokenizer:
    """Text → LongTensor [B, max_words, max_pieces] of hashed n-gram ids (0 = padding)."""

    def __init__(self, n_buckets: int = 8192, ngram_sizes: tuple[int, ...] = (2, 3, 4),
                 max_words: int = 48, max_pieces: int = 32) -> None:
        if n_buckets < 2:
            raise ValueError("n_buckets must be at least 2")
        self.n_buckets = n_buckets
        self.ngram_sizes = tuple(ngram_sizes)
        self.max_words = max_words
        self.max_pieces = max_pieces
        self._pieces = lru_cache(maxsize=200_000)(self._word_pieces)

    def config(self) -> dict:
        return {"n_buckets": self.n_buckets, "ngram_sizes": list(self.ngram_sizes),
                "max_words": self.max_words, "max_pieces": self.max_pieces}

    @staticmethod
    def split_words(text: str) -> list[str]:
        """Lower-case words (symbols inside a word stay in it) and lone punctuation marks, in order."""
        return _WORD_RE.findall(text.lower())

    def _hash(self, piece: str) -> int:
        return 1 + zlib.crc32(piece.encode("utf-8")) % (self.n_buckets - 1)

    def _word_pieces(self, word: str) -> tuple[int, ...]:
        marked = f"<{word}>"
        pieces = [marked]
        for n in self.ngram_sizes:
            pieces.extend(marked[i:i + n] for i in range(len(marked) - n + 1))
        ids = tuple(dict.fromkeys(self._hash(p) for p in pieces))  # dedupe, keep order
        return ids[: self.max_pieces]

    def word_pieces(self, word: str) -> tuple[int, ...]:
        """The hashed piece ids of one word (at most ``max_pieces``)."""
        return self._pieces(word)

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.max_words, self.max_pieces, dtype=torch.long)
        longest, widest = 1, 1
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {b} is {type(text).__name__}, expected str")
            words = self.split_words(text)
            if not words:
                raise ValueError(f"text {b} is empty after tokenisation: {text!r}")
            for i, w in enumerate(words[: self.max_words]):
                ids = self._pieces(w)
                out[b, i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                widest = max(widest, len(ids))
            longest = max(longest, min(len(words), self.max_words))
        return out[:, :longest, :widest].contiguous()
