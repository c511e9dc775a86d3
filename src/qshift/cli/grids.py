"""``qshift bench``, ``report``, ``restamp`` and ``demo``: grids of methods × benchmarks × seeds and their reports."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qshift.cli.common import (AnnotationOpt, DataRootOpt, DatasetOpt, WeightsOpt, app, console, err, error as _error)
from qshift.atomic import prepare_output_dir
from qshift.options import Protocol


def _fmt_cell(v: float | None, best: bool, signed: bool) -> str:
    if v is None:
        return "–"
    text = f"{v:+.1f}" if signed else f"{v:.1f}"
    return f"[bold]{text}[/bold]" if best else text


def _print_tables(tables) -> None:
    """Rich tables of a report: best competitor per column in bold (the oracle is never bolded)."""
    for t in tables:
        cols, rows = (t.columns, t.rows) if getattr(t, "_no_mean", False) else t.with_mean()
        table = Table(title=t.title)
        table.add_column("method")
        for c in cols:
            table.add_column(c.replace("_", " "), justify="right")
        competitors = [k for k in rows if not k.startswith("oracle")]
        for k, vals in rows.items():
            cells = []
            for j, v in enumerate(vals):
                col = [rows[m][j] for m in competitors if rows[m][j] is not None]
                best = v is not None and k in competitors and len(col) > 1 and v == max(col)
                cells.append(_fmt_cell(v, best, "Δ" in cols[j]))
            table.add_row(escape(k), *cells)  # labels like rest[memory] are not Rich markup
        console.print(table)


@app.command("bench")
def bench_cmd(
    grid: Annotated[Optional[Path], typer.Option(help="Grid YAML: methods, benchmarks, seeds, protocol, …")] = None,
    preset: Annotated[Optional[str], typer.Option(help="A built-in grid: world-qs, world-qgs, world-methods, "
                                                       "world-3seeds, world-diverse, rest-ablation, rest-ablation-s5, rest-ablation-extra, "
                                                       "world-readme, demo.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the cells' result JSON (re-run to resume).")] = Path("runs/grid"),
    seeds: Annotated[Optional[str], typer.Option(help="Override the seeds, e.g. 0,1,2.")] = None,
    max_queries: Annotated[Optional[int], typer.Option(min=1, help="Subsample each benchmark's queries.")] = None,
    dry_run: Annotated[bool, typer.Option(help="List the cells and exit.")] = False,
    protocol: Annotated[Optional[list[str]], typer.Option(
        "--protocol", help="Override a protocol knob of every cell: key=value (repeatable; "
                           f"{', '.join(Protocol.names())}). Cells made under another protocol are rerun.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="The grid's backbone, as for `qshift run` (default: "
                                                                 "the grid file's, else world).")] = None,
    weights: WeightsOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: the grid file's, else cpu).")] = None,
    preprocess: Annotated[Optional[str], typer.Option(help="model | tcr (default: the grid file's, else model).")]
    = None,
) -> None:
    """Run a grid of methods × benchmarks × seeds on any backbone; finished cells are skipped, failures recorded."""
    from qshift.bench import grid as G

    if (grid is None) == (preset is None):
        err.print("[red]error:[/red] give exactly one of --grid FILE.yaml or --preset NAME "
                  f"(presets: {', '.join(G.PRESETS)})")
        raise typer.Exit(2)
    try:
        spec, only = G.load_grid(grid) if grid is not None else G.preset(preset)
        if seeds:
            spec.seeds = [int(x) for x in seeds.split(",")]
        if max_queries is not None:
            spec.max_queries = max_queries
        if protocol:
            overrides = {}
            for item in protocol:
                key, sep, value = item.partition("=")
                if not sep or key not in G.PROTOCOL_KEYS:
                    raise ValueError(f"--protocol expects key=value with key one of {', '.join(G.PROTOCOL_KEYS)}; "
                                     f"got {item!r}")
                overrides[key] = Protocol.parse_value(key, value)
            spec.protocol = {**spec.protocol, **overrides}
        backbone = {"model": model, "weights": weights, "dataset": dataset, "device": device, "preprocess": preprocess,
                    "data_root": None if data_root is None else str(data_root),
                    "annotation": None if annotation is None else str(annotation)}
        spec = spec.model_copy(update={k: v for k, v in backbone.items() if v is not None})
        only = G.check_only(only, spec)  # again: --seeds / --model may have changed what it matches
        G.plan(spec, only)  # validates every cell before anything runs
        if not dry_run:
            prepare_output_dir(out)
        if dry_run:
            for bench, m, seed, finished in G.cell_status(spec, out, only):
                typer.echo(f"{'done' if finished else 'todo'}\t{m.key}\t{bench}\tseed{seed}")
            return
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        raise typer.Exit(2)
    t0 = time.time()
    counts = G.run_grid(spec, out, only)
    console.print(f"grid {out}: {counts['done']} run, {counts['skipped']} already finished, "
                  f"{counts['failed']} failed, of {counts['cells']} cells ({(time.time() - t0) / 60:.1f} min). "
                  f"Tables and plots: qshift report {out}")
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="A grid folder written by `qshift bench`, or a folder of "
                                                "`qshift run --out` result files (found by content, any names).")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: FOLDER/report).")] = None,
    readme: Annotated[Optional[Path], typer.Option(help="Also replace the generated grid block of this README.")]
    = None,
    block: Annotated[Optional[str], typer.Option(help="With --readme: the named block to replace (markers "
                                                     "<!-- qshift-grid:NAME:start/end -->), for a README "
                                                     "holding several grids.")] = None,
) -> None:
    """Markdown + CSV tables in the papers' layout and PNG plots (heatmaps, streams, forgetting) from a
    grid's results or a folder of run results."""
    from qshift.bench.report import update_readme, write_report

    try:
        rep = write_report(folder, out)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        raise typer.Exit(2)
    _print_tables(rep["tables"])
    for line in rep["protocol"]:
        console.print(line.replace("**", ""), markup=False, highlight=False)
    if rep["stale"]:
        err.print(f"[yellow]{rep['stale']} cell(s) made with another world model were left out; "
                  f"`qshift bench` reruns them[/yellow]")
    if rep.get("source") == "runs":
        console.print("read run result files (`qshift run --out`); they do not name their backbone, so the tables "
                      "assume one model and data throughout", markup=False, highlight=False)
    console.print(f"report: {rep['report']}\ntables: {len(rep['csv'])} CSV in {rep['report'].parent / 'tables'}\n"
                  f"plots: {len(rep['plots'])} PNG in {rep['report'].parent / 'plots'}")
    if readme is not None:
        command = f"qshift report {folder} --readme {readme}" + (f" --block {block}" if block else "")
        try:
            update_readme(readme, rep["tables"], command, rep["protocol"], block=block)
        except ValueError as e:
            _error(e)
            raise typer.Exit(2)
        console.print(f"updated the grid block{f' {block!r}' if block else ''} of {readme}")


@app.command("restamp")
def restamp_cmd(
    folder: Annotated[Path, typer.Argument(help="A grid folder written by `qshift bench`.")],
    pattern: Annotated[list[str], typer.Option(help="Benchmark name pattern(s) of the cells to restamp, e.g. "
                                                    "'world-c/i2t/*'.")],
    verify: Annotated[int, typer.Option(min=1, help="Stale cells rerun and compared before anything is written.")]
    = 2,
    seed: Annotated[int, typer.Option(help="Seed for choosing the verifying cells.")] = 0,
    from_sha: Annotated[Optional[str], typer.Option(help="Only cells made with weights whose SHA-256 starts "
                                                         "with this (when the folder holds several old models).")]
    = None,
) -> None:
    """Mark cells made with a previous world model as current, after rerunning a sample of them with the
    current model and finding identical results (for model changes that provably cannot affect them)."""
    from qshift.bench.restamp import restamp_cells

    try:
        res = restamp_cells(folder, pattern, verify=verify, seed=seed, from_sha=from_sha, log=console.print)
    except (ValueError, RuntimeError) as e:
        _error(e)
        raise typer.Exit(2)
    if res.get("mismatch"):
        err.print(f"[red]not restamped:[/red] {escape(str(res['mismatch']))} differs with the current model; rerun with `qshift bench`")
        raise typer.Exit(1)
    console.print(f"{res['restamped']} of {res['candidates']} stale cell(s) matching {', '.join(pattern)} restamped "
                  f"(verified by {len(res['verified_by'])} rerun(s))")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the demo's results and report.")] = Path("qshift-demo"),
) -> None:
    """Source, Tent, TCR and REST on a few severe shifts and a short diverse stream (~5 min on 2 cores)."""
    from qshift.bench import grid as G
    from qshift.bench.report import write_report

    spec, only = G.preset("demo")
    cells = G.plan(spec, only)
    console.print(f"[bold]qshift demo[/bold]: {len(spec.methods)} methods ({', '.join(m.key for m in spec.methods)}) "
                  f"on {len(spec.expanded_benchmarks())} benchmarks, {spec.max_queries} queries each, "
                  f"{len(cells)} online runs on the embedded world; results in {out}/")
    t0 = time.time()
    counts = G.run_grid(spec, out, only)
    rep = write_report(out)
    _print_tables(rep["tables"])
    console.print(f"\nfinished in {(time.time() - t0) / 60:.1f} min ({counts['done']} runs, {counts['skipped']} reused, "
                  f"{counts['failed']} failed).")
    console.print(f"Look at: {rep['report']} (tables) and {rep['report'].parent / 'plots'}/ — "
                  "stream_*.png shows online R@1 of each method along the diverse stream (domain boundaries "
                  "dashed), forgetting.png what each method lost on clean queries after it, diagnostics.png how "
                  "the shift moves queries away from the gallery (gap, consistency) at the source model.")
    console.print("Full grid (every method on the 16 severity-5 corruptions and level-6 typos, plus diverse streams): "
                  "qshift bench --preset world-readme --out runs/readme && qshift report runs/readme")
