"""Entropy-based TTA baselines on the N-way gallery softmax: ETA / EATA, SAR, SHOT-IM (docs/method.md §6)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.objectives import softmax_entropy
from qshift.methods.simple import TEMPERATURE_HELP
from qshift.options import Options, option

log = logging.getLogger(__name__)


def entropy_margin(e_margin: float, n: int) -> float:
    """The entropy margin E0 over an ``n``-item gallery: ``e_margin`` given as a fraction (< 1.0 → fraction
    of ln N) or as an absolute entropy."""
    return e_margin * math.log(n) if e_margin < 1.0 else e_margin


def entropy_filter_options(e_margin_default: float) -> type[Options]:
    """The options the entropy-filtering methods share, declared once: the softmax temperature and the
    entropy margin E0 (see :func:`entropy_margin`), ``e_margin_default`` the method's default for it.
    ETA / EATA here and DeYO (:mod:`qshift.methods.confidence_baselines`) subclass the result and add their
    own options after these two."""

    @dataclass(frozen=True)
    class EntropyFilterOptions(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)
        e_margin: float = option(e_margin_default,
                                 "entropy margin E0: below 1, a fraction of ln N; else an absolute entropy", minimum=0.0)

    return EntropyFilterOptions


@register("eta")
class ETA(Method):
    """ETA (Niu et al., ICML 2022): entropy of reliable, non-redundant queries, weighted by exp(E0 − H)."""

    @dataclass(frozen=True)
    class Options(entropy_filter_options(e_margin_default=0.4)):
        d_margin: float = option(0.05, "redundancy margin: drop queries whose prediction is this close (cosine) "
                                       "to the running mean prediction", minimum=0.0)
        fisher_items: Any = option(None, "EATA: clean queries for the Fisher anchor (library use: raw items)")
        fisher_alpha: float = option(2000.0, "EATA: weight of the Fisher anchor", minimum=0.0)

    def setup(self) -> None:
        o = self.opts
        self.temperature, self.d_margin = o.temperature, o.d_margin
        self.e0 = entropy_margin(o.e_margin, self.n_columns)
        self.mean_probs: torch.Tensor | None = None
        self.fisher: list[torch.Tensor] | None = None
        self.fisher_alpha = o.fisher_alpha
        if o.fisher_items is not None:
            self.fisher = self._fisher(o.fisher_items)

    def extra_state(self) -> dict:
        return {"mean_probs": self.mean_probs}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.mean_probs = state["mean_probs"]

    def _fisher(self, items) -> list[torch.Tensor]:
        """Diagonal Fisher of the entropy loss on clean queries (EATA's anti-forgetting weights)."""
        z = self.encode(items)
        h = softmax_entropy(self._sims(z)[0] / self.temperature).mean()
        return [g.detach() ** 2 for g in self.param_grads(h)]

    def loss(self, z, sims, step, labels):
        logits = sims / self.temperature
        h = softmax_entropy(logits)
        keep = h.detach() < self.e0
        probs = logits.softmax(1).detach()
        if self.mean_probs is not None and bool(keep.any()):
            if self.cols is None:
                cos = F.cosine_similarity(self.mean_probs[None, :], probs, dim=1)
            else:  # the running mean is over the gallery, each prediction over its own candidates
                dot = (self.mean_probs[self.cols] * probs).sum(1)
                cos = dot / (self.mean_probs.norm() * probs.norm(dim=1)).clamp_min(1e-8)
            keep = keep & (cos.abs() < 1 - self.d_margin)
        logs = {"kept": int(keep.sum()), "entropy": float(h.mean().detach())}
        reg = None
        if self.fisher is not None:
            reg = self.fisher_alpha * sum((f * (p - s) ** 2).sum()
                                          for f, p, s in zip(self.fisher, self.params, self.source_state))
        if not bool(keep.any()):
            return StepOutput(reg if reg is not None else None, logs)
        if step == 0:
            new = self.mean_prediction(probs[keep], None if self.cols is None else self.cols[keep])
            self.mean_probs = new if self.mean_probs is None else 0.9 * self.mean_probs + 0.1 * new
        w = torch.exp(self.e0 - h.detach())
        loss = (h * w)[keep].mean()
        return StepOutput(loss if reg is None else loss + reg, logs)


@register("eata")
class EATA(ETA):
    """EATA: ETA plus a Fisher-weighted anchor to the source parameters (``fisher_items`` = clean
    queries); without clean queries it is ETA, and says so in the log."""

    def setup(self) -> None:
        super().setup()
        if self.fisher is None:
            log.warning("eata: no clean queries given (fisher_items); running as ETA")


@register("shot-im")
class ShotIM(Method):
    """SHOT-IM (Liang et al., ICML 2020): mean entropy minus the entropy of the mean prediction."""

    @dataclass(frozen=True)
    class Options(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)
        diversity_weight: float = option(1.0, "weight of the diversity term (entropy of the mean prediction)")

    def setup(self) -> None:
        self.temperature, self.diversity_weight = self.opts.temperature, self.opts.diversity_weight

    def loss(self, z, sims, step, labels):
        p = (sims / self.temperature).softmax(1)
        ent = softmax_entropy(sims / self.temperature).mean()
        mean_p = self.mean_prediction(p)
        div = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
        return StepOutput(ent - self.diversity_weight * div, {"entropy": float(ent.detach()), "diversity": float(div.detach())})


@register("sar")
class SAR(Method):
    """SAR (Niu et al., ICLR 2023): entropy of the lowest-entropy 40 % of queries, a sharpness-aware
    (SAM) step, and a reset to the source model when the EMA of the loss falls below 0.2."""

    @dataclass(frozen=True)
    class Options(Options):
        temperature: float = option(0.01, TEMPERATURE_HELP, minimum=0.0, exclusive_minimum=True)
        keep_fraction: float = option(0.4, "share of the batch's lowest-entropy queries used", minimum=0.0,
                                      maximum=1.0, exclusive_minimum=True)
        rho: float = option(0.05, "SAM neighbourhood radius ρ", minimum=0.0)
        reset_below: float = option(0.2, "reset to the source model when the loss EMA falls below this")
        ema: float = option(0.9, "decay of the loss EMA", minimum=0.0, maximum=1.0)

    def setup(self) -> None:
        o = self.opts
        self.temperature, self.keep_fraction, self.rho = o.temperature, o.keep_fraction, o.rho
        self.reset_below, self.ema_rate = o.reset_below, o.ema
        self.loss_ema: float | None = None
        self.resets = getattr(self, "resets", 0)
        self._items = None

    def on_batch_start(self, items) -> None:
        self._items = items

    def extra_state(self) -> dict:
        return {"loss_ema": self.loss_ema, "resets": self.resets}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.loss_ema, self.resets = state["loss_ema"], state["resets"]

    def _selected_loss(self, z, keep=None):
        h = softmax_entropy(self.score_rows(z, self.cols) / self.temperature)
        if keep is None:
            k = max(1, int(math.ceil(self.keep_fraction * len(h))))
            keep = torch.argsort(h.detach())[:k]
        return h[keep].mean(), keep

    def loss(self, z, sims, step, labels):
        loss, keep = self._selected_loss(z)
        self._keep = keep
        return StepOutput(loss, {"entropy": float(loss.detach()), "kept": int(len(keep))}, z=z)

    def gradients(self, out):
        # SAM: ascend to θ + ρ·g/‖g‖, take the gradient there, come back
        g1 = self.param_grads(out.loss)
        norm = torch.sqrt(sum((g ** 2).sum() for g in g1)) + 1e-12
        eps = [self.rho * g / norm for g in g1]
        with torch.no_grad():
            for p, e in zip(self.params, eps):
                p.add_(e)
        try:
            z2 = self.encode(self._items)
            loss2, _ = self._selected_loss(z2, self._keep)
            g2 = self.param_grads(loss2)
        finally:
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    p.sub_(e)
        value = float(loss2.detach())
        self.loss_ema = value if self.loss_ema is None else self.ema_rate * self.loss_ema + (1 - self.ema_rate) * value
        return g2, {"sam_loss": value, "loss_ema": self.loss_ema}

    def adapt_batch(self, items, labels=None):
        scores, record = super().adapt_batch(items, labels)
        if self.loss_ema is not None and self.loss_ema < self.reset_below:
            resets = self.resets + 1
            self.reset()
            self.resets = resets
            record["reset"] = True
        record["resets"] = self.resets
        return scores, record
