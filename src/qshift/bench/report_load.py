"""The report's input: the finished cells of a grid folder, or the result files of ``qshift run --out``.

A :class:`Cell` is one run (benchmark × method label × seed) as the tables and plots need it.  A grid
folder (``qshift bench``) is read through :mod:`qshift.bench.store`; any other folder is searched for
run results (``RunResult.save`` files), recognised by their content, whatever their names.
"""
from __future__ import annotations

import gzip
import json
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qshift.bench import store
from qshift.bench.backbone import same_model, world_identity
from qshift.bench.grid import GridSpec, backbone_of
from qshift.models.world_model import WorldRetrievalModel
from qshift.options import Protocol

#: the keys (and the ``config`` keys) that make a JSON object a finished run result
RUN_KEYS = ("benchmark", "config", "metrics", "per_domain", "batches")
RUN_CONFIG_KEYS = ("method", "seed")
_JSON_START = (b"{", b"\x1f\x8b")  # a JSON object, or gzip (a compressed cell copied out of a grid)


@dataclass
class Cell:
    benchmark: str
    label: str
    method: str
    seed: int
    metrics: dict
    per_domain: dict
    forgetting: dict | None
    batches: list[dict]
    seconds: float
    protocol: dict = field(default_factory=dict)  # the run's protocol knobs, as its result file recorded them


def current_model(out: str | Path) -> dict | None:
    """The backbone identity a grid folder's cells should have now: that of the model, weights and data
    its ``grid.json`` names (the shipped world model when it names none); None when there is no
    ``grid.json`` or its backbone cannot be found here (then every cell is kept)."""
    spec_path = Path(out) / "grid.json"
    if not spec_path.is_file():
        return None
    raw = json.loads(spec_path.read_text()).get("spec", {})
    try:
        if raw.get("model", "world") == "world":
            return world_identity(raw.get("weights"), all_tasks=True)
        return backbone_of(GridSpec(**raw)).identity
    except (FileNotFoundError, ValueError, OSError):
        return None


def _cell_of(d: dict) -> Cell:
    return Cell(d["benchmark"], d.get("label") or d["config"]["method"], d["config"]["method"],
                int(d["config"]["seed"]), d["metrics"], d.get("per_domain", {}), d.get("forgetting"),
                d.get("batches", []), float(d.get("seconds", 0.0)), _cell_protocol(d))


def load_cells(out: str | Path, model: dict | None | str = "current", excluded: list | None = None) -> list[Cell]:
    """Every finished cell of a grid folder (error files and temporaries are ignored): its full cells
    under ``cells/`` and, for cells without one (a fresh clone), the lines of its index ``cells.jsonl``
    (:mod:`qshift.bench.store`; both give the same tables and plots).

    ``model``: keep only cells made with this world-model identity — by default the one the grid's
    ``grid.json`` names now, so a table never mixes cells of two models; None keeps every cell. The
    paths of the cells left out are appended to ``excluded`` when it is given."""
    if not store.has_cells(out):
        raise FileNotFoundError(f"no grid results under {Path(out) / 'cells'} (nor {store.index_path(out)}); "
                                "run `qshift bench` first")
    if model == "current":
        model = current_model(out)
    cells = []
    for path, d in store.iter_cell_files(out):
        if model is not None and not same_model(d.get("model"), model):
            if excluded is not None:
                excluded.append(path)
            continue
        cells.append(_cell_of(d))
    return cells


def is_run_record(obj: Any) -> bool:
    """Whether a JSON value is a finished run result (``RunResult.as_json()``, maybe with a grid's stamps)."""
    return (isinstance(obj, dict) and all(k in obj for k in RUN_KEYS) and isinstance(obj["config"], dict)
            and all(k in obj["config"] for k in RUN_CONFIG_KEYS) and isinstance(obj["metrics"], dict))


def _read_json_file(path: Path) -> Any:
    """The JSON value in ``path`` (plain or gzip-compressed), or None when it holds none."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if not any(head.startswith(s) for s in _JSON_START):
                return None
            data = head + f.read()
        if data[:2] == _JSON_START[1]:
            data = gzip.decompress(data)
        return json.loads(data)
    except (OSError, ValueError, EOFError, zlib.error, gzip.BadGzipFile):
        return None


def protocol_deviations(protocol: dict) -> dict:
    """The knobs of a cell's recorded protocol that differ from the defaults (:class:`qshift.options.Protocol`,
    the learning rate against the backbone's own protocol rate that the cell recorded)."""
    dev = {k: protocol[k] for k, v in Protocol.defaults().items()
           if k != "lr" and k in protocol and protocol[k] != v}
    lr = protocol.get("lr")
    default = protocol["lr_default"] if "lr_default" in protocol else legacy_lr_default({})
    if lr is not None and (default is None or not math.isclose(lr, default, rel_tol=1e-9)):
        dev["lr"] = lr
    return dev


def _traits(d: dict) -> dict[str, Any]:
    """What sets a run apart from another of its method: its method options and its protocol deviations."""
    opts = d["config"].get("method_options") or {}
    return {**{str(k): v for k, v in opts.items()}, **protocol_deviations(_cell_protocol(d))}


def _fmt_trait(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_labels(records: list[dict]) -> list[str]:
    """The table label of each run record: the grid's label when it has one, else its method, followed by
    the options and protocol knobs that differ among that method's runs here (``tent[lr=0.003]``,
    ``rest[lambda_a=1]``), so that runs of one method under other settings are never averaged together,
    while settings shared by every run of the method (the protocol line reports those) stay out of the label."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in records:
        if not d.get("label"):
            by_method[d["config"]["method"]].append(_traits(d))
    varying = {m: sorted({k for t in ts for k in t if len({json.dumps(x.get(k), sort_keys=True, default=str)
                                                           for x in ts}) > 1})
               for m, ts in by_method.items()}
    labels = []
    for d in records:
        if d.get("label"):
            labels.append(d["label"])
            continue
        method, traits = d["config"]["method"], _traits(d)
        shown = [f"{k}={_fmt_trait(traits[k])}" for k in varying[method] if k in traits]
        labels.append(f"{method}[{','.join(shown)}]" if shown else method)
    return labels


def find_run_files(folder: str | Path) -> list[tuple[Path, dict]]:
    """(path, record) of every run result under ``folder`` (recursively, sorted by path), recognised by
    content: any file holding a JSON object with a run's keys (``benchmark``, ``config.method``,
    ``config.seed``, ``metrics``, …), plain or gzip-compressed; other files (and temporaries) are skipped."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.rglob("*")):
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if hidden or p.name.endswith(".tmp") or not p.is_file():
            continue
        d = _read_json_file(p)
        if is_run_record(d):
            found.append((p, d))
    return found


def load_runs(folder: str | Path) -> list[Cell]:
    """The cells of a folder of ``qshift run --out`` result files (any names; see :func:`find_run_files`),
    labelled by :func:`run_labels`.

    Raises FileNotFoundError when the folder holds none, ValueError naming both files when two runs are
    the same cell (benchmark, label, seed): averaging them as seeds would be wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no grid results and no run result files under {folder}: no such folder")
    runs = find_run_files(folder)
    if not runs:
        raise FileNotFoundError(f"{folder}: no grid results (cells/ or {store.INDEX_NAME}) and no run result "
                                "files (`qshift run --out`) in it")
    seen: dict[tuple[str, str, int], Path] = {}
    cells = []
    for (path, d), label in zip(runs, run_labels([d for _, d in runs])):
        cell = _cell_of({**d, "label": label})
        key = (cell.benchmark, cell.label, cell.seed)
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} are both {cell.label} on {cell.benchmark} with seed "
                             f"{cell.seed}; keep one of them in {folder}")
        seen[key] = path
        cells.append(cell)
    # the order a grid folder's cells come in (so both give their tables' columns in one order)
    return sorted(cells, key=lambda c: (store.bench_dir(c.benchmark), c.label, f"seed{c.seed}.json"))


def is_grid_folder(out: str | Path) -> bool:
    """Whether ``out`` holds a grid's results (``qshift bench``) rather than loose run files."""
    return store.has_cells(out)


def _cell_protocol(d: dict) -> dict:
    cfg = d.get("config", {})
    out = {k: cfg[k] for k in Protocol.names() if k in cfg}
    out["lr_default"] = cfg.get("lr_default", legacy_lr_default(d))
    out["direction"] = d.get("direction")
    out["max_queries"] = d.get("max_queries")
    out["n_queries"] = d.get("n_queries")
    return out


def legacy_lr_default(d: dict) -> float | None:
    """The protocol learning rate of a cell that predates recording it (``config.lr_default``): such
    cells all ran the embedded world model, whose rate is its adapter's ``default_lr``."""
    model = d.get("model")
    return WorldRetrievalModel.default_lr if model is None or model.get("world_version") is not None else None


def load_errors(out: str | Path) -> list[dict]:
    """The records of a grid folder's failed cells (``cells/*/*/seed<k>.error.json``)."""
    return [d for _, d in store.iter_errors(out)]
