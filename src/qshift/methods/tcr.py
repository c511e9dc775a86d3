"""TCR (Li et al., ICLR 2025): query prediction refinement + REM, uniformity and gap (METHOD.md §3–§4)."""
from __future__ import annotations

import torch

from qshift.methods.base import Method, StepOutput, register
from qshift.methods.objectives import (ReliableQueue, gap_loss, nearest_candidates, refined_entropy, rem_loss,
                                       uniformity_loss)

QUEUE_REFRESH = ("first-k", "sliding", "refresh-on-shift")


@register("tcr")
class TCR(Method):
    """TCR exactly as its authors' code: a queue of source-like pairs from the first K batches sets
    the entropy threshold E_m and the target gap Δ_S; the loss is L_REM + λ_U·L_U + λ_G·L_G."""

    @classmethod
    def option_names(cls):
        return ("tau", "ratio", "queue_size", "queue_batches", "t_uniform", "lambda_u", "lambda_g",
                "threshold_rule", "threshold_quantile", "refresh", "shift_band")

    def setup(self, tau: float = 0.02, ratio: float = 0.3, queue_size: int = 64, queue_batches: int = 10,
              t_uniform: float = 0.1, lambda_u: float = 1.0, lambda_g: float = 1.0,
              threshold_rule: str = "queue-max", threshold_quantile: float = 0.5, refresh: str = "first-k",
              shift_band: float = 3.0) -> None:
        if refresh not in QUEUE_REFRESH:
            raise ValueError(f"refresh must be one of {QUEUE_REFRESH}, got {refresh!r}")
        self.tau, self.t_uniform, self.lambda_u, self.lambda_g = tau, t_uniform, lambda_u, lambda_g
        self.queue_batches, self.refresh, self.shift_band = queue_batches, refresh, shift_band
        self.threshold_rule, self.threshold_quantile = threshold_rule, threshold_quantile
        self.queue = ReliableQueue(capacity=queue_size, ratio=ratio, tau=tau)
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
        _, c = nearest_candidates(sims, self.gallery)
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
