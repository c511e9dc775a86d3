"""REST (Li, Yang, Peng, 2025): TCR's refinement + a query-shift-robust objective + gradient decoupling.

The consistency term and the decoupling rule are this project's reconstruction (docs/method.md §4–§5);
every *(choice)* there is an option here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qshift.methods.base import StepOutput, register
from qshift.methods.confidence_baselines import take_items
from qshift.methods.objectives import (gap_loss, nearest_candidates, refined_entropy, rem_loss, source_likeness,
                                       uniformity_loss)
from qshift.methods.tcr import TCR, TCROptions
from qshift.options import option

log = logging.getLogger(__name__)

CONSISTENCY = ("off", "mutual", "align")
SIGNALS = ("anchor", "reliable", "memory")
PRECONDITION = ("none", "adam")
MODES = ("on-conflict", "always")
GRANULARITY = ("global", "per-tensor")
ANCHOR_ON = ("all", "unreliable")
PROJECTION_SPACE = ("parameters", "embeddings")
GEN_REFRESH = ("step", "batch")


@dataclass(frozen=True)
class RESTOptions(TCROptions):
    """REST's options: TCR's, plus the consistency term and the gradient decoupling (docs/method.md §4–§5)."""

    consistency: str = option("align", "query–gallery consistency term L_C: off, `align` (1 − cos to the "
                                       "candidate) or `mutual` (the candidate's backward prediction)",
                              choices=CONSISTENCY)
    lambda_c: float = option(1.0, "weight λ_C of the consistency term")
    decoupling: bool = option(True, "split the gradient into target-customisation and general-knowledge parts "
                                    "and project out their conflict")
    signal: str = option("anchor", "where the general-knowledge gradient comes from: the source model's "
                                   "predictions (`anchor`), the batch's source-like half (`reliable`) or a replay "
                                   "buffer of past reliable queries (`memory`)", choices=SIGNALS)
    mode: str = option("on-conflict", "project only when the two gradients conflict, or always", choices=MODES)
    granularity: str = option("global", "test and project the conflict over all parameters at once or per "
                                         "tensor", choices=GRANULARITY)
    lambda_a: float = option(0.1, "weight λ_A of the source anchor (KL to the source model's candidate "
                                  "prediction)", minimum=0.0)
    tau_a: float = option(0.1, "temperature of the anchor's candidate prediction", minimum=0.0,
                          exclusive_minimum=True)
    anchor_on: str = option("all", "queries the anchor applies to", choices=ANCHOR_ON)
    anchor_in_update: bool = option(True, "add the anchor to the update (else it only sets the projection "
                                          "direction)")
    batched_backward: bool = option(True, "one batched backward for the gradient parts (falls back when a "
                                          "kernel has no batching rule)")
    precondition: str = option("none", "conflict test in Adam's preconditioned metric (needs optimizer adamw)",
                               choices=PRECONDITION)
    memory_size: int = option(64, "signal `memory`: replay-buffer capacity (queries)", minimum=1)
    memory_min: int = option(16, "signal `memory`: queries in the buffer before it is used", minimum=1)
    projection_space: str = option("parameters", "where the conflict is tested and projected out: the adapted "
                                                 "parameters' gradients (two backward passes per step) or the "
                                                 "query embeddings' gradients [B, d] (one backward: cheaper, "
                                                 "another projection)", choices=PROJECTION_SPACE)
    gen_refresh: str = option("step", "how often the general-knowledge gradient is computed: every inner step, or "
                                      "once per batch at its first step and reused by the later steps (one "
                                      "backward per later step)", choices=GEN_REFRESH)


def project_conflict(g_spec: list[torch.Tensor], g_gen: list[torch.Tensor], mode: str = "on-conflict",
                     granularity: str = "global", metric: list[torch.Tensor] | None = None
                     ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Remove from ``g_spec`` its component along ``g_gen`` (when they conflict, or always).

    With ``metric`` (a positive diagonal P, one tensor per parameter — e.g. Adam's 1/(√v̂ + ε)) the
    conflict test and the projection use the inner product ⟨a, b⟩_P = Σ a·P·b, so that the optimizer's
    actual step P·g_spec does not oppose g_gen to first order: after projection ⟨g_spec, g_gen⟩_P ≥ 0.
    Returns the projected g_spec and logs: angle before / after (degrees, in the plain inner product),
    norm ratio, whether it fired.
    """
    def flat(gs):
        return torch.cat([g.reshape(-1) for g in gs])

    s, g = flat(g_spec), flat(g_gen)
    w = flat(metric) if metric is not None else None
    gg = float(g @ g)
    before = _angle(s, g)
    fired = 0
    if granularity == "global":
        pg = g if w is None else w * g
        dot, norm = float(s @ pg), float(g @ pg)
        if norm > 0 and (mode == "always" or dot < 0):
            s = s - (dot / norm) * g
            fired = 1
        out, offset = [], 0
        for t in g_spec:
            out.append(s[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    else:
        out = []
        for k, (a, b) in enumerate(zip(g_spec, g_gen)):
            pb = b if metric is None else metric[k] * b
            d, bb = float((a * pb).sum()), float((b * pb).sum())
            if bb > 0 and (mode == "always" or d < 0):
                a = a - (d / bb) * b
                fired += 1
            out.append(a)
        s = flat(out)
    return out, {"angle_before": before, "angle_after": _angle(s, g), "fired": fired,
                 "norm_ratio": float(flat(g_spec).norm() / (math.sqrt(gg) + 1e-12))}


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return float("nan")
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / (na * nb)))))


@register("rest")
class REST(TCR):
    """REST: TCR's objective plus query–gallery consistency, L = L_REM + λ_U·L_U + λ_G·L_G + λ_C·L_C, with the
    target-customisation gradient's conflict with the general-knowledge gradient projected out
    (docs/method.md §4–§5)."""

    Options = RESTOptions

    def setup(self) -> None:
        super().setup()
        o = self.opts
        self.consistency, self.lambda_c = o.consistency, o.lambda_c
        self.decoupling, self.signal, self.mode, self.granularity = o.decoupling, o.signal, o.mode, o.granularity
        self.lambda_a, self.tau_a, self.anchor_on = o.lambda_a, o.tau_a, o.anchor_on
        self.anchor_in_update, self.batched_backward = o.anchor_in_update, o.batched_backward
        self._z_source: torch.Tensor | None = None
        self.precondition = o.precondition
        if o.precondition == "adam" and self.optimizer_name != "adamw":
            raise ValueError("precondition='adam' needs optimizer='adamw'")
        # memory signal: a FIFO replay buffer of past reliable queries (raw items, re-encoded each step)
        self.memory_size, self.memory_min = o.memory_size, o.memory_min
        self._memory: list = []
        self._items = None
        self._g_gen: list[torch.Tensor] | None = None  # gen_refresh=batch: this batch's general-knowledge gradient
        if o.projection_space == "embeddings" and (o.signal != "anchor" or o.precondition != "none"):
            raise ValueError("projection_space='embeddings' needs signal='anchor' and precondition='none'")
        if o.gen_refresh == "batch" and o.signal != "anchor":
            raise ValueError("gen_refresh='batch' needs signal='anchor'")
        self.projection_space, self.gen_refresh = o.projection_space, o.gen_refresh

    # -- the source anchor: one no-grad forward per batch under θ0 -----------------------
    def on_batch_start(self, items) -> None:
        self._items = items
        self._g_gen = None
        if self.decoupling and self.signal == "anchor" and self.lambda_a > 0:
            self._z_source = self.source_embeddings(items)

    def _consistency(self, z, c, idx_groups, h, mask, e_m):
        if self.consistency == "off" or not bool(mask.any()):
            return (z * 0).sum()
        w = (1.0 - h.detach() / (e_m + 1e-3)).clamp(min=0).to(z.dtype)
        if self.consistency == "align":
            per = 1.0 - (z * c).sum(1)
        else:  # mutual: the candidate's backward prediction over the batch's queries
            logits = c @ z.T / self.tau
            pos = (idx_groups[:, None] == idx_groups[None, :]) | torch.eye(len(z), dtype=torch.bool)
            per = -(torch.logsumexp(logits.masked_fill(~pos, float("-inf")), 1) - torch.logsumexp(logits, 1))
        return (w * per)[mask].mean()

    def _anchor(self, z, c, mask):
        if self._z_source is None or self.lambda_a == 0:
            return (z * 0).sum()
        p_src = F.softmax(self._z_source @ c.T / self.tau_a, dim=1)
        logp = F.log_softmax(z @ c.T / self.tau_a, dim=1)
        kl = (p_src * (torch.log(p_src.clamp_min(1e-12)) - logp)).sum(1)
        sel = ~mask if self.anchor_on == "unreliable" else torch.ones_like(mask)
        return kl[sel].mean() if bool(sel.any()) else (z * 0).sum()

    def loss(self, z, sims, step, labels):
        c, h, mask, e_m, rem, uni, gap, logs = self.tcr_terms(z, sims, step)
        idx = self.column_rows(self.cols, sims.detach().argmax(1))
        groups = self.gallery_ids[idx] if self.gallery_ids is not None else idx
        cons = self._consistency(z, c, groups, h, mask, e_m)
        rem = rem.to(z.dtype)
        parts = {"rem": rem, "uni": uni, "gap": gap, "cons": cons}
        if self.decoupling and self.signal == "anchor":
            parts["anchor"] = self._anchor(z, c, mask)
        if self.decoupling and self.signal == "memory" and step == self.steps - 1:
            self._remember(mask)
        if self.decoupling and self.signal == "reliable":
            s = source_likeness(z.detach(), c)
            parts["reliable_half"] = s <= s.median()
            parts["c"], parts["h"], parts["e_m"], parts["groups"] = c, h, e_m, groups
        logs.update({"consistency": float(cons.detach()),
                     "anchor": float(parts["anchor"].detach()) if "anchor" in parts else 0.0})
        total = rem + self.lambda_u * uni + self.lambda_g * gap + self.lambda_c * cons
        if "anchor" in parts and self.anchor_in_update:
            total = total + self.lambda_a * parts["anchor"]
        return StepOutput(total, logs, z=z, parts=parts)

    # -- decoupled gradients ---------------------------------------------------------------
    def _objectives(self, out: StepOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(L_spec, L_gen used in the update, L_gen used as the projection direction)."""
        p = out.parts
        if self.signal == "anchor":
            spec = p["rem"] + self.lambda_c * p["cons"]
            keep = self.lambda_u * p["uni"] + self.lambda_g * p["gap"]
            anchor = self.lambda_a * p["anchor"]
            gen_dir = keep + anchor
            gen_upd = gen_dir if self.anchor_in_update else keep
            return spec, gen_upd, gen_dir
        # reliable: g_gen from the objective on the source-like half, g_spec from the rest
        z, half = out.z, p["reliable_half"]

        def objective(rows):
            if not bool(rows.any()):
                return (z * 0).sum()
            zz, cc, hh = z[rows], p["c"][rows], p["h"][rows]
            r, m = rem_loss(hh, p["e_m"])
            val = r.to(z.dtype) + self.lambda_u * uniformity_loss(zz, self.t_uniform)
            val = val + self.lambda_g * gap_loss(zz, cc, self.queue.target_gap())
            return val + self.lambda_c * self._consistency(zz, cc, p["groups"][rows], hh, m, p["e_m"])

        gen = objective(half)
        return objective(~half), gen, gen

    def extra_state(self) -> dict:
        state = super().extra_state()
        state["memory"] = [m if isinstance(m, str) else torch.as_tensor(m) for m in self._memory]
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if state:
            self._memory = [m if isinstance(m, str) else (m.numpy() if m.dtype == torch.uint8 else m)
                            for m in state.get("memory", [])]

    # -- the memory signal ---------------------------------------------------------------
    def _remember(self, mask: torch.Tensor) -> None:
        """Append this batch's reliable queries to the replay buffer (oldest dropped first)."""
        rows = mask.nonzero().flatten().tolist()
        if not rows or self._items is None:
            return
        picked = take_items(self._items, rows)
        self._memory.extend(picked[i] for i in range(len(rows)))
        del self._memory[: max(0, len(self._memory) - self.memory_size)]

    def _memory_batch(self):
        if len(self._memory) < self.memory_min:
            return None
        first = self._memory[0]
        if isinstance(first, torch.Tensor):
            return torch.stack(self._memory)
        if hasattr(first, "shape"):  # numpy rows
            return np.stack(self._memory)
        return list(self._memory)

    def _memory_gradient(self) -> list[torch.Tensor] | None:
        """∇θ of the TCR objective on the replayed reliable queries (one extra forward/backward)."""
        items = self._memory_batch()
        if items is None:
            return None
        z = self.encode(items)
        sims, cols = self._sims(z.detach())
        _, c = nearest_candidates(sims, self.gallery, cols)
        h = refined_entropy(z, c, self.tau)
        rem, _ = rem_loss(h, self.queue.entropy_threshold(self.threshold_rule, self.threshold_quantile))
        obj = rem.to(z.dtype) + self.lambda_u * uniformity_loss(z, self.t_uniform) \
            + self.lambda_g * gap_loss(z, c, self.queue.target_gap())
        return self.param_grads(obj)

    def _metric(self) -> list[torch.Tensor] | None:
        """Adam's current diagonal preconditioner 1/(√v̂ + ε), or None before its first step."""
        if self.precondition != "adam":
            return None
        out = []
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                return None
            group = self.optimizer.param_groups[0]
            beta2, eps = group["betas"][1], group["eps"]
            step = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** step)
            out.append(1.0 / (v_hat.sqrt() + eps))
        return out

    def gradients(self, out: StepOutput):
        if not self.decoupling:
            return super().gradients(out)
        if self.signal == "memory":
            g_spec = super().gradients(out)[0]
            g_mem = self._memory_gradient()
            if g_mem is None:
                return g_spec, {"memory": len(self._memory), "fired": 0}
            g_spec, logs = project_conflict(g_spec, g_mem, self.mode, self.granularity, self._metric())
            logs["memory"] = len(self._memory)
            return [a + b for a, b in zip(g_spec, g_mem)], logs
        spec, gen_upd, gen_dir = self._objectives(out)
        z = out.z
        dz = []
        for L in (spec, gen_upd) if gen_dir is gen_upd else (spec, gen_upd, gen_dir):
            (g,) = torch.autograd.grad(L, z, retain_graph=True, allow_unused=True)
            dz.append(torch.zeros_like(z) if g is None else g)
        if self.projection_space == "embeddings":
            return self._embedding_projection(z, dz)
        if self.gen_refresh == "batch" and self._g_gen is not None:
            # a later inner step: only the customisation gradient is new; the batch's first step gave the rest
            (g_spec,) = self._vjp(z, dz[0][None])
            g_upd, g_dir = self._g_gen
        else:
            grads = self._vjp(z, torch.stack(dz))
            g_spec, g_upd = grads[0], grads[1]
            g_dir = grads[2] if len(grads) > 2 else g_upd
            if self.gen_refresh == "batch":
                self._g_gen = (g_upd, g_dir)
        g_spec, logs = project_conflict(g_spec, g_dir, self.mode, self.granularity, self._metric())
        return [a + b for a, b in zip(g_spec, g_upd)], logs

    def _embedding_projection(self, z: torch.Tensor, dz: list[torch.Tensor]):
        """projection_space=embeddings: the conflict tested and removed between ∂L_spec/∂z and ∂L_gen/∂z
        (the whole batch's [B, d] gradients, or each query's row with granularity=per-tensor), then one
        backward of the combined embedding gradient."""
        d_spec, d_upd = dz[0], dz[1]
        d_dir = dz[2] if len(dz) > 2 else d_upd
        if self.granularity == "global":
            (d_spec,), logs = project_conflict([d_spec], [d_dir], self.mode, "global")
        else:  # one projection per query
            rows, fired = [], 0
            for a, b in zip(d_spec, d_dir):
                (a,), lg = project_conflict([a], [b], self.mode, "global")
                rows.append(a)
                fired += lg["fired"]
            d_spec = torch.stack(rows)
            logs = {"fired": fired}
        (grads,) = self._vjp(z, (d_spec + d_upd)[None])
        return grads, logs

    def _vjp(self, z: torch.Tensor, cotangents: torch.Tensor) -> list[list[torch.Tensor]]:
        """Parameter gradients for each cotangent of z — one batched backward when possible."""
        if self.batched_backward:
            try:
                gs = torch.autograd.grad(z, self.params, grad_outputs=cotangents, is_grads_batched=True,
                                         allow_unused=True)
                return [self.comm.all_reduce([torch.zeros_like(p) if g is None else g[k]
                                              for p, g in zip(self.params, gs)])
                        for k in range(len(cotangents))]
            except RuntimeError as e:  # some kernels have no batching rule
                log.warning("batched backward unavailable (%s); using one backward per gradient", e)
                self.batched_backward = False
        out = []
        for k in range(len(cotangents)):
            gs = torch.autograd.grad(z, self.params, grad_outputs=cotangents[k], retain_graph=True, allow_unused=True)
            out.append(self.comm.all_reduce([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs)]))
        return out
