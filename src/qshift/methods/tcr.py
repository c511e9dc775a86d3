"""TCR (Li et al., ICLR 2025): query prediction refinement + REM, uniformity and gap (docs/method.md §3–§4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.objectives import (THRESHOLD_RULES, ReliableQueue, gap_loss, nearest_candidates, refined_entropy,
                                       rem_loss, uniformity_loss)
from qshift.options import Options, option

QUEUE_REFRESH = ("first-k", "sliding", "refresh-on-shift")


@dataclass(frozen=True)
class TCROptions(Options):
    """TCR's options (docs/method.md §3–§4); REST's extend them."""

    tau: float = option(0.02, "temperature τ of the refined query prediction over the candidates",
                        minimum=0.0, exclusive_minimum=True)
    ratio: float = option(0.3, "share ρ of each queue batch's most source-like pairs kept", minimum=0.0, maximum=1.0)
    queue_size: int = option(64, "capacity of the queue of source-like pairs", minimum=1)
    queue_batches: int = option(10, "batches whose pairs enter the queue (the first K, or the sliding window)",
                                minimum=1)
    t_uniform: float = option(0.1, "temperature t of the uniformity loss", minimum=0.0, exclusive_minimum=True)
    lambda_u: float = option(1.0, "weight λ_U of the uniformity loss L_U")
    lambda_g: float = option(1.0, "weight λ_G of the query–gallery gap loss L_G")
    threshold_rule: str = option("queue-max", "how the entropy threshold E_m is read off the queue",
                                 choices=THRESHOLD_RULES)
    threshold_quantile: float = option(0.5, "the quantile, for threshold_rule `queue-quantile`", minimum=0.0,
                                       maximum=1.0)
    refresh: str = option("first-k", "when the queue takes new pairs", choices=QUEUE_REFRESH)
    shift_band: float = option(3.0, "refresh-on-shift: restart when a batch's mean entropy leaves the running "
                                    "mean ± this many standard deviations", minimum=0.0)


@register("tcr")
class TCR(Method):
    """TCR exactly as its authors' code: a queue of source-like pairs from the first K batches sets
    the entropy threshold E_m and the target gap Δ_S; the loss is L_REM + λ_U·L_U + λ_G·L_G."""

    Options = TCROptions

    def setup(self) -> None:
        o = self.opts
        self.tau, self.t_uniform, self.lambda_u, self.lambda_g = o.tau, o.t_uniform, o.lambda_u, o.lambda_g
        self.queue_batches, self.refresh, self.shift_band = o.queue_batches, o.refresh, o.shift_band
        self.threshold_rule, self.threshold_quantile = o.threshold_rule, o.threshold_quantile
        self.queue = ReliableQueue(capacity=o.queue_size, ratio=o.ratio, tau=o.tau)
        self._window_start = 0  # batch index at which the current first-k window began
        self._entropy_stats: list[float] = []

    # -- the queue ---------------------------------------------------------------------
    def _should_push(self) -> bool:
        if self.refresh == "sliding":
            return True
        return self.batches_seen - self._window_start < self.queue_batches

    def _maybe_refresh(self, z: torch.Tensor, c: torch.Tensor) -> bool:
        """refresh-on-shift: restart the window when the batch's mean entropy leaves the running band."""
        h = float(refined_entropy(z.detach(), c, self.tau).mean())
        hist = self._entropy_stats
        shifted = False
        if len(hist) >= 5:
            t = torch.tensor(hist[-20:])
            mu, sd = float(t.mean()), float(t.std()) + 1e-3
            shifted = abs(h - mu) > self.shift_band * sd
        if shifted:
            self.queue = ReliableQueue(self.queue.capacity, self.queue.ratio, self.tau)
            self._window_start = self.batches_seen
            self._entropy_stats = []
        self._entropy_stats.append(h)
        return shifted

    def _push(self, z: torch.Tensor, c: torch.Tensor) -> None:
        if self.refresh == "sliding":
            # the Q smallest s among the entries of the last `queue_batches` batches
            self.queue.drop_older_than(self.batches_seen - self.queue_batches + 1)
        self.queue.push(z, c, batch_index=self.batches_seen)

    # -- the loss ----------------------------------------------------------------------
    def tcr_terms(self, z: torch.Tensor, sims: torch.Tensor, step: int):
        _, c = nearest_candidates(sims, self.gallery, self.cols)
        refreshed = False
        if step == 0:
            if self.refresh == "refresh-on-shift":
                refreshed = self._maybe_refresh(z, c)
            if self._should_push():
                self._push(z, c)
        e_m = self.queue.entropy_threshold(self.threshold_rule, self.threshold_quantile)
        delta = self.queue.target_gap()
        h = refined_entropy(z, c, self.tau)
        rem, mask = rem_loss(h, e_m)
        uni = uniformity_loss(z, self.t_uniform)
        gap = gap_loss(z, c, delta)
        logs = {"rem": float(rem.detach()), "uniformity": float(uni.detach()), "gap": float(gap.detach()),
                "reliable": int(mask.sum()), "E_m": float(e_m), "delta_S": float(delta),
                "queue": len(self.queue), "refreshed": refreshed}
        return c, h, mask, e_m, rem, uni, gap, logs

    def loss(self, z, sims, step, labels):
        c, h, mask, e_m, rem, uni, gap, logs = self.tcr_terms(z, sims, step)
        total = rem.to(z.dtype) + self.lambda_u * uni + self.lambda_g * gap
        return StepOutput(total, logs, z=z)

    def extra_state(self) -> dict:
        return {"queue": self.queue.state_dict(), "window_start": self._window_start,
                "entropy_stats": list(self._entropy_stats)}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.queue.load_state_dict(state["queue"])
            self._window_start = state["window_start"]
            self._entropy_stats = list(state["entropy_stats"])
