"""``qshift restamp``: mark finished cells made with another world model as made with the current one,
after proving on re-run cells that the current model gives bit-identical results."""
from __future__ import annotations

import fnmatch
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qshift.bench import store
from qshift.bench.grid import cell_path, model_identity, run_grid
from qshift.bench.grid_spec import PROTOCOL_KEYS, GridSpec

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
        # a field this code records that the stored cell predates (e.g. collapse_resets) is not a difference
        rerun = {k: v for k, v in rerun.items() if k in payload}
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
