"""Source (no adaptation), Tent and the supervised Oracle upper bound."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.objectives import softmax_entropy
from qshift.options import Options, option

TEMPERATURE_HELP = "temperature of the N-way softmax over the gallery"


@register("source")
class Source(Method):
    """The unadapted source model: scores each batch once, changes nothing."""

    adapts = False


@register("tent")
class Tent(Method):
    """Tent (Wang et al., ICLR 2021): minimise the mean entropy of the N-way gallery softmax."""

    @dataclass(frozen=True)
    class Options(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)

    def setup(self) -> None:
        self.temperature = self.opts.temperature

    def loss(self, z, sims, step, labels):
        h = softmax_entropy(sims / self.temperature)
        return StepOutput(h.mean(), {"entropy": float(h.mean().detach())})


@register("oracle")
class Oracle(Method):
    """Supervised upper bound (docs/method.md §6): InfoNCE of each query against its true gallery items.

    Uses labels, so it is never a competitor; it shows how much LayerNorm-only adaptation could recover.
    ``negatives="gallery"`` (default) contrasts each query's true items with the whole gallery, the
    ranking that is scored; ``"batch"`` with the true items of the batch's other queries only (the
    in-batch, CLIP-style reading of "InfoNCE on the true pairs of each batch").
    """

    uses_labels = True
    supports_candidates = False  # its InfoNCE needs every true item, which need not be among the top-K

    @dataclass(frozen=True)
    class Options(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)
        negatives: str = option("gallery", "contrast the true items with the whole gallery, or with the batch's "
                                           "other true items only", choices=("gallery", "batch"))

    def setup(self) -> None:
        self.temperature, self.negatives = self.opts.temperature, self.opts.negatives
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
