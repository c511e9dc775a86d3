"""A grid's specification (``qshift bench --grid FILE.yaml``): methods × benchmarks × seeds, the shared
protocol and the backbone, validated in full — YAML syntax, types, method options, protocol knobs, safe
labels, ``only:`` selections — before any cell runs; and the plan of its cells."""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qshift.bench.registry import list_benchmarks, resolve
from qshift.methods import available_methods
from qshift.methods.base import method_options
from qshift.options import Protocol, split_protocol

#: the knobs a grid's ``protocol:`` (or a method row's options) may set: the fields of the one protocol structure
PROTOCOL_KEYS = Protocol.names()
BASELINES = ("source", "tent", "eta", "sar", "shot-im", "read", "deyo", "tcr", "rest")


_SAFE_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+\-\[\]]*")


class MethodSpec(BaseModel):
    """One row of the grid: a registered method, optionally with options under its own label."""

    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _safe_label(cls, v):
        # a label names a folder of the grid's results: nothing that could leave it
        if v is not None and (not _SAFE_LABEL.fullmatch(v) or ".." in v):
            raise ValueError(f"method label {v!r} may hold only letters, digits and _ . , = + - [ ] (no '/', "
                             "no '..', not starting with '.')")
        return v

    @property
    def key(self) -> str:
        return self.label or self.name


class GridSpec(BaseModel):
    """A grid: methods × benchmarks × seeds, with shared protocol settings."""

    model_config = ConfigDict(extra="forbid")
    methods: list[MethodSpec] = Field(min_length=1)
    benchmarks: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    protocol: dict[str, Any] = Field(default_factory=dict)
    max_queries: int | None = Field(default=None, ge=1, description="subsample each benchmark's queries")
    diagnostics: list[str] = Field(default_factory=list, description="benchmarks to run `diagnose` on")
    shift_seed: int = 0
    # the backbone and data, as `qshift run`'s --model / --weights / --dataset / --data-root / …
    model: str = "world"
    weights: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    annotation: str | None = None
    preprocess: str = "model"
    device: str = "cpu"
    model_options: dict[str, Any] = Field(default_factory=dict, description="backbone options (load_model's "
                                          "keyword options: fusion, combiner, quick_gelu, …)")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v]

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, v):
        bad = set(v) - set(PROTOCOL_KEYS)
        if bad:
            raise ValueError(f"unknown protocol key(s) {sorted(bad)}; allowed: {PROTOCOL_KEYS}")
        Protocol.build(v)
        return v

    def expanded_benchmarks(self) -> list[str]:
        """Benchmark names with glob patterns (``world-c/i2t/*/5``) resolved against the registry."""
        known = list_benchmarks(self.dataset)
        out: list[str] = []
        for pat in self.benchmarks:
            if not any(ch in pat for ch in "*?["):
                resolve(pat, self.dataset)  # an unknown name fails here, with suggestions
            hits = [n for n in known if fnmatch.fnmatchcase(n, pat)] if any(ch in pat for ch in "*?[") else [pat]
            if not hits:
                raise ValueError(f"benchmark pattern {pat!r} matches nothing; see `qshift shifts list`")
            out.extend(h for h in hits if h not in out)
        return out

    def validate_methods(self) -> None:
        """Fail before the first cell, not hours into a grid: every row's method, options and protocol."""
        known = set(available_methods())
        for m in self.methods:
            if m.name not in known:
                raise ValueError(f"unknown method {m.name!r} in grid; available: {', '.join(sorted(known))}")
            try:
                method_options(m.name, _own_options(m))
            except ValueError as e:
                raise ValueError(f"method row {m.key!r} in grid: {e} (protocol knobs: {', '.join(PROTOCOL_KEYS)})") \
                    from e
            try:
                Protocol.build(_protocol_of(self, m))
            except ValueError as e:
                raise ValueError(f"protocol of method row {m.key!r} in grid: {e}") from e
        labels = [m.key for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method labels must be unique, got {labels}")


def load_grid(path: str | Path) -> tuple[GridSpec, dict[str, list[str]]]:
    """Read and validate a grid YAML file (keys as :class:`GridSpec`, plus optional ``only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        raw = _exponent_floats(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as e:  # syntax errors and unsafe tags (`!!python/…`) alike
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path}: not a valid grid YAML file{at}: {problem}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the grid file: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a grid file must be a mapping with 'methods' and 'benchmarks'")
    only = raw.pop("only", {}) or {}
    try:
        spec = GridSpec(**raw)
    except ValidationError as e:  # pydantic's message names the field at fault
        first = e.errors()[0]
        raise ValueError(f"{path}: invalid grid: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from e
    except TypeError as e:
        raise ValueError(f"{path}: invalid grid: {e}") from e
    return spec, check_only(only, spec, path)


def check_only(only: Any, spec: GridSpec, where: object = "grid") -> dict[str, list[str]]:
    """Validate a grid's ``only:`` (benchmark pattern → the method labels that run on it): a mapping
    of strings to lists of known labels, each pattern matching one of the grid's benchmarks."""
    if not isinstance(only, dict):
        raise ValueError(f"{where}: 'only' must map benchmark patterns to lists of method labels, e.g. "
                         f"{{'world-diverse/*': ['source', 'rest']}}, got a {type(only).__name__}")
    labels = {m.key for m in spec.methods}
    benches = spec.expanded_benchmarks()
    out = {}
    for pat, allowed in only.items():
        if isinstance(allowed, str):
            allowed = [allowed]
        if not isinstance(pat, str) or not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ValueError(f"{where}: 'only' entry {pat!r} must be a benchmark pattern with a list of labels")
        unknown = sorted(set(allowed) - labels)
        if unknown:
            raise ValueError(f"{where}: 'only' entry {pat!r} names method label(s) {unknown} not in the grid "
                             f"(labels: {', '.join(sorted(labels))})")
        if not any(fnmatch.fnmatchcase(b, pat) for b in benches):
            raise ValueError(f"{where}: 'only' pattern {pat!r} matches none of the grid's benchmarks")
        out[pat] = list(allowed)
    return out


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_floats(obj: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-3`` — a number without a dot — as a string; read it as the float meant."""
    if isinstance(obj, dict):
        return {k: _exponent_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_exponent_floats(v) for v in obj]
    if isinstance(obj, str) and _EXPONENT_FLOAT.fullmatch(obj.strip()):
        return float(obj)
    return obj


def plan(spec: GridSpec, only: dict[str, list[str]] | None = None) -> list[tuple[str, MethodSpec, int]]:
    """The grid's cells in run order (benchmark-major, so each benchmark's queries are built once)."""
    spec.validate_methods()
    cells = []
    for bench in spec.expanded_benchmarks():
        allowed = None
        for pat, labels in (only or {}).items():
            if fnmatch.fnmatchcase(bench, pat):
                allowed = set(labels)
        for m in spec.methods:
            if allowed is not None and m.key not in allowed:
                continue
            for seed in spec.seeds:
                cells.append((bench, m, seed))
    if not cells:
        raise ValueError("the grid selects no cells (check 'only': every benchmark's allowed labels are excluded)")
    return cells


def _protocol_of(spec: "GridSpec", m: "MethodSpec") -> dict[str, Any]:
    """The protocol knobs a cell of method row ``m`` runs with: the grid's, then the row's own overrides."""
    return {**spec.protocol, **split_protocol(m.options)[0]}


def _own_options(m: "MethodSpec") -> dict[str, Any]:
    """Method row ``m``'s own options (its protocol overrides left out)."""
    return split_protocol(m.options)[1]


def cell_protocol(spec: "GridSpec", m: "MethodSpec") -> Protocol:
    """The protocol structure a cell of method row ``m`` runs under."""
    return Protocol.build(_protocol_of(spec, m))
