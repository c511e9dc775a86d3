"""The Method base class and registry: a method holds its state and its loss, the base the lifecycle.

The base class chooses the adapted parameters (the model's ``adaptable_parameters()`` rule), builds
the optimizer, snapshots the source parameters (for resets and for REST's anchor), runs the inner
steps on each batch and returns the batch's online scores.  A method implements ``loss`` (and, for
REST, ``gradients``).  Protocol concerns — streams, resets at domain boundaries, metrics — live in
``qshift.engine``.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qshift.errors import NonFiniteError, UserError
from qshift.methods.guard import CollapseGuard
from qshift.models.protocol import RetrievalModel, default_lr
from qshift.options import SCORING_MODES, Options, Protocol, split_protocol
from qshift.parallel import LOCAL, Communicator
from qshift.retrieval.index import GalleryIndex, build_index, check_index_spec

__all__ = ["Method", "StepOutput", "SCORING_MODES", "available_methods", "create", "method_class", "method_options",
           "register", "resolved_options"]

_REGISTRY: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Class decorator: make a method available as ``create(name, ...)``."""
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        # each method's own copy of its option structure, so errors and docs name the method
        cls.Options = dataclasses.make_dataclass(f"{cls.__name__}Options", [], bases=(cls.Options,), frozen=True,
                                                 namespace={"owner": f"method {name!r}"})
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    """The registered class of method ``name`` (``ValueError`` naming the known ones otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def create(name: str, model: RetrievalModel, gallery: torch.Tensor, *, protocol: Protocol | None = None,
           **config: Any) -> "Method":
    """Build method ``name`` for ``model`` against the frozen, normalised ``gallery`` [N, d].

    ``config`` holds protocol knobs (``steps``, ``lr``, …, overriding ``protocol``) and the method's own
    options, in one flat mapping (a library convenience; ``gallery_ids``, ``gallery_index`` and
    ``comm`` are passed through)."""
    cls = method_class(name)
    passed = {k: config.pop(k) for k in ("gallery_ids", "gallery_index", "comm") if k in config}
    knobs, options = split_protocol(config)
    base = protocol or Protocol()
    return cls(model, gallery, protocol=base.replace(**knobs) if knobs else base, **passed, **options)


def method_options(name: str, options: dict[str, Any] | None = None) -> Options:
    """The validated option structure of method ``name`` with ``options`` overlaid on its defaults."""
    return method_class(name).Options.build(options)


def resolved_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option of method ``name`` with its effective value (REST's include TCR's).  Stored in each
    result so that a run says exactly what it ran, and a grid can tell a stale cell."""
    return method_options(name, options).as_dict()


@dataclass
class StepOutput:
    """What a method's ``loss`` returns for one inner step."""

    loss: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)
    z: torch.Tensor | None = None  # the step's query embeddings (kept for REST's batched backward)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class: online adaptation of the query tower's adaptable parameters, batch by batch."""

    name: ClassVar[str] = "base"
    #: the method's options: a frozen dataclass of :func:`qshift.options.option` fields (none by default)
    Options: ClassVar[type[Options]] = Options
    adapts: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = False
    #: whether the method can score against each query's top-K candidates (``candidates`` > 0)
    supports_candidates: ClassVar[bool] = True

    def __init__(self, model: RetrievalModel, gallery: torch.Tensor, *, protocol: Protocol | None = None,
                 gallery_ids: torch.Tensor | None = None, gallery_index: GalleryIndex | None = None,
                 comm: Communicator | None = None, **options: Any) -> None:
        protocol = protocol or Protocol()
        if gallery.ndim != 2:
            raise ValueError(f"gallery must be [N, d] embeddings, got shape {tuple(gallery.shape)}")
        self.opts = self.Options.build(options)
        self.model = model
        self.gallery = gallery.detach()
        self.gallery_ids = None if gallery_ids is None else torch.as_tensor(gallery_ids)
        self.protocol = protocol.with_lr(default_lr(model))  # unset: the backbone's protocol rate
        self.comm = comm or LOCAL
        self.candidates = self.protocol.candidates
        self.index = self._make_index(gallery_index)
        #: the gallery rows the columns of this step's ``sims`` stand for [B, K] (None: the whole gallery)
        self.cols: torch.Tensor | None = None
        #: the same for the scores ``adapt_batch`` / ``scores`` last returned
        self.last_cols: torch.Tensor | None = None
        self._moments: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps, self.lr, self.weight_decay = self.protocol.steps, self.protocol.lr, self.protocol.weight_decay
        self.scoring, self.optimizer_name, self.momentum = (self.protocol.scoring, self.protocol.optimizer,
                                                            self.protocol.momentum)
        self.named_params = list(model.adaptable_parameters())
        self.params = [p for _, p in self.named_params]
        if self.adapts and not self.params:
            raise ValueError("the model exposes no adaptable parameters")
        self.source_state = [p.detach().clone() for p in self.params]
        self.optimizer = self._make_optimizer()
        self.batches_seen = 0
        self.guard = (CollapseGuard(self.protocol.collapse_window, self.protocol.collapse_ratio,
                                    self.protocol.collapse_signal)
                      if self.protocol.reset == "on-collapse" and self.adapts else None)
        self.setup()

    @classmethod
    def check_protocol(cls, protocol: Protocol) -> None:
        """What can be refused of ``protocol`` for this method before any data is built: top-K candidates
        for a method that needs the whole gallery, an index FAISS cannot build."""
        if not protocol.candidates:
            return
        if not cls.supports_candidates:
            raise UserError(f"method {cls.name!r} needs the whole gallery and cannot run with candidates="
                            f"{protocol.candidates}; use candidates=0")
        check_index_spec(protocol.index, protocol.index_params)

    def _make_index(self, index: GalleryIndex | None) -> GalleryIndex | None:
        if not self.candidates:
            return None
        self.check_protocol(self.protocol)
        n = self.gallery.shape[0]
        if self.candidates > n:
            raise UserError(f"candidates={self.candidates} is more than the gallery's {n} items")
        if index is None:
            index = build_index(self.gallery, self.protocol.index, self.protocol.index_params)
        if index.ntotal != n or index.dim != self.gallery.shape[1]:
            raise UserError(f"the gallery index holds {index.ntotal} x {index.dim}, the gallery "
                            f"{tuple(self.gallery.shape)}")
        return index

    # ---------------------------------------------------------------- hooks for subclasses
    def setup(self) -> None:
        """Method-specific state from ``self.opts`` (called once, and again by ``reset``)."""

    def loss(self, z: torch.Tensor, sims: torch.Tensor, step: int, labels: torch.Tensor | None) -> StepOutput:
        raise NotImplementedError

    def gradients(self, out: StepOutput) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Gradients of the step's loss w.r.t. the adapted parameters (REST overrides this)."""
        return self.param_grads(out.loss), {}

    def param_grads(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """∂loss/∂θ over the whole batch: this process's share back-propagated, summed over processes."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True, retain_graph=retain_graph)
        return self.comm.all_reduce([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)])

    def on_batch_start(self, items: Any) -> None:
        """Called once per batch before the first inner step."""

    # ---------------------------------------------------------------- lifecycle
    def _make_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.params:
            return None
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def scores(self, items: Any) -> torch.Tensor:
        """Query–gallery similarities of ``items`` under the current parameters (no adaptation); a
        non-finite score raises :class:`~qshift.errors.NonFiniteError` (never NaN rows ranked as ties)."""
        with torch.no_grad():
            z = self.encode(items)
            _check_finite(z, f"{self.name}: non-finite scores: the query embeddings hold NaN or inf (in the "
                             "input?); nothing was adapted")
            scores, self.last_cols = self._sims(z)
        _check_finite(scores, f"{self.name}: non-finite scores (NaN or inf in the input?); nothing was adapted")
        return scores

    @torch.no_grad()
    def source_embeddings(self, items: Any) -> torch.Tensor:
        """Query embeddings of ``items`` under the source parameters (the current ones are put back after)."""
        current = [p.detach().clone() for p in self.params]
        try:
            for p, s in zip(self.params, self.source_state):
                p.copy_(s)
            return self.encode(items)
        finally:
            for p, c in zip(self.params, current):
                p.copy_(c)

    @torch.no_grad()
    def source_scores(self, items: Any) -> torch.Tensor:
        """Similarities of ``items`` under the source parameters [B, N] (whole-gallery mode)."""
        return self._sims(self.source_embeddings(items))[0]

    def encode(self, items: Any) -> torch.Tensor:
        """The batch's query embeddings under the current parameters: this process encodes its share, the
        communicator gathers the rest (:mod:`qshift.parallel`)."""
        return self.comm.gather(self.model.encode_query(self.comm.shard(items)))

    def search(self, z: torch.Tensor) -> torch.Tensor | None:
        """The gallery rows [B, K] each query is scored against (None: the whole gallery)."""
        if self.index is None:
            return None
        return self.index.search(z.detach(), self.candidates)[1]

    def score_rows(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """``z`` against gallery ``rows`` [B, K] (or the whole gallery when ``rows`` is None)."""
        if rows is None:
            return z @ self.gallery.T
        return torch.einsum("bd,bkd->bk", z, self.gallery[rows])

    def _sims(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(similarities, the gallery rows of their columns): against ``rows``, else the index's top-K
        candidates of ``z``, else the whole gallery."""
        if z.ndim != 2 or z.shape[1] != self.gallery.shape[1]:
            raise UserError(f"{self.name}: the model embeds queries in {tuple(z.shape)[1:]} dimensions, the gallery "
                            f"holds {self.gallery.shape[1]}-dimensional embeddings (a gallery from another model?)")
        if rows is None:
            rows = self.search(z)
        return self.score_rows(z, rows), rows

    def column_rows(self, cols: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """Gallery rows of column ``index`` [B] of score rows whose columns stand for ``cols``."""
        return index if cols is None else cols.gather(1, index[:, None]).squeeze(1)

    @property
    def n_columns(self) -> int:
        """How many gallery items each query's prediction is over: K in top-K mode, else N."""
        return self.candidates or int(self.gallery.shape[0])

    def mean_prediction(self, p: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's mean prediction over the whole gallery [N] from predictions ``p`` [B, C] over the
        columns ``cols`` (default this step's; O(B·K + N) in top-K mode, differentiable)."""
        cols = self.cols if cols is None else cols
        if cols is None:
            return p.mean(0)
        dense = torch.zeros(self.gallery.shape[0], dtype=p.dtype, device=p.device)
        return dense.index_add(0, cols.reshape(-1), p.reshape(-1)) / p.shape[0]

    def top(self, scores: torch.Tensor, k: int, cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best (gallery rows [B, k], scores [B, k]) of score rows returned by this method
        (``cols``: their columns' rows; default the last returned)."""
        cols = self.last_cols if cols is None else cols
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return (top.indices if cols is None else cols.gather(1, top.indices)), top.values

    def gallery_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gallery's mean [d] and covariance [d, d]: the mean and variance of a query's scores over
        the whole gallery are z·μ and zᵀΣz, without an O(N) row per query."""
        if self._moments is None:
            g = self.gallery.double()
            mu = g.mean(0)
            centred = g - mu
            self._moments = (mu, centred.T @ centred / max(1, g.shape[0] - 1))
        return self._moments

    def adapt_batch(self, items: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Run the inner steps on one batch; return its online scores [B, N] and a record."""
        if self.uses_labels and labels is None:
            raise ValueError(f"method {self.name!r} needs the batch's labels")
        t0 = time.perf_counter()
        record: dict[str, Any] = {"steps": []}
        scores = None
        if not self.adapts:
            scores = self.scores(items)
        else:
            # a batch is all or nothing: if it fails (bad input, a non-finite loss), the parameters,
            # optimizer and method state are put back as they were, so one bad batch in a live
            # stream does not poison the batches after it
            snapshot = self._snapshot()
            try:
                scores, record = self._adapt_steps(items, labels, record)
                _check_finite(scores, f"{self.name}: non-finite scores at batch {self.batches_seen}; the batch's "
                                      "updates were rolled back")
            except BaseException:
                self._restore(snapshot)
                raise
        self.batches_seen += 1
        cols = self.last_cols
        if self.guard is not None:
            self._watch(items, scores, record)
        self.last_cols = cols
        record["seconds"] = time.perf_counter() - t0
        return scores, record

    @torch.no_grad()
    def _watch(self, items: Any, scores: torch.Tensor, record: dict) -> None:
        """The collapse guard's step: compare with the source model on this batch; reset if it fires."""
        z_adapted, z_src = self.encode(items), self.source_embeddings(items)
        if self.index is None:
            signal = self.guard.observe(scores, self._sims(z_src)[0], z_adapted=z_adapted, z_source=z_src)
        else:
            # top-K mode: both models scored on the union of the adapted and the source candidates, the
            # source's score statistics over the whole gallery from the gallery's moments
            src_rows = self.search(z_src)
            rows = torch.cat([self.last_cols, src_rows], 1)
            dup = torch.zeros_like(rows, dtype=torch.bool)
            dup[:, self.last_cols.shape[1]:] = (src_rows[:, :, None] == self.last_cols[:, None, :]).any(2)
            # the adapted top-1 is among its own candidates: the source's extra columns need no adapted score
            adapted = torch.cat([scores, torch.full_like(src_rows, float("-inf"), dtype=scores.dtype)], 1)
            source = self.score_rows(z_src, rows).masked_fill(dup, float("-inf"))
            mu, cov = self.gallery_moments()
            zs = z_src.double()
            mean, std = zs @ mu, torch.einsum("bd,de,be->b", zs, cov, zs).clamp_min(0).sqrt()
            signal = self.guard.observe(adapted, source, rows=rows, source_mean=mean.to(scores.dtype),
                                        source_std=std.to(scores.dtype), z_adapted=z_adapted, z_source=z_src)
        record["guard"] = signal
        if signal["collapsed"]:
            fired, seen = self.guard.fired, self.batches_seen
            self.reset()
            self.guard.fired, self.batches_seen = fired, seen  # the counters survive the reset they cause
            record["collapse_reset"] = True

    def _snapshot(self) -> dict:
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
                "extra": copy.deepcopy(self.extra_state())}

    @torch.no_grad()
    def _restore(self, snapshot: dict) -> None:
        for p, v in zip(self.params, snapshot["params"]):
            p.copy_(v)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(snapshot["optimizer"])
        self.load_extra_state(snapshot["extra"])

    def _adapt_steps(self, items: Any, labels: torch.Tensor | None, record: dict) -> tuple[torch.Tensor, dict]:
        """The inner steps of one batch (``adapt_batch`` rolls them back if they raise)."""
        scores = None
        self.on_batch_start(items)
        for step in range(self.steps):
            z = self.encode(items)
            if step == 0 and not bool(torch.isfinite(z).all()):
                raise NonFiniteError(f"{self.name}: non-finite query embeddings at batch {self.batches_seen} "
                                         "(NaN or inf in the input?); the batch was not used and the method's "
                                         "state is unchanged")
            sims, self.cols = self._sims(z)
            if (self.scoring == "pre" and step == 0) or (self.scoring == "tcr" and step == self.steps - 1):
                scores, self.last_cols = sims.detach(), self.cols
            out = self.loss(z, sims, step, labels)
            if out.loss is not None and not torch.isfinite(out.loss):
                raise NonFiniteError(f"{self.name}: non-finite loss at batch {self.batches_seen}, step {step}; "
                                         "the batch's updates were rolled back")
            logs = dict(out.logs)
            if out.loss is not None:
                grads, glogs = self.gradients(out)
                logs.update(glogs)
                for p, g in zip(self.params, grads):
                    p.grad = g.detach()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                bad = [n for (n, _), p in zip(self.named_params, self.params) if not bool(torch.isfinite(p).all())]
                if bad:
                    raise NonFiniteError(f"{self.name}: parameters became non-finite after the update at batch "
                                         f"{self.batches_seen}, step {step} ({', '.join(bad[:3])}"
                                         f"{', …' if len(bad) > 3 else ''}); the batch's updates were rolled back "
                                         "(a smaller lr may help)")
                logs["loss"] = float(out.loss.detach())
            record["steps"].append(logs)
        if self.scoring == "post":
            scores = self.scores(items)
        return scores, record

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the source parameters exactly, and fresh optimizer and method state."""
        for p, s in zip(self.params, self.source_state):
            p.copy_(s)
        self.optimizer = self._make_optimizer()
        self.batches_seen = 0
        if self.guard is not None:
            self.guard.clear()
        self.setup()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The adaptation state as tensors and plain containers (loadable with ``weights_only=True``)."""
        return {"name": self.name, "params": {n: p.detach().clone() for n, p in self.named_params},
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "batches_seen": self.batches_seen, "extra": self.extra_state(),
                "guard": None if self.guard is None else {"history": list(self.guard.history),
                                                          "fired": self.guard.fired}}

    def check_state_dict(self, state: Any) -> None:
        """Validate a :meth:`state_dict` payload against this method without changing anything: its
        method, parameter names and shapes, finiteness, optimizer layout and counters."""
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state is for method {got!r}, not {self.name!r}")
        missing = [k for k in ("params", "optimizer", "batches_seen", "extra") if k not in state]
        if missing:
            raise ValueError(f"state lacks {missing}")
        params = state["params"]
        if not isinstance(params, dict):
            raise ValueError("state's params must map parameter names to tensors")
        names = [n for n, _ in self.named_params]
        if list(params) != names:
            lost, extra = sorted(set(names) - set(params)), sorted(set(params) - set(names))
            raise ValueError(f"state's parameters do not match this model's adaptable parameters "
                             f"({len(params)} saved, {len(names)} here; missing {lost[:3]}, unexpected {extra[:3]})")
        for (n, p), v in zip(self.named_params, params.values()):
            if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"state's parameter {n!r} has shape {shape}, the model's {tuple(p.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"state's parameter {n!r} holds NaN or inf")
        self._check_optimizer_state(state["optimizer"])
        seen = state["batches_seen"]
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise ValueError(f"state's batches_seen must be a count, got {seen!r}")
        if not isinstance(state["extra"], dict):
            raise ValueError("state's method extra state must be a mapping")

    def _check_optimizer_state(self, opt: Any) -> None:
        if (opt is None) != (self.optimizer is None):
            raise ValueError("state's optimizer does not match this method's")
        if opt is None:
            return
        if not isinstance(opt, dict) or set(opt) != {"state", "param_groups"}:
            raise ValueError("state's optimizer is not an optimizer state_dict")
        ids = [i for g in opt["param_groups"] for i in g.get("params", [])]
        if len(ids) != len(self.params):
            raise ValueError(f"state's optimizer holds {len(ids)} parameters, this method {len(self.params)}")
        for i, per in opt["state"].items():
            if not 0 <= int(i) < len(self.params):
                raise ValueError(f"state's optimizer has an entry for parameter {i}, this method {len(self.params)}")
            for key, v in per.items():
                if isinstance(v, torch.Tensor) and v.numel() > 1 and v.shape != self.params[int(i)].shape:
                    raise ValueError(f"state's optimizer entry {key!r} of parameter {i} has the wrong shape")
                if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"state's optimizer entry {key!r} of parameter {i} holds NaN or inf")

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s payload: validated first (:meth:`check_state_dict`); if applying it
        still fails, the method is put back exactly as it was and the error raised."""
        self.check_state_dict(state)
        snapshot = self._snapshot()
        seen = self.batches_seen
        try:
            with torch.no_grad():
                for p, v in zip(self.params, state["params"].values()):
                    p.copy_(v)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self.batches_seen = state["batches_seen"]
            self.load_extra_state(state["extra"])
            if self.guard is not None and state.get("guard"):
                self.guard.history.clear()
                self.guard.history.extend(float(x) for x in state["guard"]["history"])
                self.guard.fired = int(state["guard"]["fired"])
        except BaseException as e:
            self._restore(snapshot)
            self.batches_seen = seen
            if isinstance(e, (KeyError, TypeError, IndexError, RuntimeError, AttributeError)):
                raise ValueError(f"state does not fit method {self.name!r}: {type(e).__name__}: {e}") from e
            raise

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def parameter_drift(self) -> float:
        """‖θ − θ₀‖ over the adapted parameters."""
        return float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self.params, self.source_state))))


def _check_finite(scores: torch.Tensor, message: str) -> None:
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError(message)
