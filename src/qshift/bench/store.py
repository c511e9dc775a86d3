"""How a grid folder's cells are stored and read.

A grid folder ``<out>`` holds, for every cell (benchmark × method label × seed):

* the **full cell**, ``<out>/cells/<benchmark with / → __>/<label>/seed<k>.json.gz``: the run's whole
  result (``RunResult.as_json()`` plus the grid's stamps), per-batch records included, gzip-compressed
  and written atomically.  These are large and kept out of git; a legacy uncompressed
  ``seed<k>.json`` is still read.
* one line of the **index** ``<out>/cells.jsonl`` (kept in git): the same record without ``batches``,
  plus a ``trace`` holding what the report's stream plots need of them — each batch's ``R@1`` and its
  domain, run-length encoded (``{"R@1": [...], "domain": [[name, n_batches], ...]}``).  Lines are sorted
  by (benchmark, label, seed) so a rerun changes only the lines of the cells it reran.

Readers (:func:`iter_cells`, :func:`get_cell`) take a cell from ``cells/`` when it is there and
readable and from the index otherwise, so a fresh clone (index only) reports and resumes like the
folder that ran the grid.  A record read from the index has ``batches`` rebuilt from its trace
(``[{"domain": …, "R@1": …}, …]``) and ``"_source": "index"``.  A failed cell's
``seed<k>.error.json`` stays a plain JSON file beside where its cell would be.
"""
from __future__ import annotations

import copy
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from qshift.atomic import atomic_path, write_text_atomic

CELLS_DIR = "cells"
INDEX_NAME = "cells.jsonl"
INDEX_SOURCE = "index"  # the ``_source`` of a record rebuilt from the index
_GZIP_MAGIC = b"\x1f\x8b"
_CELL_NAME = re.compile(r"seed(\d+)\.json(?:\.gz)?")

#: a cell's key: (benchmark folder name, label, seed)
Key = tuple[str, str, int]


def bench_dir(benchmark: str) -> str:
    """The folder name of a benchmark under ``cells/`` (``world-c/i2t/fog/5`` → ``world-c__i2t__fog__5``)."""
    return benchmark.replace("/", "__")


def cell_path(out: str | Path, benchmark: str, label: str, seed: int) -> Path:
    """Where a full cell is written: ``<out>/cells/<benchmark>/<label>/seed<k>.json.gz``."""
    return Path(out) / CELLS_DIR / bench_dir(benchmark) / label / f"seed{seed}.json.gz"


def legacy_path(path: str | Path) -> Path:
    """The uncompressed ``seed<k>.json`` of a cell path (itself when it is one)."""
    path = Path(path)
    return path.with_name(path.name[:-3]) if path.name.endswith(".json.gz") else path


def error_path(out: str | Path, benchmark: str, label: str, seed: int) -> Path:
    """Where a failed cell's record (error and traceback, plain JSON) is written."""
    return Path(out) / CELLS_DIR / bench_dir(benchmark) / label / f"seed{seed}.error.json"


def index_path(out: str | Path) -> Path:
    return Path(out) / INDEX_NAME


def _sort_key(key: Key) -> tuple[str, str, str]:
    # the order of the sorted paths cells/<bench>/<label>/seed<k>.json, as readers have always seen them
    return (key[0], key[1], f"seed{key[2]}.json")


def _key_of_record(rec: dict[str, Any]) -> Key:
    return (bench_dir(rec["benchmark"]), rec.get("label") or rec["config"]["method"], int(rec["config"]["seed"]))


def _key_of_path(path: Path) -> Key | None:
    m = _CELL_NAME.fullmatch(path.name)
    return (path.parent.parent.name, path.parent.name, int(m.group(1))) if m else None


def _path_of_key(out: Path, key: Key) -> Path:
    return out / CELLS_DIR / key[0] / key[1] / f"seed{key[2]}.json.gz"


# ------------------------------------------------------------------------------- full cells

def write_json_gz(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, gzip-compressed (no name or time in the header: same data, same
    bytes), written atomically."""
    data = json.dumps(obj, indent=1, default=str).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    return Path(path)


def write_cell_at(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a full cell at ``path`` (a ``.json`` path is written as its ``.json.gz``); a legacy
    uncompressed file of the same cell is removed once the compressed one is in place."""
    path = Path(path)
    gz = path if path.name.endswith(".json.gz") else path.with_name(path.name + ".gz")
    write_json_gz(gz, payload)
    legacy_path(gz).unlink(missing_ok=True)
    return gz


def write_cell(out: str | Path, benchmark: str, label: str, seed: int, payload: dict[str, Any]) -> Path:
    """Write a finished cell's full record (atomically, compressed); returns its path."""
    return write_cell_at(cell_path(out, benchmark, label, seed), payload)


def read_cell(path: str | Path) -> dict[str, Any]:
    """One full cell file: ``seed<k>.json.gz`` or a legacy ``seed<k>.json`` (told apart by content,
    so either name works); given one that does not exist, its other form is read.  Raises OSError
    (missing) or ValueError (half-written, not JSON, not an object)."""
    path = Path(path)
    if not path.is_file():
        other = legacy_path(path) if path.name.endswith(".gz") else path.with_name(path.name + ".gz")
        if other.is_file():
            path = other
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip: {e}") from e
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a cell must be a JSON object")
    return obj


def _full_cell_files(out: Path) -> dict[Key, Path]:
    """Every full cell file under ``cells/`` by key; the compressed form wins over a legacy one."""
    root = out / CELLS_DIR
    found: dict[Key, Path] = {}
    if not root.is_dir():
        return found
    for pattern in ("*/*/seed*.json", "*/*/seed*.json.gz"):  # .gz second: it wins
        for p in root.glob(pattern):
            key = _key_of_path(p)
            if key is not None:
                found[key] = p
    return found


def _read_finished(path: Path) -> dict[str, Any] | None:
    try:
        rec = read_cell(path)
    except (OSError, ValueError):
        return None
    return rec if "metrics" in rec else None


# ------------------------------------------------------------------------------------ index

def to_index_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A cell's index line: its record without ``batches`` (and ``_source``), plus ``trace``."""
    out = {k: v for k, v in rec.items() if k not in ("batches", "_source", "trace")}
    batches = rec.get("batches") or []
    runs: list[list[Any]] = []
    for b in batches:
        d = b.get("domain")
        if runs and runs[-1][0] == d:
            runs[-1][1] += 1
        else:
            runs.append([d, 1])
    out["trace"] = {"R@1": [b.get("R@1") for b in batches], "domain": runs}
    return out


def from_index_record(line: dict[str, Any]) -> dict[str, Any]:
    """A record from an index line: ``batches`` rebuilt from the trace, marked ``"_source": "index"``."""
    rec = {k: copy.deepcopy(v) for k, v in line.items() if k != "trace"}  # lines may be cached: never shared
    trace = line.get("trace") or {}
    domains = [d for d, n in trace.get("domain", []) for _ in range(n)]
    rec["batches"] = [{"domain": d, "R@1": r} for d, r in zip(domains, trace.get("R@1", []))]
    rec["_source"] = INDEX_SOURCE
    return rec


_INDEX_CACHE: dict[str, tuple[tuple[int, int], dict[Key, dict[str, Any]]]] = {}


def read_index(out: str | Path) -> dict[Key, dict[str, Any]]:
    """The index lines of a grid folder by key (empty when it has none); cached while the file is
    unchanged.  Unreadable lines (e.g. a merge conflict) are skipped."""
    p = index_path(out)
    try:
        st = p.stat()
    except OSError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _INDEX_CACHE.get(str(p.resolve()))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    entries: dict[Key, dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
            entries[_key_of_record(rec)] = rec
        except (ValueError, KeyError, TypeError):
            continue
    _INDEX_CACHE[str(p.resolve())] = (stamp, entries)
    return entries


def write_index(out: str | Path, records: Iterable[dict[str, Any]] = ()) -> Path:
    """Rebuild ``<out>/cells.jsonl``: every finished full cell under ``cells/``, plus the index's own
    lines for cells not there (or not readable there), plus ``records`` (full or index-form records
    of cells with no full file, e.g. restamped ones; they replace those cells' lines).  Sorted by
    (benchmark, label, seed); written atomically."""
    out = Path(out)
    entries = dict(read_index(out))
    for rec in records:
        entries[_key_of_record(rec)] = to_index_record(rec)
    for key, path in _full_cell_files(out).items():
        rec = _read_finished(path)
        if rec is not None:
            entries[key] = to_index_record(rec)
    text = "".join(json.dumps(entries[k], separators=(",", ":"), default=str) + "\n"
                   for k in sorted(entries, key=_sort_key))
    p = write_text_atomic(index_path(out), text)
    _INDEX_CACHE.pop(str(p.resolve()), None)
    return p


# ---------------------------------------------------------------------------------- readers

def has_cells(out: str | Path) -> bool:
    """Whether ``out`` holds grid results (a ``cells/`` folder or an index)."""
    return (Path(out) / CELLS_DIR).is_dir() or index_path(out).is_file()


def iter_cell_files(out: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, record) of every finished cell, sorted by (benchmark, label, seed): the full cell when
    it is readable (its file's path), else the index's (the path its full cell would have)."""
    out = Path(out)
    full = _full_cell_files(out)
    index = read_index(out)
    for key in sorted(set(full) | set(index), key=_sort_key):
        rec = _read_finished(full[key]) if key in full else None
        if rec is not None:
            yield full[key], rec
        elif key in index and "metrics" in index[key]:
            yield _path_of_key(out, key), from_index_record(index[key])


def iter_cells(out: str | Path) -> Iterator[dict[str, Any]]:
    """Every finished cell record of a grid folder (full cells win over the index)."""
    for _, rec in iter_cell_files(out):
        yield rec


def get_cell(path: str | Path) -> dict[str, Any] | None:
    """The finished record of the cell at ``path`` (as :func:`cell_path` names it, ``.json`` or
    ``.json.gz``): its full file when readable and finished, else its line in the grid folder's
    index, else None."""
    path = Path(path)
    rec = _read_finished(path)
    if rec is not None:
        return rec
    key = _key_of_path(path)
    if key is None or path.parent.parent.parent.name != CELLS_DIR:
        return None
    line = read_index(path.parent.parent.parent.parent).get(key)
    return from_index_record(line) if line is not None and "metrics" in line else None


def iter_errors(out: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, record) of every readable ``seed<k>.error.json`` of a grid folder, sorted by path."""
    for p in sorted((Path(out) / CELLS_DIR).glob("*/*/seed*.error.json")):
        try:
            yield p, json.loads(p.read_text())
        except (OSError, ValueError):
            continue
