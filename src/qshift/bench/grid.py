"""Grids of methods × benchmarks × seeds (``qshift bench``): validated spec, presets, resumable runner.

Each cell is one online run saved as ``<out>/cells/<benchmark>/<method label>/seed<k>.json.gz``
(written atomically) and summarised in the grid's index ``<out>/cells.jsonl`` (see
:mod:`qshift.bench.store`).  A finished cell is skipped on re-run, so an interrupted grid resumes; a
cell that fails is recorded in ``seed<k>.error.json`` with its traceback and the grid goes on (the
error file is removed when the cell later succeeds).
"""
from __future__ import annotations

import fnmatch
import json
import random
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm.auto import tqdm

from qshift.atomic import clean_stale_tmp, prepare_output_dir, write_text_atomic
from qshift.bench import store
from qshift.bench.backbone import GridBackbone, world_identity
from qshift.bench.diagnose import diagnose_task
from qshift.bench.evaluate import items_fingerprint
from qshift.engine import RunConfig, run_online
from qshift.retrieval.encode import encode_batched
from qshift.bench.registry import build_benchmark, list_benchmarks, resolve
from qshift.methods import available_methods
from qshift.methods.base import method_options, resolved_options
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


_C16 = "world-c/i2t/*/5"
_CHAR6 = ["world-c/t2i/keyboard/6", "world-c/t2i/ocr/6", "world-c/t2i/char_insert/6",
          "world-c/t2i/char_substitute/6", "world-c/t2i/char_swap/6", "world-c/t2i/char_delete/6"]
_TABLE = ["world-clean/i2t", "world-clean/t2i", "world-c/i2t/*/5", "world-c/i2t/*/3", "world-c/t2i/*/6",
          "world-qgs/*/i2t", "world-qgs/*/t2i"]
_ABLATION_BENCHMARKS = ["world-diverse/i2t/mix8/order0", "world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5",
                        "world-c/i2t/zoom_blur/5", "world-c/t2i/keyboard/6"]


def _rest(label: str, **options: Any) -> dict[str, Any]:
    return {"name": "rest", "label": f"rest[{label}]", "options": options}


#: the switches the methods issue asks the REST ablation for: each loss term, each decoupling signal,
#: mode and granularity
_SWITCHES = [_rest("no-decoupling", decoupling=False), _rest("no-consistency", consistency="off"),
             _rest("no-uniformity", lambda_u=0.0), _rest("no-gap", lambda_g=0.0), _rest("reliable", signal="reliable"),
             _rest("memory", signal="memory"), _rest("always", mode="always"), _rest("per-tensor", granularity="per-tensor")]
PRESETS: dict[str, dict[str, Any]] = {
    # every method on the severity-5 corruptions and level-6 character perturbations
    "world-qs": {"methods": list(BASELINES), "benchmarks": [_C16, *_CHAR6]},
    "world-qgs": {"methods": list(BASELINES), "benchmarks": ["world-qgs/*/i2t", "world-qgs/*/t2i"]},
    # the README grid: world-qs plus the diverse streams for source / tcr / rest
    "world-readme": {"methods": list(BASELINES),
                     "benchmarks": [_C16, *_CHAR6, "world-diverse/i2t/c8-s5/order*"],
                     "only": {"world-diverse/*": ["source", "tcr", "rest"]},
                     "diagnostics": ["world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5", "world-c/t2i/keyboard/6"]},
    # the methods issue's table: every method, 1 seed, on clean queries (the control), the 16 corruptions at
    # severities 5 and 3, every text perturbation at level 6 and the QGS domains; run world-3seeds into the
    # same folder for seeds 1 and 2 of source / tcr / rest (seed-0 cells are shared, not rerun)
    "world-methods": {"methods": list(BASELINES), "benchmarks": _TABLE},
    "world-3seeds": {"methods": ["source", "tcr", "rest"], "benchmarks": _TABLE, "seeds": [0, 1, 2]},
    # diverse shift: an i2t stream through 8 domains mixing corruptions and render domains, a t2i stream
    # mixing text perturbations and caption styles, 3 domain orders each
    # (750 queries per domain, 6,000 per stream, so the 36 cells fit in about half an hour on 2 cores)
    "world-diverse": {"methods": ["source", "tent", "eta", "sar", "tcr", "rest"],
                      "benchmarks": ["world-diverse/i2t/mix8/order*", "world-diverse/t2i/mix8/order*"],
                      "max_queries": 6000},
    # REST ablation: each switch of docs/method.md §4–§5 against the default, on a diverse stream (online
    # mean vs clean R@1 after it: the Pareto pair) and four severe corruptions
    "rest-ablation": {"methods": [
        "tcr", "rest", *_SWITCHES[:2], _rest("mutual", consistency="mutual"), *_SWITCHES[2:],
        *(_rest(f"lambda_a={v:g}", lambda_a=v) for v in (0.01, 0.03, 0.3, 1.0))],
        "benchmarks": _ABLATION_BENCHMARKS, "max_queries": 6000},
    # the methods issue's switches (each loss term, each decoupling signal / mode / granularity) on the
    # whole severity-5 family, for its mean (tcr and rest themselves are in the methods table); run it into
    # the rest-ablation folder and the cells of the three corruptions above are shared, not rerun
    "rest-ablation-s5": {"methods": _SWITCHES, "benchmarks": [_C16],
                         "max_queries": 6000},  # the cap of rest-ablation (no corruption reaches it)
    # the remaining switches (optimiser, metric, anchor placement, queue refresh), same benchmarks
    "rest-ablation-extra": {"methods": [
        {"name": "rest", "label": "rest[adam-metric]", "options": {"precondition": "adam"}},
        {"name": "rest", "label": "rest[sgd]", "options": {"optimizer": "sgd", "lr": 1e-3}},
        {"name": "rest", "label": "rest[anchor-unreliable]", "options": {"anchor_on": "unreliable"}},
        {"name": "rest", "label": "rest[sliding]", "options": {"refresh": "sliding"}},
        {"name": "rest", "label": "rest[refresh-on-shift]", "options": {"refresh": "refresh-on-shift"}}],
        "benchmarks": _ABLATION_BENCHMARKS, "max_queries": 6000},
    # what `qshift demo` runs: a representative subset, about five minutes on two CPU cores
    "demo": {"methods": ["source", "tent", "tcr", "rest"],
             "benchmarks": ["world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5", "world-c/i2t/jpeg_compression/5",
                            "world-c/t2i/keyboard/6", "world-diverse/i2t/c8-s5/order0"],
             "max_queries": 512,
             "diagnostics": ["world-c/i2t/gaussian_noise/5"]},
}


def preset(name: str) -> tuple[GridSpec, dict[str, list[str]]]:
    """A named preset as a GridSpec (plus its per-benchmark method restrictions)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    raw = dict(PRESETS[name])
    only = raw.pop("only", {})
    return GridSpec(**raw), only


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


def cell_path(out: Path, benchmark: str, label: str, seed: int) -> Path:
    """Where a cell's full result is written (compressed; :func:`qshift.bench.store.cell_path`)."""
    return store.cell_path(out, benchmark, label, seed)


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


def model_identity(weights: str | Path | None) -> dict[str, Any]:
    """The embedded world model's identity (see :func:`qshift.bench.backbone.world_identity`)."""
    return world_identity(weights)


def _finished(cell: Path | dict[str, Any] | None, expected: dict[str, Any] | None = None,
              model: dict[str, Any] | None = None, protocol: dict[str, Any] | None = None) -> bool:
    """A cell is finished when its JSON holds metrics, was made with the same world model and world
    (``model``: a cell without that record predates it and is stale), and — where it recorded them —
    the method options it resolved to are the ones this code would use now (a changed default makes
    the cell stale) and the protocol it ran under is the grid's now (``protocol``, from
    ``_expected_protocol``: a grid whose lr, steps, … or query subsample changed reruns its cells).

    ``cell``: a cell's record as the store gives it, or its path (read with
    :func:`qshift.bench.store.get_cell`: the full file, else the grid folder's index line)."""
    payload = store.get_cell(cell) if isinstance(cell, (str, Path)) else cell
    if not payload or "metrics" not in payload:
        return False
    if model is not None and payload.get("model") != model:
        return False
    stored = payload.get("config", {}).get("method_resolved")
    if expected is not None and stored is not None and json.loads(json.dumps(stored)) != json.loads(json.dumps(expected)):
        return False
    if protocol is not None:
        config = payload.get("config", {})
        # None (a knob RunConfig leaves to the engine) matches whatever the engine recorded
        if any(v is not None and k in config and config[k] != v for k, v in protocol["config"].items()):
            return False
        if any(k in payload and payload[k] != protocol[k] for k in ("max_queries", "grid_shift_seed")):
            return False
    return True


def _protocol_of(spec: "GridSpec", m: "MethodSpec") -> dict[str, Any]:
    """The protocol knobs a cell of method row ``m`` runs with: the grid's, then the row's own overrides."""
    return {**spec.protocol, **split_protocol(m.options)[0]}


def _own_options(m: "MethodSpec") -> dict[str, Any]:
    """Method row ``m``'s own options (its protocol overrides left out)."""
    return split_protocol(m.options)[1]


def cell_protocol(spec: "GridSpec", m: "MethodSpec") -> Protocol:
    """The protocol structure a cell of method row ``m`` runs under."""
    return Protocol.build(_protocol_of(spec, m))


def _expected_protocol(spec: "GridSpec", m: "MethodSpec", lr_default: float) -> dict[str, Any]:
    """What a finished cell of ``m`` must have recorded of its protocol: every knob, the learning rate
    resolved with the grid model's protocol rate ``lr_default`` (so a cell made under another default is
    stale, not silently reused)."""
    return {"config": cell_protocol(spec, m).with_lr(lr_default).as_dict(), "max_queries": spec.max_queries,
            "grid_shift_seed": spec.shift_seed}


def _expected_options(m: "MethodSpec") -> dict[str, Any]:
    return resolved_options(m.name, _own_options(m))


def _atomic_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))


def backbone_of(spec: GridSpec) -> GridBackbone:
    """The grid's backbone and dataset, from its model / weights / dataset / … fields."""
    return GridBackbone(spec.model, spec.weights, dataset=spec.dataset, data_root=spec.data_root,
                        annotation=spec.annotation, preprocess=spec.preprocess, device=spec.device)


def cell_status(spec: GridSpec, out: str | Path, only: dict[str, list[str]] | None = None,
                backbone: GridBackbone | None = None) -> list[tuple[str, MethodSpec, int, bool]]:
    """Each cell of the grid with whether a finished, current result exists for it in ``out`` (same
    backbone identity, method options and protocol, the learning rate resolved for its direction)."""
    backbone = backbone or backbone_of(spec)
    rates: dict[str, float] = {}
    rows = []
    for bench, m, seed in plan(spec, only):
        fam, params = resolve(bench, spec.dataset)
        direction = fam.direction_of(params)
        if direction not in rates:
            rates[direction] = backbone.lr_default(direction)
        rec = store.get_cell(cell_path(out, bench, m.key, seed))  # full cell, else its index line
        rows.append((bench, m, seed, _finished(rec, _expected_options(m), backbone.identity,
                                               _expected_protocol(spec, m, rates[direction]))))
    return rows


def run_grid(spec: GridSpec, out: str | Path, only: dict[str, list[str]] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Run every unfinished cell of the grid; returns counts of done / skipped / failed cells."""
    log = log or (lambda msg: tqdm.write(msg))
    out = prepare_output_dir(out)
    clean_stale_tmp(out, recursive=True)  # what a killed run left half-written
    backbone = backbone_of(spec)
    status = cell_status(spec, out, only, backbone)
    _atomic_json(out / "grid.json", {"spec": spec.model_dump(), "only": only or {}, "cells": len(status)})
    todo = [(b, m, s) for b, m, s, done in status if not done]
    stale = sum(1 for b, m, s, done in status if not done and _finished(store.get_cell(cell_path(out, b, m.key, s))))
    counts = {"cells": len(status), "skipped": len(status) - len(todo), "done": 0, "failed": 0, "stale": stale}
    if stale:
        log(f"{stale} finished cell(s) ran with another model, other method defaults or another protocol; "
            "rerunning them")
    if counts["skipped"]:
        log(f"resuming: {counts['skipped']} of {len(status)} cells already finished")
    task_cache: dict[str, Any] = {}
    gallery_cache: dict[tuple[str, str], Any] = {}  # the frozen gallery tower's embeddings, per gallery
    bar = tqdm(todo, desc="grid", unit="cell", disable=not progress)
    for bench, m, seed in bar:
        bar.set_postfix_str(f"{m.key} · {bench}")
        err_path = store.error_path(out, bench, m.key, seed)
        t0 = time.perf_counter()
        try:
            if bench not in task_cache:
                task_cache.clear()
                task_cache[bench] = build_benchmark(bench, shift_seed=spec.shift_seed, max_queries=spec.max_queries,
                                                    dataset=backbone.dataset)
            task = task_cache[bench]
            model = backbone.model(task.direction)  # every cell starts from the source parameters
            gkey = (task.direction, items_fingerprint(task.gallery))
            if gkey not in gallery_cache:
                gallery_cache[gkey] = encode_batched(model.encode_gallery, task.gallery, 256)
            # a method row may override protocol knobs (e.g. its own lr)
            cfg = RunConfig(method=m.name, protocol=cell_protocol(spec, m), seed=seed, method_options=_own_options(m))
            result = run_online(model, task, cfg, progress=False, gallery_embeddings=gallery_cache[gkey])
            payload = result.as_json()
            payload.update({"label": m.key, "grid_shift_seed": spec.shift_seed, "shift_seed": spec.shift_seed, "max_queries": spec.max_queries,
                            "model": backbone.identity})
            store.write_cell(out, bench, m.key, seed, payload)
            err_path.unlink(missing_ok=True)
            counts["done"] += 1
            if counts["done"] % 25 == 0:  # the index (kept in git) follows the run, not only its end
                store.write_index(out)
        except KeyboardInterrupt:
            store.write_index(out)
            raise
        except Exception as e:  # record and go on
            counts["failed"] += 1
            _atomic_json(err_path, {"benchmark": bench, "label": m.key, "seed": seed, "error": repr(e),
                                    "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0})
            log(f"cell failed: {m.key} on {bench} (seed {seed}): {e!r} → {err_path}")
    store.write_index(out)
    for bench in spec.diagnostics:
        dpath = out / "diagnostics" / f"{bench.replace('/', '__')}.json"
        if _finished_diag(dpath, backbone.identity):
            continue
        try:
            task = build_benchmark(bench, shift_seed=spec.shift_seed, max_queries=spec.max_queries,
                                   dataset=backbone.dataset)
            model = backbone.model(task.direction)
            _atomic_json(dpath, {"benchmark": bench, "diagnostics": diagnose_task(model, task),
                                 "model": backbone.identity})
        except Exception as e:
            counts["failed"] += 1
            log(f"diagnostics failed on {bench}: {e!r}")
    return counts


def _finished_diag(path: Path, model: dict[str, Any] | None = None) -> bool:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return "diagnostics" in payload and (model is None or payload.get("model") == model)


_RESTAMP_IGNORED = {"seconds", "peak_rss_mb", "peak_cuda_mb", "environment", "model", "restamped"}


def _comparable(payload: dict) -> dict:
    """A cell's results without what legitimately differs between two runs (timings, host, stamps)."""
    out = {k: v for k, v in payload.items() if k not in _RESTAMP_IGNORED}
    out["batches"] = [{k: v for k, v in b.items() if k != "seconds"} for b in payload.get("batches", [])]
    return json.loads(json.dumps(out, default=str))


def restamp_cells(out: str | Path, patterns: list[str], verify: int = 2, seed: int = 0,
                  weights: str | Path | None = None, from_sha: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Mark finished cells made with another world model as made with the current one, *after proving*
    that the current model gives them bit-identical results.

    For a model change that cannot affect some cells (e.g. zeroing text n-gram rows that no clean
    caption uses leaves every cell whose captions are clean unchanged), rerunning those cells would
    only cost time.  This reruns ``verify`` randomly chosen (by ``seed``) stale cells among those whose
    benchmark matches ``patterns`` with the current model, compares everything but timings with the
    stored results, and only if all are identical rewrites the ``model`` record of every matching
    stale cell (adding a ``restamped`` record: the old identity and the cells that verified it).
    ``from_sha`` (a prefix of the old weights' SHA-256) picks the old model when the folder holds cells
    of several.
    Nothing is written if any verification differs.  Returns counts and the verifying cells."""

    log = log or print
    if verify < 1:
        raise ValueError("verify must be at least 1: restamping without a verification proves nothing")
    out = Path(out)
    current = model_identity(weights)
    candidates = []
    for path, payload in store.iter_cell_files(out):  # full cells, and index lines of cells without one
        if "metrics" not in payload or payload.get("model") in (None, current):
            continue
        if from_sha and not str(payload["model"].get("weights_sha256", "")).startswith(from_sha):
            continue
        if any(fnmatch.fnmatchcase(payload["benchmark"], p) for p in patterns):
            candidates.append((path, payload))
    if not candidates:
        return {"restamped": 0, "verified_by": [], "candidates": 0}
    old_ids = {json.dumps(p["model"], sort_keys=True) for _, p in candidates}
    if len(old_ids) != 1:
        shas = sorted({p["model"].get("weights_sha256", "?")[:12] for _, p in candidates})
        raise ValueError(f"matching cells come from {len(old_ids)} different models (weights {', '.join(shas)}); "
                         "pick one with from_sha / --from-sha")
    picks = random.Random(seed).sample(candidates, min(verify, len(candidates)))
    verified = []
    for path, payload in picks:
        cfg = payload["config"]
        spec = GridSpec(methods=[{"name": cfg["method"], "label": payload.get("label"),
                                  "options": dict(cfg.get("method_options") or {})}],
                        benchmarks=[payload["benchmark"]], seeds=[cfg["seed"]],
                        protocol={k: cfg[k] for k in PROTOCOL_KEYS if k in cfg},
                        max_queries=payload.get("max_queries"), shift_seed=payload.get("grid_shift_seed", 0),
                        weights=str(weights) if weights else None)
        tmp = Path(tempfile.mkdtemp(prefix="qshift-restamp-"))
        try:
            counts = run_grid(spec, tmp, progress=False, log=log)
            rerun_path = cell_path(tmp, payload["benchmark"], spec.methods[0].key, cfg["seed"])
            if counts["failed"] or not rerun_path.is_file():
                raise RuntimeError(f"verification run of {path} failed")
            rerun = store.read_cell(rerun_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if payload.get("_source") == store.INDEX_SOURCE:  # an index line holds of the batches only their trace
            rerun = store.from_index_record(store.to_index_record(rerun))
        if _comparable(rerun) != _comparable(payload):
            log(f"{path}: the current model gives different results (R@1 {rerun['metrics'].get('R@1')} vs "
                f"{payload['metrics'].get('R@1')}); nothing restamped")
            return {"restamped": 0, "verified_by": [], "candidates": len(candidates), "mismatch": str(path)}
        verified.append(str(path.relative_to(out)))
        log(f"verified identical with the current model: {path.relative_to(out)}")
    for path, payload in candidates:
        payload["restamped"] = {"from": payload["model"], "verified_by": verified, "patterns": patterns,
                                "date": time.strftime("%Y-%m-%d")}
        payload["model"] = current
        if payload.get("_source") != store.INDEX_SOURCE:
            store.write_cell_at(path, payload)
    store.write_index(out, [p for _, p in candidates if p.get("_source") == store.INDEX_SOURCE])
    return {"restamped": len(candidates), "verified_by": verified, "candidates": len(candidates)}
