"""Typed option structures: the shared run protocol, and the machinery every method's options use.

An option structure is a frozen dataclass whose fields are declared with :func:`option` (default, one
line of help, optional choices and bounds).  Everything else derives from that one declaration:
defaults, validation (:meth:`Options.build`), ``key=value`` parsing (:meth:`Options.parse_value`, for
``--set`` and ``--protocol``), grid validation, the resolved options a result records
(:meth:`Options.as_dict`) and the options tables of docs/methods.md (:meth:`Options.describe`).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import yaml

T = TypeVar("T", bound="Options")

SCORING_MODES = ("pre", "tcr", "post")
RESETS = ("never", "episodic", "reset_each_domain", "on-collapse")
OPTIMIZERS = ("adamw", "sgd")
COLLAPSE_SIGNALS = ("spread", "plausible", "confident", "containment", "agreement", "diversity")  # qshift.methods.guard


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool = False) -> Any:
    """A dataclass field of an option structure: its default, one line of help, allowed values or bounds."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                            "maximum": maximum, "exclusive_minimum": exclusive_minimum})


@dataclass(frozen=True)
class Options:
    """Base of every option structure (a frozen dataclass of :func:`option` fields)."""

    #: what the structure configures, for error messages ("method 'rest'", "the protocol")
    owner: ClassVar[str] = "options"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def kinds(cls) -> dict[str, str]:
        """Each option's kind: ``bool``, ``int``, ``float``, ``str`` (maybe ``|None``) or ``any``."""
        hints = typing.get_type_hints(cls)
        return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}

    @classmethod
    def build(cls: type[T], values: Mapping[str, Any] | None = None) -> T:
        """The structure with ``values`` overlaid on the defaults; an unknown key, a value of the wrong
        type, outside its choices or bounds, or a non-finite number raises ``ValueError`` naming it."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown option(s) for {cls.owner}: {unknown}; known: {sorted(cls.names())}")
        kinds = cls.kinds()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for key, value in values.items():
            out[key] = _check(cls.owner, key, value, kinds[key], fields[key])
        return cls(**out)

    @classmethod
    def parse_value(cls, key: str, text: str) -> Any:
        """A ``key=value`` string read as the option's kind (``1e-3`` a float, ``off`` the word for a
        string option, ``true`` / ``false`` for a switch, ``none`` for an optional value)."""
        if key not in cls.names():
            raise ValueError(f"unknown option {key!r} for {cls.owner}; known: {sorted(cls.names())}")
        return parse_text(text, cls.kinds()[key])

    def as_dict(self) -> dict[str, Any]:
        """Every option with its value (what a result records as resolved)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` (validated like :meth:`build`)."""
        return type(self).build({**self.as_dict(), **changes})

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One row per option: name, kind, default, choices / bounds and help (for the docs tables)."""
        kinds = cls.kinds()
        rows = []
        for f in dataclasses.fields(cls):
            md = f.metadata
            allowed = " · ".join(f"`{c}`" for c in md["choices"]) if md.get("choices") else _bounds(md)
            rows.append({"name": f.name, "kind": kinds[f.name], "default": f.default, "allowed": allowed,
                         "help": md.get("help", "")})
        return rows


def _kind(tp: Any) -> str:
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    base = {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, "any")
    return base + ("|None" if optional and base != "any" else "")


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _check(owner: str, key: str, value: Any, kind: str, f: dataclasses.Field) -> Any:
    base, optional = kind.split("|")[0], kind.endswith("|None")
    if value is None and (optional or base == "any" or f.default is None):
        return None
    if base == "any":
        return value
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[base](value)
    if not ok:
        raise ValueError(f"option {key!r} of {owner} expects {_KIND_WORDS[base]} (default {f.default!r}), "
                         f"got {value!r}")
    if base == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"option {key!r} of {owner} must be a finite number, got {value!r}")
    md = f.metadata
    if md.get("choices") and value not in md["choices"]:
        raise ValueError(f"option {key!r} of {owner} must be one of {tuple(md['choices'])}, got {value!r}")
    lo, hi = md.get("minimum"), md.get("maximum")
    if lo is not None and (value < lo or (md.get("exclusive_minimum") and value == lo)):
        raise ValueError(f"option {key!r} of {owner} must be {'>' if md.get('exclusive_minimum') else '≥'} {lo:g}, "
                         f"got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"option {key!r} of {owner} must be ≤ {hi:g}, got {value!r}")
    return value


def _bounds(md: Mapping[str, Any]) -> str:
    lo, hi = md.get("minimum"), md.get("maximum")
    if lo is None and hi is None:
        return ""
    left = "" if lo is None else f"{'>' if md.get('exclusive_minimum') else '≥'} {lo:g}"
    right = "" if hi is None else f"≤ {hi:g}"
    return ", ".join(p for p in (left, right) if p)


def parse_text(text: str, kind: str = "any") -> Any:
    """A command-line value read as ``kind`` (see :meth:`Options.kinds`); for ``any``: int, float,
    true / false, none, a YAML list or mapping, else the string itself."""
    base, optional = kind.split("|")[0], kind.endswith("|None")
    low = text.strip().lower()
    if low in ("none", "null") and (optional or base == "any"):
        return None
    if base == "str":
        return text
    if base == "bool" or (base == "any" and low in ("true", "false")):
        if low in ("true", "false"):
            return low == "true"
        return text  # left for the type check to reject with the option's name
    casts = {"int": (int,), "float": (int, float), "any": (int, float)}[base]
    for cast in casts:
        try:
            return cast(text)
        except ValueError:
            pass
    if base == "any" and text.strip()[:1] in ("[", "{"):
        return yaml.safe_load(text)
    return text


# ------------------------------------------------------------------------------------- protocol

@dataclass(frozen=True)
class Protocol(Options):
    """The protocol knobs shared by every method (docs/method.md §2): what an online run is."""

    owner: ClassVar[str] = "the protocol"

    batch_size: int = option(64, "queries per online batch (B); the last batch of a stream may be partial",
                             minimum=1, maximum=4096)
    steps: int = option(3, "inner adaptation steps per batch (S)", minimum=1)
    lr: float | None = option(None, "learning rate; none: the backbone's protocol rate "
                                    "(qshift.models.protocol.default_lr)", minimum=0.0)
    weight_decay: float = option(1e-4, "optimizer weight decay", minimum=0.0)
    scoring: str = option("tcr", "which forward's similarities score a batch: the first (`pre`), the last "
                                 "inner step's (`tcr`), or one more after the last update (`post`)",
                          choices=SCORING_MODES)
    reset: str = option("never", "back to the source parameters: never, before every batch (`episodic`), at "
                                 "each domain boundary of a sequential stream (needs domain labels), or when the "
                                 "collapse guard fires (`on-collapse`, label-free: qshift.methods.guard)",
                        choices=RESETS)
    optimizer: str = option("adamw", "optimizer of the adapted parameters", choices=OPTIMIZERS)
    collapse_window: int = option(4, "batches the collapse guard averages its signal over "
                                     "(with reset=on-collapse)", minimum=1, maximum=1000)
    collapse_signal: str = option("spread", "what the collapse guard watches (qshift.methods.guard): the adapted "
                                            "queries' mean pairwise cosine distance over the source's (`spread`), "
                                            "the share of adapted top-1 items the source model scores within 1 sd "
                                            "of its own top-1 (`plausible`), or in the source's top 10, weighted "
                                            "by the source's confidence (`confident`) or not (`containment`), the "
                                            "share equal to the source's top-1 (`agreement`), or distinct top-1 "
                                            "items over the source's (`diversity`)",
                                  choices=COLLAPSE_SIGNALS)
    collapse_ratio: float = option(0.85, "the guard resets when its signal, averaged over the window, falls below "
                                         "this", minimum=0.0, maximum=1.0)
    momentum: float = option(0.9, "SGD momentum (with optimizer `sgd`)", minimum=0.0)
    candidates: int = option(0, "score each query against its K nearest gallery items from the gallery index "
                                "(top-K candidates, docs/large-galleries.md); 0: against the whole gallery",
                             minimum=0)
    index: str = option("exact", "the search behind `candidates`: `exact` (torch, blockwise) or a FAISS factory "
                                 "string over inner product (`Flat`, `IVF1024,Flat`, `HNSW32,Flat`)")
    index_params: str = option("", "FAISS search parameters of `index`, e.g. `nprobe=32` or `efSearch=128`")

    def with_lr(self, lr: float) -> "Protocol":
        """The protocol with its learning rate resolved (``lr`` when the protocol leaves it unset)."""
        return self if self.lr is not None else dataclasses.replace(self, lr=float(lr))


def split_protocol(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(protocol knobs, everything else) of a flat ``key → value`` mapping."""
    names = set(Protocol.names())
    return ({k: v for k, v in config.items() if k in names}, {k: v for k, v in config.items() if k not in names})


def options_table(options: type[Options]) -> str:
    """A Markdown table of an option structure (docs/methods.md is generated from these)."""
    lines = ["| option | type | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
    for r in options.describe():
        default = "none" if r["default"] is None else (str(r["default"]).lower() if isinstance(r["default"], bool)
                                                      else f"{r['default']:g}" if isinstance(r["default"], float)
                                                      else str(r["default"]))
        lines.append(f"| `{r['name']}` | {r['kind'].replace('|None', ' or none')} | `{default}` | {r['allowed']} | "
                     f"{r['help']} |")
    return "\n".join(lines)
