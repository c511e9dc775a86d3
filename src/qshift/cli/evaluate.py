"""``qshift eval``, ``qshift run`` and ``qshift diagnose``: the source model, one online run, diagnostics."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from qshift.cli.common import (USER_ERRORS, AnnotationOpt, DataRootOpt, DatasetOpt, DeviceOpt, Direction, ModelOpt,
                               ModelOptionOpt, parse_model_options,
                               PreprocessOpt, Split, WeightsOpt, app, console, err, error as _error)


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
    model_option: ModelOptionOpt = None,
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
    if model != "world" or dataset is not None or model_option or _any_other_task(benchmark or []):
        if not benchmark:
            err.print("[red]error:[/red] a real backbone or dataset needs --benchmark (e.g. coco/i2t, coco-c/i2t/fog/5)")
            raise typer.Exit(2)
        rows, backbone = [], None
        for name in benchmark:
            try:
                task, rmodel, backbone = _task_and_model(name, model, weights, dataset, data_root, annotation,
                                                         device, preprocess, shift_seed, not as_json,
                                                         backbone=backbone, model_option=model_option)
                row, _ = evaluate_task(rmodel, task, batch_size=batch_size, progress=not as_json)
            except USER_ERRORS as e:
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
    except USER_ERRORS as e:
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


def _any_other_task(benchmarks: list[str]) -> bool:
    """Whether a benchmark of the list belongs to a task other than image-text (the world answers the
    composed and video-audio tasks with their own models, through the same path as a real backbone);
    unknown names are left to the caller's error."""
    from qshift.bench.registry import resolve
    from qshift.data.task import task_of

    for name in benchmarks:
        try:
            fam, params = resolve(name)
        except ValueError:
            continue
        if task_of(fam.direction_of(params)).name != "image-text":
            return True
    return False


def _print_rows(rows, title: str, t0: float) -> None:
    names: list[str] = []  # every metric the rows' tasks report, in their order (MedR, subset recalls …)
    for r in rows:
        names += [k for k in r.metrics if k not in names]
    table = Table(title=title)
    for col in ("benchmark", "direction", *names, "queries", "gallery"):
        table.add_column(col, justify="right" if col not in ("benchmark", "direction") else "left")
    for r in rows:
        table.add_row(r.benchmark, r.direction, *(f"{r.metrics[k]:.1f}" if k in r.metrics else "—" for k in names),
                      str(r.n_queries), str(r.n_gallery))
    console.print(table)
    console.print(f"[dim]{time.time() - t0:.1f}s · recalls and mAP in percent, MedR in ranks · any-positive "
                  "Recall@K[/dim]")


def _task_and_model(benchmark: str, model_spec: str, weights: Optional[Path], dataset: Optional[str],
                    data_root: Optional[Path], annotation: Optional[Path], device: str, preprocess: str,
                    shift_seed: int, progress: bool, max_queries: Optional[int] = None, backbone=None,
                    model_option: Optional[list[str]] = None):
    """Resolve (task, RetrievalModel, GridBackbone) for the embedded world or a real dataset + backbone
    (``backbone``: one already loaded, reused across benchmarks).

    The cheap checks come first (the dataset's files, the benchmark's name, the model and its weights),
    the benchmark's queries are built last: a mistake costs seconds, not a built benchmark."""
    from qshift.bench.backbone import GridBackbone
    from qshift.bench.registry import build_benchmark, resolve

    if dataset is not None and data_root is None:
        raise ValueError("--dataset needs --data-root (the folder holding the images and the annotation file)")
    if backbone is None:
        backbone = GridBackbone(model_spec, None if weights is None else str(weights), dataset=dataset,
                                data_root=None if data_root is None else str(data_root),
                                annotation=None if annotation is None else str(annotation), preprocess=preprocess,
                                device=device, options=parse_model_options(model_option))
    fam, params = resolve(benchmark, backbone.dataset)
    model = backbone.model(fam.direction_of(params))
    task = build_benchmark(benchmark, shift_seed=shift_seed, progress=progress, dataset=backbone.dataset,
                           max_queries=max_queries)
    return task, model, backbone


@app.command("run")
def run_cmd(
    method: Annotated[str, typer.Option(help="Method name (source, tent, tcr, rest, oracle, …).")],
    benchmark: Annotated[str, typer.Option(help="A registered benchmark (`qshift shifts list`).")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a protocol knob or method option: key=value (repeatable). Protocol keys: "
                      "batch_size, steps, lr, weight_decay, scoring, reset, seed; anything else goes to the method.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line instead of a table.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the run's result JSON (named by benchmark, method, "
                                                     "seed and a hash of the config: other options never overwrite "
                                                     "it).")] = None,
    max_queries: Annotated[Optional[int], typer.Option(min=1, help="Keep at most this many queries, evenly over "
                                                                   "the benchmark's query sets.")] = None,
    weights: WeightsOpt = None,
    shift_seed: Annotated[int, typer.Option(help="Seed of the corruptions / perturbations.")] = 0,
    model: ModelOpt = "world",
    model_option: ModelOptionOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
) -> None:
    """Run one method online over one benchmark stream and report online R@1/5/10 and mAP.

    Under ``torchrun --nproc_per_node N -m qshift.cli run …`` the processes share each batch and the
    gallery encoding (docs/distributed.md); rank 0 alone prints and writes ``--out``."""
    from qshift.atomic import prepare_output_dir
    from qshift.engine import parse_settings, result_filename, run_online
    from qshift.parallel import from_environment

    comm = from_environment(device)
    parallel, lead = comm.world_size > 1, comm.rank == 0
    try:
        try:  # everything that can be checked before the benchmark is built
            cfg = parse_settings(method, set_ or [])
            if out is not None and lead:
                prepare_output_dir(out)
            task, rmodel, backbone = _task_and_model(benchmark, model, weights, dataset, data_root, annotation,
                                                     device, preprocess, shift_seed, not as_json and lead,
                                                     max_queries, model_option=model_option)
            result = run_online(rmodel, task, cfg, progress=not as_json and lead, comm=comm if parallel else None)
        except USER_ERRORS as e:
            _error(e)
            raise typer.Exit(2)
    finally:
        comm.close()
    if not lead:
        return
    result.model, result.shift_seed, result.max_queries = backbone.identity_for(task.direction), shift_seed, max_queries
    row = {"benchmark": benchmark, "direction": task.direction, "method": method, "model": model,
           "metrics": {k: round(result.metrics[k], 4) for k in _reported(task.direction, result.metrics)},
           "n_queries": result.n_queries, "n_gallery": result.n_gallery}
    if result.forgetting is not None:
        row["forgetting"] = {"clean_delta_R@1": round(result.forgetting["clean_delta_R@1"], 4),
                             "first_domain_delta_R@1": round(result.forgetting["first_domain_delta_R@1"], 4)}
    if as_json:
        typer.echo(json.dumps(row))
    else:
        _print_run(result, method, benchmark, task.direction)
    if out is not None:  # after the metrics are out: a failed write loses nothing that was printed
        try:
            path = result.save(out / result_filename(result))
        except OSError as e:
            _error(f"the run finished but its result could not be written to {out}: {e}")
            raise typer.Exit(1)
        if not as_json:
            console.print(f"result: {path}", markup=False, highlight=False)


def _reported(direction: str, metrics: dict) -> list[str]:
    """The metrics ``direction``'s task reports (:mod:`qshift.data.task`) that ``metrics`` holds."""
    from qshift.data.task import task_of

    return [k for k in task_of(direction).metrics if k in metrics]


def _print_run(result, method: str, benchmark: str, direction: str) -> None:
    table = Table(title=f"{method} on {benchmark} (online, {result.seconds:.0f}s)")
    cols = _reported(direction, result.metrics)
    for col in ("domain", *cols):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for dom, m in list(result.per_domain.items()) + [("all", result.metrics)]:
        table.add_row(dom, *(f"{m[k]:.1f}" if k in m else "–" for k in cols))
    console.print(table)
    c = result.config
    console.print(f"protocol: B = {c['batch_size']}, {c['steps']} inner steps, { {'adamw': 'AdamW', 'sgd': 'SGD'}.get(c['optimizer'], c['optimizer'])} lr {c['lr']:g}, weight decay "
                  f"{c['weight_decay']:g}, scoring {c['scoring']}, reset {c['reset']}, query order seed {c['seed']}",
                  markup=False, highlight=False)
    if result.search:
        s = result.search
        console.print(f"search: each query against its top-{s['candidates']} of {s['ntotal']:,} from index "
                      f"{s['index']}{' (' + s['index_params'] + ')' if s['index_params'] else ''}, "
                      f"{'exact' if s['exact'] else 'approximate'}; mAP and MedR are bounds "
                      "(docs/large-galleries.md)", markup=False, highlight=False)
    if c["reset"] == "on-collapse":
        console.print(f"collapse guard: fired {result.collapse_resets} time(s) (window {c['collapse_window']} "
                      f"batches, ratio {c['collapse_ratio']:g})", markup=False, highlight=False)
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
    model_option: ModelOptionOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
) -> None:
    """Uniformity, query–gallery gap, consistency, top-1 similarity and REST's gradient angle: clean vs shifted."""
    from qshift.bench.diagnose import diagnose_task

    try:
        task, rmodel, _ = _task_and_model(benchmark, model, weights, dataset, data_root, annotation, device,
                                          preprocess, 0, not as_json, model_option=model_option)
    except USER_ERRORS as e:
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
