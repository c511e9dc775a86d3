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

from qshift.models.protocol import RetrievalModel, default_lr
from qshift.options import SCORING_MODES, Options, Protocol, split_protocol

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
    options, in one flat mapping (a library convenience; ``gallery_ids`` is passed through)."""
    cls = method_class(name)
    gallery_ids = config.pop("gallery_ids", None)
    knobs, options = split_protocol(config)
    base = protocol or Protocol()
    return cls(model, gallery, protocol=base.replace(**knobs) if knobs else base, gallery_ids=gallery_ids,
               **options)


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

    def __init__(self, model: RetrievalModel, gallery: torch.Tensor, *, protocol: Protocol | None = None,
                 gallery_ids: torch.Tensor | None = None, **options: Any) -> None:
        protocol = protocol or Protocol()
        if gallery.ndim != 2:
            raise ValueError(f"gallery must be [N, d] embeddings, got shape {tuple(gallery.shape)}")
        self.opts = self.Options.build(options)
        self.model = model
        self.gallery = gallery.detach()
        self.gallery_ids = None if gallery_ids is None else torch.as_tensor(gallery_ids)
        self.protocol = protocol.with_lr(default_lr(model))  # unset: the backbone's protocol rate
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
        self.setup()

    # ---------------------------------------------------------------- hooks for subclasses
    def setup(self) -> None:
        """Method-specific state from ``self.opts`` (called once, and again by ``reset``)."""

    def loss(self, z: torch.Tensor, sims: torch.Tensor, step: int, labels: torch.Tensor | None) -> StepOutput:
        raise NotImplementedError

    def gradients(self, out: StepOutput) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Gradients of the step's loss w.r.t. the adapted parameters (REST overrides this)."""
        grads = torch.autograd.grad(out.loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)], {}

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
        """Query–gallery similarities of ``items`` under the current parameters (no adaptation)."""
        with torch.no_grad():
            return self.model.encode_query(items) @ self.gallery.T

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
            except BaseException:
                self._restore(snapshot)
                raise
        self.batches_seen += 1
        record["seconds"] = time.perf_counter() - t0
        return scores, record

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
            z = self.model.encode_query(items)
            if step == 0 and not bool(torch.isfinite(z).all()):
                raise FloatingPointError(f"{self.name}: non-finite query embeddings at batch {self.batches_seen} "
                                         "(NaN or inf in the input?); the batch was not used and the method's "
                                         "state is unchanged")
            sims = z @ self.gallery.T
            if (self.scoring == "pre" and step == 0) or (self.scoring == "tcr" and step == self.steps - 1):
                scores = sims.detach()
            out = self.loss(z, sims, step, labels)
            if out.loss is not None and not torch.isfinite(out.loss):
                raise FloatingPointError(f"{self.name}: non-finite loss at batch {self.batches_seen}, step {step}; "
                                         "the batch's updates were rolled back")
            logs = dict(out.logs)
            if out.loss is not None:
                grads, glogs = self.gradients(out)
                logs.update(glogs)
                for p, g in zip(self.params, grads):
                    p.grad = g.detach()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
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
        self.setup()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"name": self.name, "params": [p.detach().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "batches_seen": self.batches_seen, "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        with torch.no_grad():
            for p, v in zip(self.params, state["params"], strict=True):
                p.copy_(v)
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches_seen = state["batches_seen"]
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @torch.no_grad()
    def parameter_drift(self) -> float:
        """‖θ − θ₀‖ over the adapted parameters."""
        return float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self.params, self.source_state))))
