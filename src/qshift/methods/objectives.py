"""The pieces of TCR's and REST's objective (docs/method.md §3–§4), as small pure functions.

All functions take L2-normalised query embeddings ``z`` [B, d] (differentiable) and the batch's
candidates ``c`` [B, d] (each query's nearest gallery item, constant).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def nearest_candidates(sims: torch.Tensor, gallery: torch.Tensor,
                       cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery row and embedding of each query's nearest gallery item, from query–gallery similarities
    (whose columns stand for gallery rows ``cols`` [B, K] in top-K mode)."""
    idx = sims.detach().argmax(dim=1)
    if cols is not None:
        idx = cols.gather(1, idx[:, None]).squeeze(1)
    return idx, gallery[idx]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def refined_entropy(z: torch.Tensor, c: torch.Tensor, tau: float = 0.02) -> torch.Tensor:
    """Entropy of each query's refined prediction: softmax over the batch's candidates of z·c_k/τ.

    Computed in float64 (a B×B product, cheap): queries split evenly over duplicated candidates
    have entropies tied with the reliability threshold, and the comparison must not depend on
    float32 rounding.
    """
    return softmax_entropy(z.double() @ c.double().T / tau)


@torch.no_grad()
def source_likeness(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """s_i = 2‖z_i − c_i‖ − ‖z_i − z̄‖ − ‖c_i − c̄‖; low = looks like source data."""
    return (2 * (z - c).norm(dim=1) - (z - z.mean(0)).norm(dim=1) - (c - c.mean(0)).norm(dim=1))


def modality_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖mean(normalise(a)) − mean(normalise(b))‖."""
    return (F.normalize(a, dim=1).mean(0) - F.normalize(b, dim=1).mean(0)).norm()


def rem_weights(h: torch.Tensor, threshold: torch.Tensor | float, eps: float = 1e-3) -> torch.Tensor:
    """w_i = max(0, 1 − H_i / (E_m + eps)), detached."""
    return (1.0 - h.detach() / (threshold + eps)).clamp(min=0)


def rem_loss(h: torch.Tensor, threshold: torch.Tensor | float, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-robust entropy: mean over {H ≤ E_m} of w·H, and the reliable mask.

    Returns an exact 0 (still attached to the graph) when no query passes — TCR's code gives NaN.
    """
    w = rem_weights(h, threshold, eps)
    mask = h.detach() <= threshold
    if not bool(mask.any()):
        return (h * 0.0).sum(), mask
    return (h * w)[mask].mean(), mask


def uniformity_loss(z: torch.Tensor, t: float = 0.1) -> torch.Tensor:
    """mean_i exp(−t‖z_i − z̄‖): small when queries spread out."""
    return torch.exp(-t * (z - z.mean(0)).norm(dim=1)).mean()


def gap_loss(z: torch.Tensor, c: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """(‖z̄ − c̄‖ − Δ_S)²."""
    return (modality_gap(z, c) - target) ** 2


#: how the entropy threshold E_m is read off the queue of source-like pairs
THRESHOLD_RULES = ("queue-max", "queue-quantile")


@dataclass
class ReliableQueue:
    """TCR's queue of source-like (s, z, c, H) pairs; keeps the ``capacity`` smallest s.

    ``push`` adds the ⌊ratio·B⌋ (at least 1) pairs of a batch with the smallest s.
    """

    capacity: int = 64
    ratio: float = 0.3
    tau: float = 0.02
    s: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    z: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    c: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    h: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    born: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # batch index of each entry

    def __len__(self) -> int:
        return int(self.s.numel())

    @torch.no_grad()
    def push(self, z: torch.Tensor, c: torch.Tensor, batch_index: int = 0) -> None:
        z, c = z.detach(), c.detach()
        k = max(1, int(self.ratio * z.shape[0]))
        s = source_likeness(z, c)
        h = refined_entropy(z, c, self.tau)
        pick = torch.argsort(s)[:k]
        born = torch.full((len(pick),), int(batch_index), dtype=torch.long)
        if len(self) == 0:
            self.s, self.z, self.c, self.h, self.born = s[pick], z[pick], c[pick], h[pick], born
        else:
            self.s = torch.cat([self.s.to(s.dtype), s[pick]])
            self.z = torch.cat([self.z.to(z.dtype), z[pick]])
            self.c = torch.cat([self.c.to(c.dtype), c[pick]])
            self.h = torch.cat([self.h.to(h.dtype), h[pick]])
            self.born = torch.cat([self.born, born])
        if len(self) > self.capacity:
            self._keep(torch.argsort(self.s, stable=True)[: self.capacity])

    def _keep(self, idx: torch.Tensor) -> None:
        self.s, self.z, self.c, self.h, self.born = self.s[idx], self.z[idx], self.c[idx], self.h[idx], self.born[idx]

    @torch.no_grad()
    def drop_older_than(self, batch_index: int) -> None:
        """Forget entries pushed before ``batch_index`` (the sliding-window policy)."""
        keep = (self.born >= batch_index).nonzero().flatten()
        if len(keep) < len(self):
            self._keep(keep)

    def entropy_threshold(self, rule: str = "queue-max", quantile: float = 0.5) -> torch.Tensor:
        if len(self) == 0:
            raise RuntimeError("the reliable-pair queue is empty")
        if rule == "queue-max":
            return self.h.max()
        if rule == "queue-quantile":
            return torch.quantile(self.h, quantile)
        raise ValueError(f"unknown threshold rule {rule!r}; expected 'queue-max' or 'queue-quantile'")

    def target_gap(self) -> torch.Tensor:
        if len(self) == 0:
            raise RuntimeError("the reliable-pair queue is empty")
        return modality_gap(self.z, self.c)

    def state_dict(self) -> dict:
        return {"s": self.s, "z": self.z, "c": self.c, "h": self.h, "born": self.born}

    def load_state_dict(self, state: dict) -> None:
        self.s, self.z, self.c, self.h, self.born = state["s"], state["z"], state["c"], state["h"], state["born"]
