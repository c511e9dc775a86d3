"""Batched encoding helpers shared by evaluation and the engine."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def encode_batched(encode: Callable[[Any], torch.Tensor], items: Sequence, batch_size: int = 256,
                   desc: str | None = None, progress: bool = False) -> torch.Tensor:
    """Encode ``items`` in slices of ``batch_size`` and concatenate the [n, d] embeddings."""
    if len(items) == 0:
        raise ValueError("nothing to encode")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    starts = range(0, len(items), batch_size)
    chunks = [encode(items[s:s + batch_size]) for s in tqdm(starts, desc=desc, disable=not progress, leave=False)]
    out = torch.cat(chunks)
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"non-finite embeddings while encoding {desc or 'items'}")
    return out
