"""Compare two grid folders cell for cell, e.g. the same methods under two learning rates.

    python benchmarks/compare_grids.py results/methods-grid results/candidates/oracle_lr1e-3/methods-table

Only (method, benchmark, seed) cells present in both folders are compared, and only when both scored the
same number of queries (a stream subsampled in one folder and whole in the other is skipped and counted):
the means below are over the same cells on both sides. Per method and family it prints online R@1 in A, in
B and the change; for diverse streams also the change in clean R@1 after the stream (forgetting). Each
folder's protocol (``qshift report``'s lines) is printed first, so the difference being compared is on
the page.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from qshift.bench import store
from qshift.bench.report import Cell, _family, _order, load_cells, protocol_notes


def _key(c: Cell, by: str) -> str:
    return c.method if by == "method" else c.label


def _index(cells: list[Cell], by: str, name: str) -> dict[tuple[str, str, int], Cell]:
    out: dict[tuple[str, str, int], Cell] = {}
    for c in cells:
        k = (_key(c, by), c.benchmark, c.seed)
        if k in out:
            raise SystemExit(f"{name}: labels {out[k].label!r} and {c.label!r} are both method {k[0]!r} on "
                             f"{c.benchmark} seed {c.seed}; compare with --by label")
        out[k] = c
    return out


def _group(bench: str) -> str:
    fam = _family(bench)
    if fam is not None:
        return fam[0].split(" (")[0]
    return "/".join(bench.split("/")[:3])  # a stream: world-diverse/i2t/mix8


def compare(a: Path, b: Path, by: str = "method", metric: str = "R@1") -> dict:
    """Matched cells of two grid folders, summarised per method and family (see the module docstring)."""
    ia, ib = _index(load_cells(a), by, str(a)), _index(load_cells(b), by, str(b))
    rows: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    skipped = []
    for k in sorted(set(ia) & set(ib)):
        ca, cb = ia[k], ib[k]
        na, nb = ca.protocol.get("n_queries"), cb.protocol.get("n_queries")
        if na != nb:
            skipped.append(f"{k[0]} on {k[1]} seed {k[2]}: {na} vs {nb} queries")
            continue
        r = rows[(k[0], _group(k[1]))]
        r["a"].append(ca.metrics[metric])
        r["b"].append(cb.metrics[metric])
        fk = f"clean_delta_{metric}"
        if ca.forgetting and cb.forgetting and fk in ca.forgetting and fk in cb.forgetting:
            r["fa"].append(ca.forgetting[fk])
            r["fb"].append(cb.forgetting[fk])
    return {"rows": rows, "skipped": skipped, "only_a": len(set(ia) - set(ib)), "only_b": len(set(ib) - set(ia)),
            "protocol_a": protocol_notes(list(ia.values())), "protocol_b": protocol_notes(list(ib.values()))}


def to_markdown(res: dict, a: str, b: str, metric: str = "R@1") -> str:
    lines = [f"A = {a}: " + " ".join(res["protocol_a"]).replace("**", ""),
             f"B = {b}: " + " ".join(res["protocol_b"]).replace("**", ""), "",
             f"| method | family | cells | {metric} A | {metric} B | B − A | Δclean A | Δclean B |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    methods = _order({m for m, _ in res["rows"]})
    for m in methods:
        for (mm, fam), r in sorted(res["rows"].items(), key=lambda kv: kv[0][1]):
            if mm != m:
                continue
            va, vb = float(np.mean(r["a"])), float(np.mean(r["b"]))
            fa = f"{np.mean(r['fa']):+.1f}" if r["fa"] else ""
            fb = f"{np.mean(r['fb']):+.1f}" if r["fb"] else ""
            lines.append(f"| {m} | {fam} | {len(r['a'])} | {va:.1f} | {vb:.1f} | {vb - va:+.1f} | {fa} | {fb} |")
    lines.append("")
    lines.append(f"{sum(len(r['a']) for r in res['rows'].values())} matched cells; {res['only_a']} only in A, "
                 f"{res['only_b']} only in B; {len(res['skipped'])} skipped for a different query count"
                 + (": " + "; ".join(res["skipped"][:5]) if res["skipped"] else "") + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--by", choices=["method", "label"], default="method",
                    help="match cells by method name (default; labels may carry a suffix such as -lr1e-3) or label")
    ap.add_argument("--metric", default="R@1")
    ap.add_argument("--json", type=Path, help="also write the matched means here")
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not store.has_cells(p):
            raise SystemExit(f"{p}: not a grid folder (no cells/); run `qshift bench --out {p}` first")
    res = compare(args.a, args.b, args.by, args.metric)
    print(to_markdown(res, str(args.a), str(args.b), args.metric))
    if args.json:
        from qshift.atomic import write_text_atomic

        payload = {"a": str(args.a), "b": str(args.b), "metric": args.metric, "skipped": res["skipped"],
                   "rows": [{"method": m, "family": f, "cells": len(r["a"]), "a": float(np.mean(r["a"])),
                             "b": float(np.mean(r["b"])),
                             "clean_delta_a": float(np.mean(r["fa"])) if r["fa"] else None,
                             "clean_delta_b": float(np.mean(r["fb"])) if r["fb"] else None}
                            for (m, f), r in sorted(res["rows"].items())]}
        write_text_atomic(args.json, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
