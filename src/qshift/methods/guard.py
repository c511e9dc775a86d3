"""The collapse guard: a label-free monitor that sends a collapsing adaptation back to the source state.

Entropy-minimising methods can collapse on a stream: R@1 falls towards zero within a few batches while
the adapted model keeps answering confidently.  The guard compares, on every batch, the adapted model's
ranking and embeddings with the source model's on the same queries (two extra forwards without gradients:
the current and the source parameters) through one of six label-free signals:

- ``spread`` — how far apart the batch's query embeddings are (their mean pairwise cosine distance) under
  the adapted model, over the same under the source model: entropy minimisation that collapses pulls the
  queries together (below 1) even while their top-1 items stay distinct, whereas adaptation that repairs a
  severe shift (TCR on heavy noise) pushes the noise-blurred queries apart (above 1);

- ``plausible`` — the share of queries whose adapted top-1 the source model scores within
  :data:`PLAUSIBLE_Z` standard deviations (of its scores for that query) of its own top-1: where the
  source is unsure (a severe shift) many items are plausible and a good adaptation may pick any of them;
  where it is sure (clean queries), a collapse picks what it finds implausible;
- ``confident`` — ``containment`` with each query weighted by how sure the source model is of it (its
  top-1 softmax probability at temperature :data:`SOURCE_TAU`): under a severe shift a good adaptation
  leaves the source's unsure rankings, but keeps the ones the source was sure of;
- ``containment`` — the share of queries whose adapted top-1 item is among the source model's top
  :data:`TOP_K` (adaptation refines a ranking, a collapse leaves it);
- ``agreement`` — the share of queries whose adapted top-1 is the source's top-1;
- ``diversity`` — distinct top-1 items of the adapted model over the source model's (a collapse onto a
  few hub items drives it towards ``1 / B``).

All six are recorded for every batch; ``collapse_signal`` picks the one that decides.  When its mean over
the last ``collapse_window`` batches falls below ``collapse_ratio``, the method is reset to the source
parameters and the event is recorded.  It is the protocol's ``reset=on-collapse`` (docs/method.md §2),
usable by every method and by :class:`qshift.Adapter`; the defaults were chosen on val streams
(``benchmarks/tune_collapse_guard.py``, ``results/collapse-guard/README.md``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from qshift.options import COLLAPSE_SIGNALS as SIGNALS

#: the source ranking depth that ``containment`` and ``confident`` check the adapted top-1 against
TOP_K = 10
#: how far (in standard deviations of the source's scores for the query) below the source's own top-1 the
#: adapted top-1 may score under the source model and still count as ``plausible``
PLAUSIBLE_Z = 1.0
#: the temperature of the source model's softmax over the gallery that weighs each query in ``confident``
SOURCE_TAU = 0.01


def distinct_top1(scores: torch.Tensor, rows: torch.Tensor | None = None) -> int:
    """How many distinct gallery rows are ranked first over a batch of score rows [B, N] (or [B, K] whose
    columns stand for gallery ``rows`` [B, K])."""
    best = scores.argmax(dim=1)
    if rows is not None:
        best = rows.gather(1, best[:, None]).squeeze(1)
    return int(torch.unique(best).numel())


def spread(z: torch.Tensor) -> float:
    """The mean pairwise cosine distance (1 − cos) between the rows of unit-norm embeddings ``z`` [B, D]."""
    b = z.shape[0]
    if b < 2:
        return 1.0
    gram = z @ z.T
    return float(1.0 - (gram.sum() - gram.diagonal().sum()) / (b * (b - 1)))


def signals(adapted: torch.Tensor, source: torch.Tensor, k: int = TOP_K, *, rows: torch.Tensor | None = None,
            source_mean: torch.Tensor | None = None, source_std: torch.Tensor | None = None,
            z_adapted: torch.Tensor | None = None, z_source: torch.Tensor | None = None) -> dict[str, float]:
    """The label-free signals of one batch, from the adapted and the source model's scores [B, N] and
    query embeddings [B, D] (``spread`` is 1.0 — no evidence — when the embeddings are not given).

    Top-K mode: both score the same columns, gallery ``rows`` [B, C] (``-inf`` where a column is not
    scored), and ``source_mean`` / ``source_std`` [B] are the source's score statistics over the whole
    gallery (the z-scores of ``plausible``); the softmax of ``confident`` is then over the columns only.
    A gallery row is scored in at most one column, so comparing columns compares rows."""
    top1 = adapted.argmax(dim=1)
    src_top = source.topk(min(k, source.shape[1]), dim=1).indices
    inside = (src_top == top1[:, None]).any(dim=1).float()
    # how the source model scores the adapted choice, in standard deviations of its scores for that query
    mean = source.mean(dim=1, keepdim=True) if source_mean is None else source_mean[:, None]
    std = source.std(dim=1, keepdim=True) if source_std is None else source_std[:, None]
    z = (source - mean) / std.clamp_min(1e-12)
    lag = z.amax(dim=1) - z.gather(1, top1[:, None]).squeeze(1)
    weight = (source / SOURCE_TAU).softmax(dim=1).amax(dim=1)  # how sure the source model is of each query
    return {"plausible": float((lag <= PLAUSIBLE_Z).float().mean()),
            "confident": float((weight * inside).sum() / weight.sum().clamp_min(1e-12)),
            "containment": float(inside.mean()),
            "agreement": float((src_top[:, 0] == top1).float().mean()),
            "diversity": distinct_top1(adapted, rows) / max(1, distinct_top1(source, rows)),
            "spread": (1.0 if z_adapted is None or z_source is None
                       else spread(z_adapted.double()) / max(spread(z_source.double()), 1e-12))}


@dataclass
class CollapseGuard:
    """The mean of one signal over a window of batches, against a threshold."""

    window: int
    ratio: float
    signal: str = "spread"
    history: deque = field(init=False)
    fired: int = 0

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"collapse signal must be one of {SIGNALS}, got {self.signal!r}")
        self.history = deque(maxlen=self.window)

    def observe(self, adapted: torch.Tensor, source: torch.Tensor, **top_k: torch.Tensor) -> dict[str, float | bool]:
        """Add one batch (the scores returned, and the source model's on the same queries; ``top_k``: the
        top-K mode's arguments of :func:`signals`); return its signals, the window's mean and whether the
        window now says *collapsed* (which clears it)."""
        sig = signals(adapted, source, **top_k)
        self.history.append(sig[self.signal])
        mean = sum(self.history) / len(self.history)
        collapsed = len(self.history) == self.window and mean < self.ratio
        if collapsed:
            self.fired += 1
            self.history.clear()
        return {**sig, "window_mean": mean, "collapsed": collapsed}

    def clear(self) -> None:
        self.history.clear()
