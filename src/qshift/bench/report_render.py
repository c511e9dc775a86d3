"""The report's tables as text: Markdown (best competitor per column in bold; the oracle, which uses
labels, marked and never bolded) and CSV."""
from __future__ import annotations

import csv
import io
import math

from qshift.bench.report_tables import Table


def _fmt(v: float | None, sd: float | None = None, bold: bool = False, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:+.1f}" if signed else f"{v:.1f}"
    if sd is not None:
        s += f" ± {sd:.1f}"
    return f"**{s}**" if bold else s


def table_markdown(t: Table) -> str:
    """A table as Markdown: its title (with the seeds it averages), one row per method label."""
    cols, rows = t.shown()
    competitors = [k for k in rows if not k.startswith("oracle")]
    best = {}
    for j, c in enumerate(cols):
        vals = [(rows[k][j], k) for k in competitors if rows[k][j] is not None]
        if vals and len(vals) > 1:
            # forgetting columns: closest to zero from above is best, i.e. the largest value
            best[j] = max(vals)[0]
    head = "| method | " + " | ".join(cols) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in cols) + " |"
    partial = any(v is not None and (j >= len(t.spread.get(k, [])) or t.spread[k][j] is None)
                  for k, vals in t.rows.items() for j, v in enumerate(vals))
    suffix = "" if t.seeds <= 1 else (f" (mean ± std over {t.seeds} seeds where ± is shown; other cells: fewer seeds)"
                                      if partial else f" (mean ± std over {t.seeds} seeds)")
    lines = [f"**{t.title}**{suffix}", "", head, sep]
    for k, vals in rows.items():
        sds = t.spread.get(k, [None] * len(vals)) + [None] * (len(vals) - len(t.spread.get(k, [])))
        cells = [_fmt(v, sds[j] if j < len(sds) else None, bold=(k in competitors and j in best and v == best[j]),
                      signed="Δ" in cols[j]) for j, v in enumerate(vals)]
        name = f"{k} *(uses labels)*" if k.startswith("oracle") else k
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_csv(t: Table) -> str:
    """A table as CSV: ``method`` then its columns, values with 4 decimals (empty where missing)."""
    cols, rows = t.shown()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", *cols])
    for k, vals in rows.items():
        w.writerow([k, *("" if v is None else f"{v:.4f}" for v in vals)])
    return buf.getvalue()


def _slug(title: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in title.lower())
    return "_".join(filter(None, keep.split("_")))[:60]
