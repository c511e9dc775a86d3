"""The ``qshift`` command line."""
from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import qshift
from qshift.options import Protocol

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Online test-time adaptation for cross-modal retrieval under query shift.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one error line, never wrapped mid-path


def _error(message: object) -> None:
    """One ``error:`` line on stderr; the message is escaped, so ``rest[lambda_a=1]`` is not read as markup."""
    err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


class Direction(str, Enum):
    i2t = "i2t"
    t2i = "t2i"
    both = "both"


class Split(str, Enum):
    test = "test"
    test1k = "test1k"
    val = "val"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qshift {qshift.__version__}")
        raise typer.Exit()


@app.callback()
def app_options(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """qshift: REST, TCR and test-time adaptation baselines for cross-modal retrieval."""


# options shared by eval / run / diagnose for real backbones and datasets
ModelOpt = Annotated[str, typer.Option("--model", help="world | openclip:ARCH | hf-clip:PATH | hf-blip:PATH | "
                                                       "custom:module:factory")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="A real dataset instead of the world: coco, flickr, cuhk-pedes, "
                                                        "icfg-pedes, nocaps[-in|-near|-out], fashiongen; benchmarks then "
                                                        "read coco/i2t, coco-c/i2t/fog/5, …")]
DataRootOpt = Annotated[Optional[Path], typer.Option(help="Folder with the dataset's images and annotation.")]
AnnotationOpt = Annotated[Optional[Path], typer.Option(help="Annotation file (default: the usual name in --data-root).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
PreprocessOpt = Annotated[str, typer.Option(help="Image preprocessing of real backbones: model | tcr.")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Weights: a world-model file, or a real backbone's tag / "
                                                        "checkpoint (default: the shipped world model).")]


@app.command("eval")
def eval_cmd(
    direction: Annotated[Direction, typer.Option(help="Retrieval direction(s) to report.")] = Direction.both,
    split: Annotated[Split, typer.Option(help="Embedded world split: test (2,000 images), test1k or val.")] = Split.test,
    weights: WeightsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Encoding batch size.")] = 256,
    benchmark: Annotated[Optional[list[str]], typer.Option(
        "--benchmark", "-b", help="A registered benchmark (repeatable; `qshift shifts list`). "
                                  "Without it: the clean split, in --direction.")] = None,
    shift_seed: Annotated[int, typer.Option(help="Seed of the corruptions / perturbations.")] = 0,
    model: ModelOpt = "world",
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
) -> None:
    """Evaluate the source model (no adaptation): the clean embedded test set, or named benchmarks."""
    from qshift.bench.evaluate import evaluate_task, evaluate_world_split
    from qshift.bench.registry import build_benchmark
    from qshift.data.world import load_split
    from qshift.models.world_model import load_world_model

    t0 = time.time()
    if model != "world" or dataset is not None:
        if not benchmark:
            err.print("[red]error:[/red] a real backbone or dataset needs --benchmark (e.g. coco/i2t, coco-c/i2t/fog/5)")
            raise typer.Exit(2)
        rows = []
        for name in benchmark:
            try:
                task, rmodel = _task_and_model(name, model, weights, dataset, data_root, annotation, device,
                                               preprocess, shift_seed, not as_json)
                row, _ = evaluate_task(rmodel, task, batch_size=batch_size, progress=not as_json)
            except (ValueError, FileNotFoundError, TypeError) as e:
                _error(e)
                raise typer.Exit(2)
            rows.append(row)
            if as_json:
                typer.echo(json.dumps(row.as_json()))
        if not as_json:
            _print_rows(rows, f"Source model {model} (no adaptation)", t0)
        return
    try:
        world_model = load_world_model(weights)
    except FileNotFoundError as e:
        _error(e)
        raise typer.Exit(2)
    if benchmark:
        rows = []
        for name in benchmark:
            try:
                task = build_benchmark(name, shift_seed=shift_seed, progress=not as_json)
            except ValueError as e:
                _error(e)
                raise typer.Exit(2)
            row, per_domain = evaluate_task(world_model, task, batch_size=batch_size, progress=not as_json)
            rows.append(row)
            if as_json:
                typer.echo(json.dumps(row.as_json()))
        if not as_json:
            _print_rows(rows, "Source model (no adaptation) on named benchmarks", t0)
        return
    data = load_split(split.value)
    dirs = ("i2t", "t2i") if direction is Direction.both else (direction.value,)
    rows = evaluate_world_split(world_model, data, dirs, benchmark=f"world-clean/{split.value}", batch_size=batch_size,
                                progress=not as_json)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r.as_json()))
        return
    _print_rows(rows, f"Source model, clean embedded world ({split.value}: {len(data)} images, "
                      f"{len(data.captions)} captions)", t0)


def _print_rows(rows, title: str, t0: float) -> None:
    table = Table(title=title)
    for col in ("benchmark", "direction", "R@1", "R@5", "R@10", "mAP", "queries", "gallery"):
        table.add_column(col, justify="right" if col not in ("benchmark", "direction") else "left")
    for r in rows:
        m = r.metrics
        table.add_row(r.benchmark, r.direction, f"{m['R@1']:.1f}", f"{m['R@5']:.1f}", f"{m['R@10']:.1f}",
                      f"{m['mAP']:.1f}", str(r.n_queries), str(r.n_gallery))
    console.print(table)
    console.print(f"[dim]{time.time() - t0:.1f}s · recalls and mAP in percent · any-positive Recall@K[/dim]")


def _task_and_model(benchmark: str, model_spec: str, weights: Optional[Path], dataset: Optional[str],
                    data_root: Optional[Path], annotation: Optional[Path], device: str, preprocess: str,
                    shift_seed: int, progress: bool):
    """Resolve (task, RetrievalModel) for the embedded world or a real dataset + backbone."""
    from qshift.api import load_model

    from qshift.bench.registry import build_benchmark

    ds = None
    if dataset is not None:
        from qshift.data.retrieval_datasets import load_dataset

        if data_root is None:
            raise ValueError("--dataset needs --data-root (the folder holding the images and the annotation file)")
        ds = load_dataset(dataset, data_root, annotation)
    task = build_benchmark(benchmark, shift_seed=shift_seed, progress=progress, dataset=ds)
    if model_spec == "world" and dataset is not None:
        raise ValueError("the embedded world model cannot read real datasets; pass --model openclip:ARCH, "
                         "hf-clip:PATH, hf-blip:PATH or custom:module:factory")
    model = load_model(model_spec, task.direction, weights, preprocess=preprocess, device=device)
    return task, model


@app.command("run")
def run_cmd(
    method: Annotated[str, typer.Option(help="Method name (source, tent, tcr, rest, oracle, …).")],
    benchmark: Annotated[str, typer.Option(help="A registered benchmark (`qshift shifts list`).")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a protocol knob or method option: key=value (repeatable). Protocol keys: "
                      "batch_size, steps, lr, weight_decay, scoring, reset, seed; anything else goes to the method.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line instead of a table.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the run's result JSON.")] = None,
    weights: WeightsOpt = None,
    shift_seed: Annotated[int, typer.Option(help="Seed of the corruptions / perturbations.")] = 0,
    model: ModelOpt = "world",
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
) -> None:
    """Run one method online over one benchmark stream and report online R@1/5/10 and mAP."""
    from qshift.engine import parse_settings, run_online

    try:
        cfg = parse_settings(method, set_ or [])
    except ValueError as e:
        _error(e)
        raise typer.Exit(2)
    try:
        task, rmodel = _task_and_model(benchmark, model, Path(weights) if weights and model == "world" else weights,
                                       dataset, data_root, annotation, device, preprocess, shift_seed, not as_json)
        result = run_online(rmodel, task, cfg, progress=not as_json)
    except (ValueError, FileNotFoundError, TypeError) as e:
        _error(e)
        raise typer.Exit(2)
    if out is not None:
        name = f"{benchmark.replace('/', '__')}__{method}__seed{cfg.seed}.json"
        path = result.save(out / name)
        if not as_json:
            console.print(f"result: {path}")
    row = {"benchmark": benchmark, "direction": task.direction, "method": method, "model": model,
           "metrics": {k: round(result.metrics[k], 4) for k in ("R@1", "R@5", "R@10", "mAP")},
           "n_queries": result.n_queries, "n_gallery": result.n_gallery}
    if result.forgetting is not None:
        row["forgetting"] = {"clean_delta_R@1": round(result.forgetting["clean_delta_R@1"], 4),
                             "first_domain_delta_R@1": round(result.forgetting["first_domain_delta_R@1"], 4)}
    if as_json:
        typer.echo(json.dumps(row))
        return
    table = Table(title=f"{method} on {benchmark} (online, {result.seconds:.0f}s)")
    for col in ("domain", "R@1", "R@5", "R@10", "mAP"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for dom, m in list(result.per_domain.items()) + [("all", result.metrics)]:
        table.add_row(dom, *(f"{m[k]:.1f}" for k in ("R@1", "R@5", "R@10", "mAP")))
    console.print(table)
    c = result.config
    console.print(f"protocol: B = {c['batch_size']}, {c['steps']} inner steps, {c['optimizer']} lr {c['lr']:g}, weight decay "
                  f"{c['weight_decay']:g}, scoring {c['scoring']}, reset {c['reset']}, query order seed {c['seed']}",
                  markup=False, highlight=False)
    if result.forgetting is not None:
        f = result.forgetting
        console.print(f"forgetting: clean R@1 {f['clean_source']['R@1']:.1f} → {f['clean_after']['R@1']:.1f} "
                      f"({f['clean_delta_R@1']:+.1f}); first domain ({f['first_domain']}) source "
                      f"{f['first_domain_source']['R@1']:.1f} → re-scored {f['first_domain_after']['R@1']:.1f} "
                      f"({f['first_domain_delta_R@1']:+.1f})")


@app.command("diagnose")
def diagnose_cmd(
    benchmark: Annotated[str, typer.Option(help="A registered benchmark (`qshift shifts list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    weights: WeightsOpt = None,
    model: ModelOpt = "world",
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
) -> None:
    """Uniformity, query–gallery gap, consistency, top-1 similarity and REST's gradient angle: clean vs shifted."""
    from qshift.bench.diagnose import diagnose_task

    try:
        task, rmodel = _task_and_model(benchmark, model, Path(weights) if weights and model == "world" else weights,
                                       dataset, data_root, annotation, device, preprocess, 0, not as_json)
    except (ValueError, FileNotFoundError, TypeError) as e:
        _error(e)
        raise typer.Exit(2)
    result = diagnose_task(rmodel, task)
    if as_json:
        typer.echo(json.dumps({"benchmark": benchmark, "diagnostics": result}))
        return
    table = Table(title=f"Diagnostics at the source model: {benchmark}")
    cols = ("uniformity", "gap", "consistency", "top1_similarity", "angle_deg")
    table.add_column("queries")
    for c in cols:
        table.add_column(c, justify="right")
    for dom, d in result.items():
        table.add_row(dom, *(f"{d[c]:.3f}" if c != "angle_deg" else f"{d[c]:.1f}" for c in cols))
    console.print(table)


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
        "--protocol", help="Override a protocol knob of every cell: key=value (repeatable; batch_size, steps, lr, "
                           "weight_decay, scoring, reset). Cells made under another protocol are rerun.")] = None,
) -> None:
    """Run a grid of methods × benchmarks × seeds; finished cells are skipped, failures recorded."""
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
        cells = G.plan(spec, only)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        raise typer.Exit(2)
    if dry_run:
        model_id = G.model_identity(spec.weights)
        for bench, m, seed in cells:
            done = "done" if G._finished(G.cell_path(out, bench, m.key, seed), G._expected_options(m), model_id,
                                         G._expected_protocol(spec, m)) else "todo"
            typer.echo(f"{done}\t{m.key}\t{bench}\tseed{seed}")
        return
    t0 = time.time()
    counts = G.run_grid(spec, out, only)
    console.print(f"grid {out}: {counts['done']} run, {counts['skipped']} already finished, "
                  f"{counts['failed']} failed, of {counts['cells']} cells ({(time.time() - t0) / 60:.1f} min). "
                  f"Tables and plots: qshift report {out}")
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="A grid folder written by `qshift bench`.")],
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: FOLDER/report).")] = None,
    readme: Annotated[Optional[Path], typer.Option(help="Also replace the generated grid block of this README.")]
    = None,
) -> None:
    """Markdown + CSV tables in the papers' layout and PNG plots from a grid's results."""
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
    console.print(f"report: {rep['report']}\ntables: {len(rep['csv'])} CSV in {rep['report'].parent / 'tables'}\n"
                  f"plots: {len(rep['plots'])} PNG in {rep['report'].parent / 'plots'}")
    if readme is not None:
        update_readme(readme, rep["tables"], f"qshift report {folder} --readme {readme}", rep["protocol"])
        console.print(f"updated the grid block of {readme}")


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
    from qshift.bench import grid as G

    try:
        res = G.restamp_cells(folder, pattern, verify=verify, seed=seed, from_sha=from_sha, log=console.print)
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


@app.command("methods")
def methods_cmd(
    name: Annotated[Optional[str], typer.Argument(help="One method (default: the protocol and every method).")]
    = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print docs/methods.md's generated block.")] = False,
) -> None:
    """Every method with its options (name, type, default, allowed values, what it does), and the protocol."""
    from qshift.methods.base import method_class
    from qshift.methods.catalog import docs_block, summary
    if markdown:
        typer.echo(docs_block())
        return
    try:
        names = [name] if name else None
        if names:
            method_class(name)
    except ValueError as e:
        _error(e)
        raise typer.Exit(2)
    from qshift.methods import available_methods

    if names is None:
        console.print("[bold]protocol[/bold] (every method)")
        _print_options(Protocol)
    for n in names or available_methods():
        console.print(f"\n[bold]{n}[/bold]: {escape(summary(n))}", highlight=False)
        opts = method_class(n).Options
        if opts.names():
            _print_options(opts)
        else:
            console.print("  no options of its own")


def _print_options(opts) -> None:
    table = Table(show_edge=False)
    for col in ("option", "type", "default", "allowed", "what it does"):
        table.add_column(col, overflow="fold")
    for r in opts.describe():
        table.add_row(r["name"], r["kind"], repr(r["default"]), r["allowed"].replace("`", ""), r["help"])
    console.print(table)


shifts_app = typer.Typer(no_args_is_help=True, help="List and preview the query shifts and benchmarks.")
app.add_typer(shifts_app, name="shifts")


@shifts_app.command("list")
def shifts_list(
    pattern: Annotated[Optional[str], typer.Argument(help="Only names containing this text.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="A real dataset's benchmarks instead of the world's "
                                                        "(coco, flickr, cuhk-pedes, …).")] = None,
    families: Annotated[bool, typer.Option("--families", help="One line per benchmark family: its pattern, "
                                                              "direction and report table.")] = False,
) -> None:
    """Print every registered benchmark name, one per line (or the families)."""
    from qshift.bench import registry
    from qshift.data.retrieval_datasets import DATASET_NAMES

    if families:
        for fam in registry.families():
            kind = "stream" if fam.title is None else f"table {fam.title!r}"
            typer.echo(f"{fam.pattern}\t{fam.direction}\t{kind}" + ("\t(real dataset)" if fam.needs_dataset else ""))
        return
    if dataset is not None and dataset not in DATASET_NAMES:
        _error(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
        raise typer.Exit(2)
    for name in registry.list_benchmarks(dataset):
        if pattern is None or pattern in name:
            typer.echo(name)


@shifts_app.command("materialize")
def shifts_materialize(
    dataset: Annotated[str, typer.Option(help="coco, flickr, cuhk-pedes, icfg-pedes, nocaps[-in|-near|-out].")],
    data_root: Annotated[Path, typer.Option(help="Folder with the clean images and the annotation file.")],
    out: Annotated[Path, typer.Option(help="Where to write <corruption>/<severity>/ copies.")],
    corruption: Annotated[Optional[list[str]], typer.Option(help="Corruption(s) (repeatable; default: the 16).")] = None,
    severity: Annotated[Optional[list[int]], typer.Option(min=1, max=5, help="Severity (repeatable; default 1–5).")]
    = None,
    annotation: Annotated[Optional[Path], typer.Option(help="Annotation file (default: the usual name).")] = None,
    seed: Annotated[int, typer.Option(help="Shift seed (the same pixels as the on-the-fly benchmark).")] = 0,
    layout: Annotated[str, typer.Option(help="qshift: <out>/<corruption>/<severity>/ with the annotation (a drop-in "
                                             "--data-root); tcr: TCR's <out>/coco-IP/COCO_IP_<c>_<s>/ image roots.")]
    = "qshift",
) -> None:
    """Write corrupted copies of a real dataset to disk, for people who want files."""
    from qshift.data import retrieval_datasets as RD
    from qshift.shifts.image import CORRUPTIONS
    from qshift.data.karpathy import DATASETS, materialize

    try:
        ds = RD.load_dataset(dataset, data_root, annotation)
        default = DATASETS.get(dataset) or RD.PEDES.get(dataset) or RD.NOCAPS_FILE
        ann = annotation or data_root / default
        n = materialize(ds, data_root, ann, out, corruption or list(CORRUPTIONS), severity or [1, 2, 3, 4, 5], seed,
                        layout=layout)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        raise typer.Exit(2)
    where = "<corruption>/<severity>/ (each a drop-in --data-root)" if layout == "qshift" else "TCR's *-IP/ image roots"
    console.print(f"wrote {n} images under {out}/{where}")


@shifts_app.command("preview")
def shifts_preview(
    out: Annotated[Path, typer.Option(help="PNG to write: every corruption × severity, and the domains.")]
    = Path("shifts_preview.png"),
    image_index: Annotated[int, typer.Option(min=0, help="Which test image to corrupt.")] = 0,
    seed: Annotated[int, typer.Option(help="Shift seed.")] = 0,
) -> None:
    """Draw every image corruption at every severity (and the QGS domains); print text examples."""
    from qshift.bench.preview import draw_image_preview, text_examples

    path = draw_image_preview(out, image_index=image_index, seed=seed)
    console.print(f"wrote {path}")
    for line in text_examples(image_index=image_index, seed=seed):
        console.print(line, markup=False, highlight=False)


@app.command("train-world-model")
def train_world_model_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the weights (.pt) and the model card (.md beside it).")]
    = Path("world_dual_encoder.pt"),
    seed: Annotated[int, typer.Option(help="Seed for the training scenes, initialisation and batches.")] = 0,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps (default: the shipped model's).")] = None,
    pool_size: Annotated[Optional[int], typer.Option(min=256, help="Rendered training scenes.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Validate every N steps.")] = None,
    typo_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of caption words misspelt.")] = None,
    typo_max_edits: Annotated[Optional[int], typer.Option(min=1, help="Edits per misspelling, 1..N.")] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune from these weights instead of from scratch.")]
    = None,
    train_towers: Annotated[Optional[str], typer.Option(help="With --init-from: both | text | image (the other "
                                                             "tower stays frozen).")] = None,
    noise_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of training images given "
                                                     "Gaussian pixel noise (shipped: 0.5).")] = None,
    noise_std_max: Annotated[Optional[float], typer.Option(min=0.0, help="Largest std of the Gaussian pixel-noise "
                                                           "augmentation (default 0.04, as v6; v3: 0.12).")] = None,
    illum_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of training images blended "
                                                     "with a smooth grey illumination field (default 0, as "
                                                     "v6.1).")] = None,
    illum_amp_max: Annotated[Optional[float], typer.Option(min=0.0, help="Largest amplitude a of that field, "
                                                           "(x + a·P) / (1 + a); ImageNet-C fog severity 1 is "
                                                           "a = 1.5.")] = None,
    render_size: Annotated[Optional[int], typer.Option(min=96, help="Render training scenes at this size and "
                                                       "area-downsample to 96 px (the benchmark renders at "
                                                       "192; 96 reproduces v3).")] = None,
    standardise: Annotated[Optional[bool], typer.Option("--standardise/--no-standardise", help="Per-image input "
                                                        "standardisation in the image tower (default: as the "
                                                        "model configuration / checkpoint).")] = None,
    stem_norm: Annotated[Optional[bool], typer.Option("--stem-norm/--no-stem-norm", help="From scratch: a "
                                                      "channel LayerNorm after each stride-2 stem convolution, so "
                                                      "LayerNorm-only adaptation reaches low-level features "
                                                      "(default on, as v6; v3: off).")] = None,
    mlp_norm: Annotated[Optional[bool], typer.Option("--mlp-norm/--no-mlp-norm", help="A LayerNorm on each image "
                                                     "block's MLP hidden activations (NormFormer), more "
                                                     "LayerNorm parameters for adaptation (default off, as "
                                                     "v6.1). With --init-from, --mlp-norm inserts them into a "
                                                     "checkpoint without them.")] = None,
    zero_unseen_pieces: Annotated[Optional[bool], typer.Option(
        "--zero-unseen-pieces/--keep-unseen-pieces", help="From scratch: after training, zero the embeddings of "
        "n-gram buckets no training word used, so an unseen n-gram (a typo's) adds nothing to its word "
        "(default on, as the shipped model).")] = None,
) -> None:
    """Train the embedded world's source model from scratch, as the shipped one was trained (or fine-tune one:
    --init-from, --train-towers)."""
    from dataclasses import replace

    from qshift.train.model_card import write_model_card
    from qshift.train.world_training import TrainConfig, train_world_model

    cfg = TrainConfig(seed=seed)
    overrides = {k: v for k, v in {"steps": steps, "pool_size": pool_size, "eval_every": eval_every, "typo_p": typo_p,
                                   "typo_max_edits": typo_max_edits, "lr": lr,
                                   "init_from": str(init_from) if init_from else None,
                                   "train_towers": train_towers, "noise_p": noise_p,
                                   "standardise_input": standardise, "render_size": render_size,
                                   "noise_std_max": noise_std_max, "stem_norm": stem_norm,
                                   "illum_p": illum_p, "illum_amp_max": illum_amp_max, "mlp_norm": mlp_norm,
                                   "zero_unseen_pieces": zero_unseen_pieces}.items() if v is not None}
    cfg = replace(cfg, **overrides)
    if (cfg.illum_p > 0) != (cfg.illum_amp_max > 0):
        raise typer.BadParameter("--illum-p and --illum-amp-max go together: give both (> 0) or neither")
    if zero_unseen_pieces is not None and init_from is not None:
        raise typer.BadParameter("--zero-unseen-pieces / --keep-unseen-pieces apply to a model trained from "
                                 "scratch; a fine-tune keeps its checkpoint's zeroed buckets (they get no gradient)")
    if stem_norm is not None and init_from is not None:
        raise typer.BadParameter("--stem-norm / --no-stem-norm set the architecture of a model trained from "
                                 "scratch; a fine-tune keeps its checkpoint's")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, record = train_world_model(cfg, out=None, log=lambda s: console.print(s))
    card_path = write_model_card(model, record, out, command="qshift train-world-model " + " ".join(
        [f"--seed {seed}"] + [("--standardise" if v else "--no-standardise") if k == "standardise_input"
                              else ("--stem-norm" if v else "--no-stem-norm") if k == "stem_norm"
                              else ("--mlp-norm" if v else "--no-mlp-norm") if k == "mlp_norm"
                              else ("--zero-unseen-pieces" if v else "--keep-unseen-pieces")
                              if k == "zero_unseen_pieces"
                              else f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()]))
    console.print(f"weights: {out}\nmodel card: {card_path}")


def main() -> None:
    """The ``qshift`` entry point: bad input that a command did not catch itself (a malformed weights
    file, a wrong option) or a run that went non-finite ends with one ``error:`` line and exit status 2
    instead of a traceback; ``QSHIFT_DEBUG=1`` shows the traceback."""
    import os
    import sys

    try:
        app()
    except (ValueError, FileNotFoundError, TypeError, KeyError, FloatingPointError) as e:
        if os.environ.get("QSHIFT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        kind = f"{type(e).__name__}: " if isinstance(e, (TypeError, KeyError, FloatingPointError)) else ""
        err.print(f"[red]error:[/red] {escape(kind + str(msg))} (QSHIFT_DEBUG=1 shows where)", highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
