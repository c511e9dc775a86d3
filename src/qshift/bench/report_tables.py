"""The report's tables, built from cells: one per shift family, one per diverse-shift stream, and the
summary of family means (with its change against ``source``).

A :class:`Table` has rows = method labels, columns = the shifts of one family (or the families, for the
summary), values = the metric's mean over seeds, and the std over seeds where there are several.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from qshift.bench.registry import describe
from qshift.bench.report_load import Cell

METHOD_ORDER = ("source", "tent", "eta", "eata", "sar", "shot-im", "read", "deyo", "tcr", "rest", "oracle")

#: what a table holds: one shift family's shifts, the family means, their change against source, or a
#: diverse stream's online and forgetting columns (the last three have no mean column)
TABLE_KINDS = ("family", "summary", "delta", "diverse")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: dict[str, list[float | None]]  # method label -> value per column (mean over seeds)
    spread: dict[str, list[float | None]] = field(default_factory=dict)  # std over seeds (if > 1 seed)
    seeds: int = 1
    metric: str = "R@1"
    kind: str = "family"  # one of TABLE_KINDS

    @property
    def _no_mean(self) -> bool:
        """Whether the table is shown without a mean column (every kind but ``family``)."""
        return self.kind != "family"

    def with_mean(self) -> tuple[list[str], dict[str, list[float | None]]]:
        """Columns and rows with a last ``mean`` column (when there is more than one column); a row's
        mean is None unless it has every column."""
        cols = self.columns + (["mean"] if len(self.columns) > 1 else [])
        rows = {}
        for k, vals in self.rows.items():
            full = [v for v in vals if v is not None]
            mean = sum(full) / len(full) if len(full) == len(vals) and full else None
            rows[k] = vals + ([mean] if len(self.columns) > 1 else [])
        return cols, rows

    def shown(self) -> tuple[list[str], dict[str, list[float | None]]]:
        """The columns and rows as the report shows them: :meth:`with_mean` for a family table, as they
        are for the others."""
        return (self.columns, self.rows) if self._no_mean else self.with_mean()


def _order(labels: Iterable[str]) -> list[str]:
    """Method labels in the papers' order (``METHOD_ORDER`` by base method, then by label)."""
    def key(lbl):
        # a label is its method's name, maybe with a suffix: "rest[lambda_a=1]", "tcr-lr1e-3"
        base = max((m for m in METHOD_ORDER if lbl == m or (lbl.startswith(m) and not lbl[len(m)].isalnum())),
                   key=len, default=None)
        return (METHOD_ORDER.index(base) if base is not None else len(METHOD_ORDER), lbl)
    return sorted(labels, key=key)


def _family(bench: str) -> tuple[str, str] | None:
    """(table title, column name) of a benchmark (from its registered family), or None for a stream."""
    d = describe(bench)
    return None if d["title"] is None else (d["title"], d["column"])


def build_tables(cells: list[Cell], metric: str = "R@1") -> list[Table]:
    """One table per shift family; diverse streams get online R@1 and forgetting columns."""
    groups: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    col_order: dict[str, list[str]] = defaultdict(list)
    diverse: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for c in cells:
        fam = _family(c.benchmark)
        if fam is not None:
            title, col = fam
            groups[title][c.label][col].append(c.metrics[metric])
            if col not in col_order[title]:
                col_order[title].append(col)
            continue
        d = describe(c.benchmark)
        stream = d.get("stream") or c.benchmark
        order = f"order{d.get('order', 0)}"
        title = f"Diverse shift {stream}: online R@1 per domain order, and forgetting"
        diverse[title][c.label][f"{order} online"].append(c.metrics[metric])
        if c.forgetting:
            diverse[title][c.label][f"{order} Δclean"].append(c.forgetting["clean_delta_R@1"])
            diverse[title][c.label][f"{order} Δfirst"].append(c.forgetting["first_domain_delta_R@1"])
        for k in (f"{order} online", f"{order} Δclean", f"{order} Δfirst"):
            if k not in col_order[title]:
                col_order[title].append(k)
    tables = []
    for src in (groups, diverse):
        for title, by_label in src.items():
            cols = col_order[title]
            rows, spread, n_seeds = {}, {}, 1
            for label in _order(by_label):
                vals = by_label[label]
                rows[label] = [float(np.mean(vals[c])) if vals.get(c) else None for c in cols]
                spread[label] = [float(np.std(vals[c])) if len(vals.get(c, [])) > 1 else None for c in cols]
                n_seeds = max(n_seeds, max((len(v) for v in vals.values()), default=1))
            t = Table(title, list(cols), rows, spread, n_seeds, metric)
            if src is diverse:
                t = _diverse_summary(t)
            tables.append(t)
    return tables


def build_summary(cells: list[Cell], metric: str = "R@1") -> list[Table]:
    """The family means side by side (methods × {clean, each shift family}) and their change against
    ``source`` — the clean column's change is how much of a method's gain also appears without shift.

    A family's mean counts for a method and seed only when that seed has every shift of the family (the
    union over methods); with several seeds the table shows mean ± std over seeds of the family mean.
    Empty (no table) when there are fewer than two families."""
    per: dict[str, dict[str, dict[int, dict[str, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    shifts: dict[str, set[str]] = defaultdict(set)
    rank: dict[str, tuple] = {}
    for c in cells:
        d = describe(c.benchmark)
        if d["title"] is None or d.get("summary") is None:
            continue
        name, key = d["summary"], f"{d['title']}/{d['column']}"
        per[name][c.label][c.seed][key] = c.metrics[metric]
        shifts[name].add(key)
        rank[name] = d["summary_rank"]
    if len(per) < 2:
        return []
    order = sorted(per, key=lambda n: (rank[n], n))
    labels = _order({lbl for n in per for lbl in per[n]})
    rows, spread, n_seeds = {}, {}, 1
    for label in labels:
        vals, sds = [], []
        for name in order:
            fam_means = [float(np.mean(list(v.values()))) for v in per[name].get(label, {}).values()
                         if set(v) == shifts[name]]
            n_seeds = max(n_seeds, len(fam_means))
            vals.append(float(np.mean(fam_means)) if fam_means else None)
            sds.append(float(np.std(fam_means)) if len(fam_means) > 1 else None)
        if any(v is not None for v in vals):  # a method with no complete family is left out
            rows[label], spread[label] = vals, sds
    out = [Table(f"Summary: mean {metric} of each shift family", order, rows, spread, n_seeds, metric, kind="summary")]
    if "source" in rows:
        ref = rows["source"]
        delta = {k: [None if v is None or r is None else v - r for v, r in zip(vals, ref)]
                 for k, vals in rows.items() if k != "source"}
        note = "; the clean columns show how much of a gain appears without any shift" \
            if any(n.startswith("clean") for n in order) else ""
        out.append(Table(f"Summary: change against source ({metric} points{note}; means over seeds)",
                         [f"Δ {n}" for n in order], delta, {}, 1, metric, kind="delta"))
    return out


def _diverse_summary(t: Table) -> Table:
    """Average the diverse-stream columns over domain orders: online, Δclean, Δfirst (+ per order online)."""
    orders = sorted({c.split(" ")[0] for c in t.columns})
    cols = [f"{o} online" for o in orders] + ["Δclean R@1 (mean)", "Δfirst-domain R@1 (mean)"]
    rows, spread = {}, {}
    for label, vals in t.rows.items():
        get = dict(zip(t.columns, vals))
        online = [get.get(f"{o} online") for o in orders]
        dc = [get.get(f"{o} Δclean") for o in orders if get.get(f"{o} Δclean") is not None]
        df = [get.get(f"{o} Δfirst") for o in orders if get.get(f"{o} Δfirst") is not None]
        rows[label] = online + [float(np.mean(dc)) if dc else None, float(np.mean(df)) if df else None]
        spread[label] = [None] * len(cols)
    return Table(t.title, cols, rows, spread, t.seeds, t.metric, kind="diverse")
