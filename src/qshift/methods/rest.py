"""REST (Li, Yang, Peng, 2025): TCR's refinement + a query-shift-robust objective + gradient decoupling.

The consistency term and the decoupling rule are this project's reconstruction (METHOD.md §4–§5);
every *(choice)* there is an option here.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from qshift.methods.base import StepOutput, register
from qshift.methods.objectives import source_likeness
from qshift.methods.tcr import TCR

log = logging.getLogger(__name__)

CONSISTENCY = ("off", "mutual", "align")
SIGNALS = ("anchor", "reliable")
MODES = ("on-conflict", "always")
GRANULARITY = ("global", "per-tensor")


def project_conflict(g_spec: list[torch.Tensor], g_gen: list[torch.Tensor], mode: str = "on-conflict",
                     granularity: str = "global") -> tuple[list[torch.Tensor], dict[str, float]]:
    """Remove from ``g_spec`` its component along ``g_gen`` (when they conflict, or always).

    Returns the projected g_spec and logs: angle before / after (degrees), norm ratio, whether it fired.
    """
    def flat(gs):
        return torch.cat([g.reshape(-1) for g in gs])

    s, g = flat(g_spec), flat(g_gen)
    gg = float(g @ g)
    before = _angle(s, g)
    fired = 0
    if granularity == "global":
        dot = float(s @ g)
        if gg > 0 and (mode == "always" or dot < 0):
            s = s - (dot / gg) * g
            fired = 1
        out, offset = [], 0
        for t in g_spec:
            out.append(s[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    else:
        out = []
        for a, b in zip(g_spec, g_gen):
            d, bb = float((a * b).sum()), float((b * b).sum())
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
    """REST: L = L_REM + λ_U·L_U + λ_G·L_G + λ_C·L_C with decoupled gradients (see module docstring)."""

    @classmethod
    def option_names(cls):
        return TCR.option_names() + ("consistency", "lambda_c", "decoupling", "signal", "mode", "granularity",
                                     "lambda_a", "tau_a", "anchor_on", "anchor_in_update", "batched_backward")

    def setup(self, consistency: str = "align", lambda_c: float = 1.0, decoupling: bool = True,
              signal: str = "anchor", mode: str = "on-conflict", granularity: str = "global",
              lambda_a: float = 0.1, tau_a: float = 0.1, anchor_on: str = "all", anchor_in_update: bool = True,
              batched_backward: bool = True, **tcr_options) -> None:
        super().setup(**tcr_options)
        for name, value, allowed in (("consistency", consistency, CONSISTENCY), ("signal", signal, SIGNALS),
                                     ("mode", mode, MODES), ("granularity", granularity, GRANULARITY),
                                     ("anchor_on", anchor_on, ("all", "unreliable"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.consistency, self.lambda_c = consistency, lambda_c
        self.decoupling, self.signal, self.mode, self.granularity = decoupling, signal, mode, granularity
        self.lambda_a, self.tau_a, self.anchor_on = lambda_a, tau_a, anchor_on
        self.anchor_in_update, self.batched_backward = anchor_in_update, batched_backward
        self._z_source: torch.Tensor | None = None

    # -- the source anchor: one no-grad forward per batch under θ0 -----------------------
    def on_batch_start(self, items) -> None:
        if self.decoupling and self.signal == "anchor" and self.lambda_a > 0:
            with torch.no_grad():
                current = [p.detach().clone() for p in self.params]
                for p, s in zip(self.params, self.source_state):
                    p.copy_(s)
                try:
                    self._z_source = self.model.encode_query(items).detach()
                finally:
                    for p, c in zip(self.params, current):
                        p.copy_(c)

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
        idx = sims.detach().argmax(1)
        groups = self.gallery_ids[idx] if self.gallery_ids is not None else idx
        cons = self._consistency(z, c, groups, h, mask, e_m)
        rem = rem.to(z.dtype)
        parts = {"rem": rem, "uni": uni, "gap": gap, "cons": cons}
        if self.decoupling and self.signal == "anchor":
            parts["anchor"] = self._anchor(z, c, mask)
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
            from qshift.methods.objectives import gap_loss, rem_loss, uniformity_loss
            r, m = rem_loss(hh, p["e_m"])
            val = r.to(z.dtype) + self.lambda_u * uniformity_loss(zz, self.t_uniform)
            val = val + self.lambda_g * gap_loss(zz, cc, self.queue.target_gap())
            return val + self.lambda_c * self._consistency(zz, cc, p["groups"][rows], hh, m, p["e_m"])

        gen = objective(half)
        return objective(~half), gen, gen

    def gradients(self, out: StepOutput):
        if not self.decoupling:
            return super().gradients(out)
        spec, gen_upd, gen_dir = self._objectives(out)
        z = out.z
        dz = []
        for L in (spec, gen_upd, gen_dir):
            (g,) = torch.autograd.grad(L, z, retain_graph=True, allow_unused=True)
            dz.append(torch.zeros_like(z) if g is None else g)
        if gen_dir is gen_upd:
            dz = dz[:2]
        grads = self._vjp(z, torch.stack(dz))
        g_spec, g_upd = grads[0], grads[1]
        g_dir = grads[2] if len(grads) > 2 else g_upd
        g_spec, logs = project_conflict(g_spec, g_dir, self.mode, self.granularity)
        return [a + b for a, b in zip(g_spec, g_upd)], logs

    def _vjp(self, z: torch.Tensor, cotangents: torch.Tensor) -> list[list[torch.Tensor]]:
        """Parameter gradients for each cotangent of z — one batched backward when possible."""
        if self.batched_backward:
            try:
                gs = torch.autograd.grad(z, self.params, grad_outputs=cotangents, is_grads_batched=True,
                                         allow_unused=True)
                return [[torch.zeros_like(p) if g is None else g[k] for p, g in zip(self.params, gs)]
                        for k in range(len(cotangents))]
            except RuntimeError as e:  # some kernels have no batching rule
                log.warning("batched backward unavailable (%s); using one backward per gradient", e)
                self.batched_backward = False
        out = []
        for k in range(len(cotangents)):
            gs = torch.autograd.grad(z, self.params, grad_outputs=cotangents[k], retain_graph=True, allow_unused=True)
            out.append([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, gs)])
        return out
