"""Convert every grid folder under a root (default ``results/``) to the compact layout, in place.

A grid folder is one with a ``grid.json`` (nested ones included).  For each: every legacy
``cells/*/*/seed<k>.json`` is gzip-compressed to ``seed<k>.json.gz`` (its bytes unchanged, so ``zcat``
gives the old file back; the ``.json`` is removed once the ``.gz`` is in place and verified), then
the compact index ``cells.jsonl`` is rebuilt (:mod:`qshift.bench.store`) and checked: every cell
read from the index alone must equal its full cell less the per-batch records the index does not
keep.  ``cells/`` (but its ``*.error.json``) is ignored by git; ``cells.jsonl`` is what a repository
keeps.  Finally lists the largest files left under the root outside ``cells/``.

    python benchmarks/compact_results.py [results] [--dry-run]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from qshift.atomic import atomic_path
from qshift.bench import store


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def grid_folders(root: Path) -> list[Path]:
    """Folders under ``root`` holding a ``grid.json`` (not inside a ``cells/``)."""
    return sorted(p.parent for p in root.rglob("grid.json") if store.CELLS_DIR not in p.relative_to(root).parts)


def compress_legacy(grid: Path, dry_run: bool = False) -> dict[str, int]:
    """gzip every legacy full cell of ``grid`` (bytes kept as they are); returns counts and sizes."""
    stats = {"converted": 0, "unreadable": 0, "bytes_json": 0, "bytes_gz": 0}
    for p in sorted((grid / store.CELLS_DIR).glob("*/*/seed*.json")):
        if p.name.endswith(".error.json"):
            continue
        raw = p.read_bytes()
        try:
            json.loads(raw)
        except ValueError:
            stats["unreadable"] += 1
            print(f"  left as it is (not JSON): {p}", file=sys.stderr)
            continue
        gz = p.with_name(p.name + ".gz")
        stats["bytes_json"] += len(raw)
        if dry_run:
            stats["bytes_gz"] += len(gzip.compress(raw, mtime=0))
            stats["converted"] += 1
            continue
        with atomic_path(gz) as tmp:
            with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
                z.write(raw)
        if gzip.decompress(gz.read_bytes()) != raw:  # never drop a cell whose copy is not exact
            raise RuntimeError(f"{gz}: compressed copy differs from {p}")
        p.unlink()
        stats["bytes_gz"] += gz.stat().st_size
        stats["converted"] += 1
    return stats


def check_index(grid: Path) -> int:
    """Cells whose index line does not give back their full record (less batches beyond domain / R@1)."""
    index = store.read_index(grid)
    bad = 0
    for path, full in store.iter_cell_files(grid):
        if full.get("_source") == store.INDEX_SOURCE:
            continue  # only in the index: nothing to compare with
        key = (path.parent.parent.name, path.parent.name, int(path.name.split(".")[0][4:]))
        line = index.get(key)
        want = {**full, "batches": [{"domain": b.get("domain"), "R@1": b.get("R@1")} for b in full.get("batches", [])],
                "_source": store.INDEX_SOURCE}
        if line is None or store.from_index_record(line) != json.loads(json.dumps(want)):
            bad += 1
            print(f"  index differs from the full cell: {path}", file=sys.stderr)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, nargs="?", default=Path("results"))
    ap.add_argument("--dry-run", action="store_true", help="only measure: write nothing")
    ap.add_argument("--largest", type=int, default=15, help="how many of the largest other files to list")
    args = ap.parse_args()
    grids = grid_folders(args.root)
    if not grids:
        print(f"no grid folders (grid.json) under {args.root}", file=sys.stderr)
        return 2
    failed = 0
    for g in grids:
        s = compress_legacy(g, args.dry_run)
        line = f"{g}: {s['converted']} cell(s) compressed ({_mb(s['bytes_json'])} → {_mb(s['bytes_gz'])})"
        if not args.dry_run:
            store.write_index(g)
            n = len(store.read_index(g))
            bad = check_index(g)
            failed += bad + s["unreadable"]
            line += f"; index {n} cells, {_mb(store.index_path(g).stat().st_size)}" + (f", {bad} MISMATCH" if bad else "")
        print(line)
    others = sorted((p for p in args.root.rglob("*") if p.is_file() and store.CELLS_DIR not in p.relative_to(args.root).parts),
                    key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in others)
    kept = sum(store.index_path(g).stat().st_size for g in grids if store.index_path(g).is_file())
    print(f"\noutside cells/ (what git keeps): {len(others)} files, {_mb(total)} (indexes: {_mb(kept)}); largest:")
    for p in others[: args.largest]:
        print(f"  {p.stat().st_size / 1024:8.0f} KB  {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
