"""The report's plots (PNG): an annotated heatmap per shift-family table (shifts × methods), bars for the
diverse streams' tables, online R@1 along each diverse-shift stream, forgetting bars, and the diagnostics
panel (clean vs shifted queries at the source model).  Legends sit outside the data."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # figures without pyplot: no global backend or figure state

from qshift.atomic import save_figure_atomic
from qshift.bench.registry import describe
from qshift.bench.report_load import Cell
from qshift.bench.report_render import _slug
from qshift.bench.report_tables import Table, _order


#: the report's own plot files: a regenerated report removes those of them it no longer writes
PLOT_PREFIXES = ("heatmap_", "bars_", "stream_")
PLOT_NAMES = ("forgetting.png", "diagnostics.png")
HEATMAP_KINDS = ("family", "summary", "delta")  # tables drawn as heatmaps; diverse-stream tables get bars
_LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0, "frameon": False}


def _line_style(i: int) -> str:
    """Solid for the first ten methods (the default colour cycle), then dashed, dotted, …"""
    return ("-", "--", ":", "-.")[(i // 10) % 4]


def plot_streams(cells: list[Cell], out_dir: Path, window: int = 5) -> list[Path]:
    """Online R@1 along each sequential stream per method (moving average), domain boundaries marked;
    the legend sits to the right of the axes, off the curves."""
    by_bench: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        if describe(c.benchmark)["title"] is None and c.seed == min(x.seed for x in cells if x.benchmark == c.benchmark):
            by_bench[c.benchmark].append(c)
    paths = []
    for bench, group in by_bench.items():
        fig = Figure(figsize=(11 + 1.8 * ((len(group) - 1) // 12), 4.2))
        ax = fig.subplots()
        ref = group[0]
        doms = [b["domain"] for b in ref.batches]
        by_label = {c.label: c for c in group}
        for i, c in enumerate(by_label[k] for k in _order(by_label)):
            r = np.array([b["R@1"] for b in c.batches], dtype=float)
            csum = np.concatenate([[0.0], np.cumsum(r)])
            lo = np.maximum(0, np.arange(len(r)) - window + 1)
            smooth = (csum[1:] - csum[lo]) / (np.arange(len(r)) + 1 - lo)  # trailing mean, partial at the start
            ax.plot(np.arange(len(r)), smooth, label=c.label, lw=1.6, ls=_line_style(i))
        for i in range(1, len(doms)):
            if doms[i] != doms[i - 1]:
                ax.axvline(i - 0.5, color="grey", lw=0.7, ls="--")
        starts = [0] + [i for i in range(1, len(doms)) if doms[i] != doms[i - 1]]
        for j, s in enumerate(starts):
            end = starts[j + 1] if j + 1 < len(starts) else len(doms)
            ax.text((s + end) / 2, 1.01, doms[s].replace("_", " "), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, rotation=30)
        ax.set_xlim(-0.5, max(len(doms), 1) - 0.5)
        ax.set_xlabel("batch along the stream")
        ax.set_ylabel(f"online R@1 (%, trailing mean of {window} batches)")
        ax.set_title(f"{bench}: online R@1 along the stream", pad=48)
        ax.legend(fontsize=8, title="method", title_fontsize=8, ncol=1 + (len(by_label) - 1) // 12, **_LEGEND_OUTSIDE)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"stream_{bench.replace('/', '__')}.png"
        save_figure_atomic(fig, p, dpi=120)
        paths.append(p)
    return paths


def _rotate(labels: list[str], limit: int = 8) -> dict:
    """Tick label options: slanted when any label is long enough to run into its neighbour."""
    return {"rotation": 30, "ha": "right", "rotation_mode": "anchor"} if max(map(len, labels), default=0) > limit \
        else {}


def plot_bars(t: Table, out_dir: Path) -> Path:
    """Grouped bars: one group per column, one bar per method (the legend to the right, off the bars)."""
    cols, rows = t.shown()
    labels = list(rows)
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(min(12.0, max(6.0, 0.25 * len(cols) * max(1, len(labels)) + 3)), 4.2))
    ax = fig.subplots()
    for i, k in enumerate(labels):
        vals = [np.nan if v is None else v for v in rows[k]]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=k)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace("_", " ") for c in cols], fontsize=8, **_rotate(cols))
    ax.set_ylabel(t.metric + (" / Δ R@1" if any("Δ" in c for c in cols) else " (%)"))
    ax.set_title(t.title, fontsize=10)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7, ncol=1 + len(labels) // 16, **_LEGEND_OUTSIDE)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out_dir / f"bars_{_slug(t.title)}.png"
    save_figure_atomic(fig, p, dpi=120)
    return p


def _heatmap_values(t: Table) -> tuple[list[str], list[str], np.ndarray]:
    """(row names = the table's columns, column names = its methods, values[row, method]; NaN where missing)."""
    cols, rows = t.shown()
    methods = list(rows)
    values = np.array([[np.nan if rows[m][i] is None else rows[m][i] for m in methods] for i in range(len(cols))],
                      dtype=float).reshape(len(cols), len(methods))
    return cols, methods, values


def _wrap_title(title: str, width: int = 70) -> str:
    words, lines, line = title.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def _seeds_caption(t: Table) -> str:
    """How many seeds a table's values average ("up to" when some cells have fewer)."""
    if t.kind == "delta" or t.seeds <= 1:
        return "" if t.kind == "delta" else ", one seed"
    partial = any(v is not None and (j >= len(t.spread.get(k, [])) or t.spread[k][j] is None)
                  for k, vals in t.rows.items() for j, v in enumerate(vals))
    return f", mean over {'up to ' if partial else ''}{t.seeds} seeds"


def plot_heatmap(t: Table, out_dir: Path) -> Path:
    """The table as an annotated heatmap for a paper: rows = its shifts (corruptions, perturbations,
    domains or, for a summary, the shift families; ``mean`` last, set apart), columns = methods — or the
    other way round when there are many more methods than shifts (an ablation), so the figure stays
    compact.

    Each cell shows the metric (mean over seeds).  Its colour is the change against ``source`` in a
    diverging map (blue = better than the source model, red = worse, white = equal) when the table has
    a ``source`` row to compare with, the value itself in a sequential map otherwise; a change table
    (``kind == "delta"``) is coloured by its own values.  The best competitor of each shift is in bold
    (the oracle, which uses labels, is never bolded)."""
    names, methods, values = _heatmap_values(t)  # values[shift, method]
    competitors = [j for j, m in enumerate(methods) if not m.startswith("oracle")]
    signed = t.kind == "delta"
    if signed:
        colour, cmap, label = values, "RdBu", f"change against source ({t.metric} points)"
    elif "source" in methods and len(methods) > 1:
        colour, cmap, label = values - values[:, [methods.index("source")]], "RdBu", \
            f"colour: change against source ({t.metric} points)"
    else:
        colour, cmap, label = values, "viridis", f"{t.metric} (%)"
    n_shifts, n_methods = values.shape
    flip = n_methods > max(12, 2 * n_shifts)  # methods down the side
    shown = colour.T if flip else colour
    n_rows, n_cols = shown.shape
    row_names = methods if flip else [n.replace("_", " ") for n in names]
    col_names = [n.replace("_", " ") for n in names] if flip else methods
    longest = max(map(len, row_names), default=4)
    fig = Figure(figsize=(1.0 + 0.075 * longest + 0.62 * n_cols + 1.1, 1.6 + 0.3 * n_rows))
    ax = fig.subplots()
    ax.set_facecolor("0.88")  # missing cells
    finite = colour[np.isfinite(colour)]
    if cmap == "RdBu":
        lim = max(1.0, float(np.max(np.abs(finite))) if finite.size else 1.0)
        vmin, vmax = -lim, lim
    else:
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1.0
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    norm, cm = im.norm, im.get_cmap()
    for i in range(n_shifts):
        comp = [values[i, j] for j in competitors if np.isfinite(values[i, j])]
        best = max(comp) if len(comp) > 1 else None
        for j in range(n_methods):
            x, y = (i, j) if flip else (j, i)
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(x, y, "–", ha="center", va="center", fontsize=7.5, color="0.3")
                continue
            r, g, b, _ = cm(norm(colour[i, j])) if np.isfinite(colour[i, j]) else (0.88, 0.88, 0.88, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(x, y, f"{v:+.1f}" if signed else f"{v:.1f}", ha="center", va="center", fontsize=7.5,
                    color="white" if dark else "black",
                    fontweight="bold" if best is not None and j in competitors and v == best else "normal")
    ax.set_xticks(np.arange(n_cols))
    ax.set_xticklabels([f"{m}\n(uses labels)" if m.startswith("oracle") else m for m in col_names], fontsize=8,
                       **_rotate(col_names))
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels([f"{m} (uses labels)" if m.startswith("oracle") else m for m in row_names], fontsize=8)
    ax.tick_params(length=0)
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=0.8)
    ax.tick_params(which="minor", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if names and names[-1] == "mean" and n_shifts > 1:
        (ax.axvline if flip else ax.axhline)(n_shifts - 1.5, color="black", lw=1.2)
    where = "column" if flip else "row"
    ax.set_title(f"{_wrap_title(t.title)}\n(cells: {'Δ ' if signed else ''}{t.metric}{_seeds_caption(t)}; "
                 f"bold: best competitor in the {where})", fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, aspect=max(8, 2.5 * n_rows))
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    p = out_dir / f"heatmap_{_slug(t.title)}.png"
    save_figure_atomic(fig, p, dpi=200)
    return p


def plot_table(t: Table, out_dir: Path) -> Path:
    """A table's plot: a heatmap (:func:`plot_heatmap`) for the shift families and summaries, grouped bars
    for a diverse stream's columns (online R@1 and forgetting, not on one colour scale)."""
    return plot_heatmap(t, out_dir) if t.kind in HEATMAP_KINDS else plot_bars(t, out_dir)


def plot_forgetting(cells: list[Cell], out_dir: Path) -> Path | None:
    """Change in clean and first-domain R@1 after each sequential stream, per method (legend outside)."""
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c.forgetting:
            rows[c.label]["clean"].append(c.forgetting["clean_delta_R@1"])
            rows[c.label]["first"].append(c.forgetting["first_domain_delta_R@1"])
    if not rows:
        return None
    labels = _order(rows)
    x = np.arange(len(labels))
    fig = Figure(figsize=(min(12.0, max(5.0, 0.7 * len(labels) + 4)), 4))
    ax = fig.subplots()
    for off, key, name in ((-0.2, "clean", "clean test queries"), (0.2, "first", "first domain's queries")):
        means = [np.mean(rows[k][key]) for k in labels]
        sds = [np.std(rows[k][key]) if len(rows[k][key]) > 1 else 0 for k in labels]
        ax.bar(x + off, means, 0.4, yerr=sds, label=f"Δ R@1 on {name}", capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8, **_rotate(labels))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("R@1 after the stream − source model R@1")
    ax.set_title("Forgetting after the diverse-shift streams\n(mean over streams; error bars: std)", fontsize=10)
    ax.legend(fontsize=8, **_LEGEND_OUTSIDE)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out_dir / "forgetting.png"
    save_figure_atomic(fig, p, dpi=120)
    return p


def prune_plots(out_dir: Path, keep: list[Path]) -> list[Path]:
    """Remove the report's own plot files in ``out_dir`` (by :data:`PLOT_PREFIXES` / :data:`PLOT_NAMES`) that
    are not in ``keep`` — those of an earlier report that this one no longer draws; return them."""
    kept = {Path(p).name for p in keep}
    gone = []
    for p in sorted(Path(out_dir).glob("*.png")):
        ours = p.name.startswith(PLOT_PREFIXES) or p.name in PLOT_NAMES
        if ours and p.name not in kept:
            p.unlink()
            gone.append(p)
    return gone


def plot_diagnostics(diags: list[dict], out_dir: Path) -> Path | None:
    """Uniformity, query–gallery gap, consistency and REST's gradient angle: clean vs shifted."""
    if not diags:
        return None
    keys = [("uniformity", "query spread: mean ‖q − mean q‖ (higher = more uniform)"),
            ("gap", "query–gallery gap ‖mean q − mean g‖"), ("consistency", "query–gallery mutual-NN rate"),
            ("angle_deg", "angle(g_spec, g_gen) at the source model (°)")]
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 4)
    names = [describe(d["benchmark"]).get("column") or d["benchmark"] for d in diags]
    x = np.arange(len(diags))
    for ax, (k, title) in zip(axes, keys):
        clean = [d["diagnostics"].get("clean", {}).get(k, np.nan) for d in diags]
        shifted = [np.nanmean([v.get(k, np.nan) for dom, v in d["diagnostics"].items() if dom != "clean"]) for d in diags]
        ax.bar(x - 0.2, clean, 0.4, label="clean queries")
        ax.bar(x + 0.2, shifted, 0.4, label="shifted queries")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if k == "angle_deg":
            ax.axhline(90, color="grey", ls="--", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2)  # outside the panels: bars stay visible
    fig.suptitle("Diagnostics at the source model: clean vs shifted queries of the same items")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    p = out_dir / "diagnostics.png"
    save_figure_atomic(fig, p, dpi=120)
    return p
