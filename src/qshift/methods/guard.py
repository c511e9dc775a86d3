"""The collapse guard: a label-free monitor that sends a collapsing adaptation back to the source state.

Entropy-minimising methods can collapse on a stream (every query retrieves the same few gallery items,
R@1 falls to near zero within a few batches).  The guard watches one signal per batch, the **diversity
ratio**: how many distinct gallery items the adapted model ranks first, divided by how many the source
model ranks first on the same batch (one extra forward, without gradients, at the source parameters).
A healthy adaptation keeps it near 1; a collapse drives it towards ``1 / B``.  When its mean over the
last ``window`` batches falls below ``ratio``, the method is reset to the source parameters and the
event is recorded.  It is the protocol's ``reset=on-collapse`` (docs/method.md §2), usable by every
method and by :class:`qshift.Adapter`; the defaults were chosen on val streams
(``benchmarks/tune_collapse_guard.py``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


def distinct_top1(scores: torch.Tensor) -> int:
    """How many distinct gallery rows are ranked first over a batch of score rows [B, N]."""
    return int(torch.unique(scores.argmax(dim=1)).numel())


@dataclass
class CollapseGuard:
    """Diversity ratio of the adapted model's top-1 to the source model's, over a window of batches."""

    window: int
    ratio: float
    history: deque = field(init=False)
    fired: int = 0

    def __post_init__(self) -> None:
        self.history = deque(maxlen=self.window)

    def observe(self, adapted: torch.Tensor, source: torch.Tensor) -> dict[str, float | bool]:
        """Add one batch (the scores returned, and the source model's on the same queries); return the
        batch's signal and whether the window now says *collapsed* (which clears the window)."""
        rho = distinct_top1(adapted) / max(1, distinct_top1(source))
        self.history.append(rho)
        mean = sum(self.history) / len(self.history)
        collapsed = len(self.history) == self.window and mean < self.ratio
        if collapsed:
            self.fired += 1
            self.history.clear()
        return {"diversity_ratio": rho, "window_mean": mean, "collapsed": collapsed}

    def clear(self) -> None:
        self.history.clear()
