"""The resumable grid runner (``qshift bench``): which cells of a grid are finished and current, and
running the rest.  The spec is :mod:`qshift.bench.grid_spec`, the built-in grids
:mod:`qshift.bench.presets`, restamping :mod:`qshift.bench.restamp`.

Each cell is one online run saved as ``<out>/cells/<benchmark>/<method label>/seed<k>.json.gz``
(written atomically) and summarised in the grid's index ``<out>/cells.jsonl`` (see
:mod:`qshift.bench.store`).  A finished cell is skipped on re-run, so an interrupted grid resumes; a
cell that fails is recorded in ``seed<k>.error.json`` with its traceback and the grid goes on (the
error file is removed when the cell later succeeds).
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qshift.atomic import clean_stale_tmp, prepare_output_dir, write_text_atomic
from qshift.bench import store
from qshift.bench.backbone import GridBackbone, world_identity
from qshift.bench.diagnose import diagnose_task
from qshift.bench.evaluate import items_fingerprint
from qshift.bench.grid_spec import (BASELINES, PROTOCOL_KEYS, GridSpec, MethodSpec, _own_options,  # noqa: F401
                                    _protocol_of, cell_protocol, check_only, load_grid, plan)
from qshift.bench.presets import PRESETS, preset  # noqa: F401  (qshift.bench.grid.preset, as before the split)
from qshift.bench.registry import build_benchmark, resolve
from qshift.engine import RunConfig, run_online
from qshift.methods.base import resolved_options
from qshift.retrieval.encode import encode_batched


def cell_path(out: Path, benchmark: str, label: str, seed: int) -> Path:
    """Where a cell's full result is written (compressed; :func:`qshift.bench.store.cell_path`)."""
    return store.cell_path(out, benchmark, label, seed)


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
                        annotation=spec.annotation, preprocess=spec.preprocess, device=spec.device,
                        options=spec.model_options)


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
        rows.append((bench, m, seed, _finished(rec, _expected_options(m), backbone.identity_for(direction),
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
                            "model": backbone.identity_for(task.direction)})
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
