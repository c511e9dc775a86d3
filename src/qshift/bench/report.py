"""``qshift report DIR``: the papers' tables (Markdown + CSV) and plots from a grid's result files.

Tables: rows = methods, columns = the shifts of one family (corruptions at one severity, text
perturbations at one level, QGS domains, …), last column = mean; the best competitor in each column
in bold (the oracle uses labels, so it is listed apart and never bolded).  Plots: online R@1 along
each diverse-shift stream (domain boundaries marked), per-shift bars, forgetting bars, and the
diagnostics panel (clean vs shifted queries at the source model).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qshift.atomic import save_figure_atomic, write_text_atomic
from qshift.bench import store
from qshift.bench.backbone import world_identity
from qshift.bench.grid import GridSpec, backbone_of
from qshift.bench.registry import describe
from qshift.models.world_model import WorldRetrievalModel
from qshift.options import Protocol

METHOD_ORDER = ("source", "tent", "eta", "eata", "sar", "shot-im", "read", "deyo", "tcr", "rest", "oracle")
README_START, README_END = "<!-- qshift-grid:start -->", "<!-- qshift-grid:end -->"


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


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: dict[str, list[float | None]]  # method label -> value per column (mean over seeds)
    spread: dict[str, list[float | None]] = field(default_factory=dict)  # std over seeds (if > 1 seed)
    seeds: int = 1
    metric: str = "R@1"

    def with_mean(self) -> tuple[list[str], dict[str, list[float | None]]]:
        cols = self.columns + (["mean"] if len(self.columns) > 1 else [])
        rows = {}
        for k, vals in self.rows.items():
            full = [v for v in vals if v is not None]
            mean = sum(full) / len(full) if len(full) == len(vals) and full else None
            rows[k] = vals + ([mean] if len(self.columns) > 1 else [])
        return cols, rows


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
            return world_identity(raw.get("weights"))
        return backbone_of(GridSpec(**raw)).identity
    except (FileNotFoundError, ValueError, OSError):
        return None


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
        if model is not None and d.get("model") != model:
            if excluded is not None:
                excluded.append(path)
            continue
        cells.append(Cell(d["benchmark"], d.get("label") or d["config"]["method"], d["config"]["method"],
                          int(d["config"]["seed"]), d["metrics"], d.get("per_domain", {}), d.get("forgetting"),
                          d.get("batches", []), float(d.get("seconds", 0.0)), _cell_protocol(d)))
    return cells


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


def _defaults_line() -> str:
    d = Protocol.defaults()
    return (f"B = {d['batch_size']}, {d['steps']} inner steps, {d['optimizer']} with weight decay {d['weight_decay']:g}, "
            f"scoring `{d['scoring']}`, reset `{d['reset']}`, lr: each backbone's protocol rate")


def _n_cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def protocol_notes(cells: list[Cell]) -> list[str]:
    """Lines saying which protocol the cells ran under, so a table made under another learning rate,
    step count, … (or with cut streams) can never pass for one made under docs/method.md §2."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[tuple(sorted(protocol_deviations(c.protocol).items()))].append(c)
    lines = []
    if set(groups) == {()}:
        rates = sorted({c.protocol.get("lr") for c in cells if c.protocol.get("lr") is not None})
        lr = f" (here lr {', '.join(f'{r:g}' for r in rates)})" if rates else ""
        lines.append(f"Protocol: the defaults in every cell (docs/method.md §2: {_defaults_line()}{lr}).")
    else:
        n_dev = sum(len(v) for k, v in groups.items() if k)
        parts = []
        for dev, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if not dev:
                continue
            labels = _order({c.label for c in group})
            knobs = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in dev)
            parts.append(f"{knobs} ({_n_cells(len(group))}: {', '.join(labels)})")
        lines.append(f"**Protocol differs from the defaults (docs/method.md §2: {_defaults_line()}) in {n_dev} "
                     f"of {len(cells)} cells**: " + "; ".join(parts)
                     + (f". The other {_n_cells(len(groups[()]))} use its defaults." if () in groups else "."))
    cut = defaultdict(int)
    for c in cells:
        m, n = c.protocol.get("max_queries"), c.protocol.get("n_queries")
        # a stream shorter than the cap is scored whole; one at the cap (less rounding over its domains) was cut
        if m is not None and (n is None or n > m - max(len(c.per_domain), 1)):
            cut[m] += 1
    for m, k in sorted(cut.items()):
        lines.append(f"Streams longer than {m:,} queries subsampled to {m:,}, evenly over their domains (a grid "
                     f"setting): {_n_cells(k)}.")
    return lines


def load_errors(out: str | Path) -> list[dict]:
    """The records of a grid folder's failed cells (``cells/*/*/seed<k>.error.json``)."""
    return [d for _, d in store.iter_errors(out)]


def _order(labels) -> list[str]:
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
    summary = Table(f"Summary: mean {metric} of each shift family", order, rows, spread, n_seeds, metric)
    summary._no_mean = True  # type: ignore[attr-defined]
    out = [summary]
    if "source" in rows:
        ref = rows["source"]
        delta = {k: [None if v is None or r is None else v - r for v, r in zip(vals, ref)]
                 for k, vals in rows.items() if k != "source"}
        note = "; the clean columns show how much of a gain appears without any shift" \
            if any(n.startswith("clean") for n in order) else ""
        d = Table(f"Summary: change against source ({metric} points{note}; means over seeds)",
                  [f"Δ {n}" for n in order], delta, {}, 1, metric)
        d._no_mean = True  # type: ignore[attr-defined]
        out.append(d)
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
    out = Table(t.title, cols, rows, spread, t.seeds, t.metric)
    out._no_mean = True  # type: ignore[attr-defined]
    return out


def _fmt(v: float | None, sd: float | None = None, bold: bool = False, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:+.1f}" if signed else f"{v:.1f}"
    if sd is not None:
        s += f" ± {sd:.1f}"
    return f"**{s}**" if bold else s


def table_markdown(t: Table) -> str:
    if getattr(t, "_no_mean", False):
        cols, rows = t.columns, t.rows
    else:
        cols, rows = t.with_mean()
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
    cols, rows = (t.columns, t.rows) if getattr(t, "_no_mean", False) else t.with_mean()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", *cols])
    for k, vals in rows.items():
        w.writerow([k, *("" if v is None else f"{v:.4f}" for v in vals)])
    return buf.getvalue()


def _slug(title: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in title.lower())
    return "_".join(filter(None, keep.split("_")))[:60]


# ---------------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_streams(cells: list[Cell], out_dir: Path, window: int = 5) -> list[Path]:
    """Online R@1 along each sequential stream per method (moving average), domain boundaries marked."""
    plt = _plt()
    by_bench: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        if describe(c.benchmark)["title"] is None and c.seed == min(x.seed for x in cells if x.benchmark == c.benchmark):
            by_bench[c.benchmark].append(c)
    paths = []
    for bench, group in by_bench.items():
        fig, ax = plt.subplots(figsize=(10, 4.2))
        ref = group[0]
        doms = [b["domain"] for b in ref.batches]
        by_label = {c.label: c for c in group}
        for c in (by_label[k] for k in _order(by_label)):
            r = np.array([b["R@1"] for b in c.batches], dtype=float)
            csum = np.concatenate([[0.0], np.cumsum(r)])
            lo = np.maximum(0, np.arange(len(r)) - window + 1)
            smooth = (csum[1:] - csum[lo]) / (np.arange(len(r)) + 1 - lo)  # trailing mean, partial at the start
            ax.plot(np.arange(len(r)), smooth, label=c.label, lw=1.6)
        for i in range(1, len(doms)):
            if doms[i] != doms[i - 1]:
                ax.axvline(i - 0.5, color="grey", lw=0.7, ls="--")
        starts = [0] + [i for i in range(1, len(doms)) if doms[i] != doms[i - 1]]
        for j, s in enumerate(starts):
            end = starts[j + 1] if j + 1 < len(starts) else len(doms)
            ax.text((s + end) / 2, 1.01, doms[s].replace("_", " "), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, rotation=30)
        ax.set_xlabel("batch along the stream")
        ax.set_ylabel(f"online R@1 (%, trailing mean of {window} batches)")
        ax.set_title(f"{bench}: online R@1 along the stream", pad=48)
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"stream_{bench.replace('/', '__')}.png"
        save_figure_atomic(fig, p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_bars(t: Table, out_dir: Path) -> Path:
    """Grouped bars: one group per shift, one bar per method."""
    plt = _plt()
    cols, rows = (t.columns, t.rows) if getattr(t, "_no_mean", False) else t.with_mean()
    labels = list(rows)
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(cols) * max(1, len(labels)) / 3 + 3), 4.2))
    for i, k in enumerate(labels):
        vals = [np.nan if v is None else v for v in rows[k]]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=k)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace("_", " ") for c in cols], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(t.metric + (" / Δ R@1" if any("Δ" in c for c in cols) else " (%)"))
    ax.set_title(t.title)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7, ncol=min(len(labels), 6))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out_dir / f"bars_{_slug(t.title)}.png"
    save_figure_atomic(fig, p, dpi=120)
    plt.close(fig)
    return p


def plot_forgetting(cells: list[Cell], out_dir: Path) -> Path | None:
    """Change in clean and first-domain R@1 after each sequential stream, per method."""
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c.forgetting:
            rows[c.label]["clean"].append(c.forgetting["clean_delta_R@1"])
            rows[c.label]["first"].append(c.forgetting["first_domain_delta_R@1"])
    if not rows:
        return None
    plt = _plt()
    labels = _order(rows)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels) + 2), 4))
    for off, key, name in ((-0.2, "clean", "clean test queries"), (0.2, "first", "first domain's queries")):
        means = [np.mean(rows[k][key]) for k in labels]
        sds = [np.std(rows[k][key]) if len(rows[k][key]) > 1 else 0 for k in labels]
        ax.bar(x + off, means, 0.4, yerr=sds, label=f"Δ R@1 on {name}", capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("R@1 after the stream − source model R@1")
    ax.set_title("Forgetting after the diverse-shift streams\n(mean over streams; error bars: std)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out_dir / "forgetting.png"
    save_figure_atomic(fig, p, dpi=120)
    plt.close(fig)
    return p


def plot_diagnostics(diags: list[dict], out_dir: Path) -> Path | None:
    """Uniformity, query–gallery gap, consistency and REST's gradient angle: clean vs shifted."""
    if not diags:
        return None
    plt = _plt()
    keys = [("uniformity", "query spread: mean ‖q − mean q‖ (higher = more uniform)"),
            ("gap", "query–gallery gap ‖mean q − mean g‖"), ("consistency", "query–gallery mutual-NN rate"),
            ("angle_deg", "angle(g_spec, g_gen) at the source model (°)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
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
    plt.close(fig)
    return p


# --------------------------------------------------------------------------------- report

def write_report(out: str | Path, report_dir: str | Path | None = None) -> dict:
    """Write ``report.md``, ``tables/*.csv`` and ``plots/*.png`` for a grid folder; return their paths."""
    out = Path(out)
    stale: list[Path] = []
    cells = load_cells(out, excluded=stale)
    if not cells:
        raise ValueError(f"{out}: no finished cells made with the current world model to report"
                         + (f" ({len(stale)} made with another model: rerun `qshift bench`)" if stale else ""))
    rdir = Path(report_dir) if report_dir is not None else out / "report"
    (rdir / "tables").mkdir(parents=True, exist_ok=True)
    (rdir / "plots").mkdir(parents=True, exist_ok=True)
    tables = build_summary(cells) + build_tables(cells)
    md = [f"# qshift report: {out}", "",
          f"{len(cells)} finished cells; {sum(c.seconds for c in cells) / 60:.1f} min of run time in all. "
          "Online metrics: every query scored once, when its batch arrived.", ""]
    notes = protocol_notes(cells)
    md += [" ".join(notes), ""]
    if stale:
        md += [f"**{len(stale)} cell(s) made with another world model are left out** (stale; "
               "`qshift bench` reruns them).", ""]
    errors = load_errors(out)
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
            pngs.append(plot_bars(t, rdir / "plots"))
    pngs += plot_streams(cells, rdir / "plots")
    f = plot_forgetting(cells, rdir / "plots")
    if f:
        pngs.append(f)
    diags = [json.loads(p.read_text()) for p in sorted((out / "diagnostics").glob("*.json"))] \
        if (out / "diagnostics").is_dir() else []
    d = plot_diagnostics(diags, rdir / "plots")
    if d:
        pngs.append(d)
    md += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in pngs]
    report = rdir / "report.md"
    write_text_atomic(report, "\n".join(md) + "\n")
    return {"report": report, "tables": tables, "csv": csvs, "plots": pngs, "stale": len(stale), "protocol": notes}


def update_readme(readme: str | Path, tables: list[Table], command: str, notes: list[str] | None = None) -> None:
    """Replace the README's generated grid block (between the qshift-grid markers) with ``tables``
    (preceded by ``notes``, e.g. the protocol lines of ``protocol_notes``)."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: markers {README_START} … {README_END} not found")
    body = "\n\n".join(([" ".join(notes)] if notes else []) + [table_markdown(t) for t in tables])
    block = f"{README_START}\n<!-- generated by: {command} (do not edit by hand) -->\n\n{body}\n\n{README_END}"
    a, b = text.index(README_START), text.index(README_END) + len(README_END)
    write_text_atomic(readme, text[:a] + block + text[b:])
