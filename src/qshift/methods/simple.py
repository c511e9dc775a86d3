"""Source (no adaptation), Tent and the supervised Oracle upper bound."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.objectives import softmax_entropy


@register("source")
class Source(Method):
    """The unadapted source model: scores each batch once, changes nothing."""

    adapts = False


@register("tent")
class Tent(Method):
    """Tent (Wang et al., ICLR 2021): minimise the mean entropy of the N-way gallery softmax."""

    @classmethod
    def option_names(cls):
        return ("temperature",)

    def setup(self, temperature: float = 0.01) -> None:
        self.temperature = temperature

    def loss(self, z, sims, step, labels):
        h = softmax_entropy(sims / self.temperature)
        return StepOutput(h.mean(), {"entropy": float(h.mean().detach())})


@register("oracle")
class Oracle(Method):
    """Supervised upper bound (METHOD.md §6): InfoNCE of each query against its true gallery items.

    Uses labels, so it is never a competitor; it shows how much LayerNorm-only adaptation could recover.
    ``negatives="gallery"`` (default) contrasts each query's true items with the whole gallery, the
    ranking that is scored; ``"batch"`` with the true items of the batch's other queries only (the
    in-batch, CLIP-style reading of "InfoNCE on the true pairs of each batch").
    """

    uses_labels = True

    @classmethod
    def option_names(cls):
        return ("temperature", "negatives")

    def setup(self, temperature: float = 0.01, negatives: str = "gallery") -> None:
        if negatives not in ("gallery", "batch"):
            raise ValueError(f"oracle negatives must be 'gallery' or 'batch', got {negatives!r}")
        self.temperature = temperature
        self.negatives = negatives
        if self.gallery_ids is None:
            raise ValueError("oracle needs gallery_ids")

    def loss(self, z, sims, step, labels):
        pos = labels[:, None] == self.gallery_ids[None, :]
        if self.negatives == "batch":
            # keep only the gallery items that are true for some query of the batch
            keep = pos.any(0)
            sims, pos = sims[:, keep], pos[:, keep]
        logp = F.log_softmax(sims / self.temperature, dim=1)
        loss = -(torch.logsumexp(logp.masked_fill(~pos, float("-inf")), dim=1)).mean()
        return StepOutput(loss, {"nll": float(loss.detach())})
