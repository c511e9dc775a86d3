"""``qshift report DIR``: the papers' tables (Markdown + CSV) and plots from a grid's result files, or
from a folder of ``qshift run --out`` result files.

Tables: rows = methods, columns = the shifts of one family (corruptions at one severity, text
perturbations at one level, QGS domains, …), last column = mean; the best competitor in each column
in bold (the oracle uses labels, so it is listed apart and never bolded).  Plots: each family table as
an annotated heatmap (shifts × methods, coloured by the change against source), online R@1 along each
diverse-shift stream (domain boundaries marked), bars for the diverse streams' tables, forgetting bars,
and the diagnostics panel (clean vs shifted queries at the source model).

This module writes the report; the work is in small modules, re-exported here:
:mod:`~qshift.bench.report_load` (cells from a grid folder or run files),
:mod:`~qshift.bench.report_tables` (the tables), :mod:`~qshift.bench.report_protocol` (the protocol
lines), :mod:`~qshift.bench.report_render` (Markdown and CSV) and :mod:`~qshift.bench.report_plots`.
"""
from __future__ import annotations

import json
from pathlib import Path

from qshift.atomic import write_text_atomic
from qshift.bench.report_load import (Cell, current_model, find_run_files, is_grid_folder, is_run_record,
                                      legacy_lr_default, load_cells, load_errors, load_runs, protocol_deviations,
                                      run_labels, _cell_protocol)
from qshift.bench.report_plots import (plot_bars, plot_diagnostics, plot_forgetting, plot_heatmap, plot_streams,
                                       plot_table, prune_plots)
from qshift.bench.report_protocol import _defaults_line, _n_cells, protocol_notes
from qshift.bench.report_render import _fmt, _slug, table_csv, table_markdown
from qshift.bench.report_tables import (METHOD_ORDER, Table, _diverse_summary, _family, _order, build_summary,
                                        build_tables)

__all__ = ["METHOD_ORDER", "README_END", "README_START", "Cell", "Table", "build_summary", "build_tables",
           "current_model", "find_run_files", "is_grid_folder", "is_run_record", "legacy_lr_default", "load_cells",
           "load_errors", "load_runs", "plot_bars", "plot_diagnostics", "plot_forgetting", "plot_heatmap",
           "plot_streams", "plot_table", "protocol_deviations", "protocol_notes", "prune_plots", "run_labels",
           "readme_markers", "table_csv", "table_markdown", "update_readme", "write_report", "_cell_protocol", "_defaults_line", "_diverse_summary",
           "_family", "_fmt", "_n_cells", "_order", "_slug"]

README_START, README_END = "<!-- qshift-grid:start -->", "<!-- qshift-grid:end -->"


def write_report(out: str | Path, report_dir: str | Path | None = None) -> dict:
    """Write ``report.md``, ``tables/*.csv`` and ``plots/*.png`` for a grid folder (``qshift bench``) or a
    folder of run result files (``qshift run --out``, recognised by content); return their paths.

    The returned dict: ``report`` (the Markdown file), ``tables``, ``csv`` and ``plots`` (paths), ``stale``
    (grid cells left out as made with another model), ``protocol`` (the protocol lines) and ``source``
    (``"grid"`` or ``"runs"``).  Plot files of an earlier report that this one no longer draws are removed."""
    out = Path(out)
    stale: list[Path] = []
    grid = is_grid_folder(out)
    cells = load_cells(out, excluded=stale) if grid else load_runs(out)
    if not cells:
        raise ValueError(f"{out}: no finished cells made with the current world model to report"
                         + (f" ({len(stale)} made with another model: rerun `qshift bench`)" if stale else ""))
    rdir = Path(report_dir) if report_dir is not None else out / "report"
    (rdir / "tables").mkdir(parents=True, exist_ok=True)
    (rdir / "plots").mkdir(parents=True, exist_ok=True)
    tables = build_summary(cells) + build_tables(cells)
    minutes = f"{sum(c.seconds for c in cells) / 60:.1f} min of run time in all"
    what = f"{len(cells)} finished cells; {minutes}" if grid else \
        f"{len(cells)} run result files (`qshift run --out`); {minutes}"
    md = [f"# qshift report: {out}", "",
          f"{what}. Online metrics: every query scored once, when its batch arrived.", ""]
    notes = protocol_notes(cells)
    md += [" ".join(notes), ""]
    if not grid:
        md += ["Run files do not name their backbone: the tables assume every file here ran the same model "
               "and data.", ""]
    if stale:
        md += [f"**{len(stale)} cell(s) made with another world model are left out** (stale; "
               "`qshift bench` reruns them).", ""]
    errors = load_errors(out) if grid else []
    if errors:
        md += [f"**{len(errors)} cell(s) failed** (see `cells/*/*/*.error.json`): "
               + ", ".join(f"{e['label']} on {e['benchmark']}" for e in errors[:10]), ""]
    csvs, pngs = [], []
    for t in tables:
        md += [table_markdown(t), ""]
        p = rdir / "tables" / f"{_slug(t.title)}.csv"
        write_text_atomic(p, table_csv(t))
        csvs.append(p)
        if len(t.columns) > 1 or len(t.rows) > 1:
            pngs.append(plot_table(t, rdir / "plots"))
    pngs += plot_streams(cells, rdir / "plots")
    f = plot_forgetting(cells, rdir / "plots")
    if f:
        pngs.append(f)
    diags = [json.loads(p.read_text()) for p in sorted((out / "diagnostics").glob("*.json"))] \
        if (out / "diagnostics").is_dir() else []
    d = plot_diagnostics(diags, rdir / "plots")
    if d:
        pngs.append(d)
    prune_plots(rdir / "plots", pngs)
    md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in pngs]
    report = rdir / "report.md"
    write_text_atomic(report, "\n".join(md) + "\n")
    return {"report": report, "tables": tables, "csv": csvs, "plots": pngs, "stale": len(stale), "protocol": notes,
            "source": "grid" if grid else "runs"}


def readme_markers(block: str | None = None) -> tuple[str, str]:
    """The start / end markers of a README's generated grid block (``block``: a named one, for a README
    holding several, e.g. ``av`` → ``<!-- qshift-grid:av:start -->``)."""
    if block is None:
        return README_START, README_END
    if not block.replace("-", "").isalnum():
        raise ValueError(f"a grid block name is letters, digits and '-', got {block!r}")
    return f"<!-- qshift-grid:{block}:start -->", f"<!-- qshift-grid:{block}:end -->"


def update_readme(readme: str | Path, tables: list[Table], command: str, notes: list[str] | None = None,
                  block: str | None = None) -> None:
    """Replace the README's generated grid block (between the qshift-grid markers, or those of the named
    ``block``: :func:`readme_markers`) with ``tables`` (preceded by ``notes``, e.g. the protocol lines of
    ``protocol_notes``)."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = readme_markers(block)
    if start not in text or end not in text:
        raise ValueError(f"{readme}: markers {start} … {end} not found")
    body = "\n\n".join(([" ".join(notes)] if notes else []) + [table_markdown(t) for t in tables])
    block_text = f"{start}\n<!-- generated by: {command} (do not edit by hand) -->\n\n{body}\n\n{end}"
    a, b = text.index(start), text.index(end) + len(end)
    write_text_atomic(readme, text[:a] + block_text + text[b:])
