"""``qshift report``: tables from run-result folders (recognised by content), the heatmaps and the other
plots, stale-plot pruning, and the committed reports' tables regenerating unchanged."""
import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qshift
from qshift.bench import grid as G
from qshift.bench.registry import build_benchmark
from qshift.bench.report import (Table, _slug, build_summary, build_tables, find_run_files, is_run_record,
                                 load_cells, load_runs, plot_heatmap, plot_table, prune_plots, run_labels, table_csv,
                                 table_markdown, write_report)
from qshift.cli import app
from qshift.data import world
from qshift.engine import parse_settings, run_online

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
BENCHES = ("world-c/i2t/fog/5", "world-c/i2t/snow/5", "world-diverse/i2t/mix8/order0")
SETTINGS = ["batch_size=16", "steps=1"]


@pytest.fixture
def small_world(tmp_path, monkeypatch, tiny_model):
    small = world.generate_world(seed=57, n_images=40, name="small-report")
    monkeypatch.setattr(world, "load_split", lambda name: small if name == "test" else small.subset(20, "small-report-1k"))
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "tiny.pt"
    tiny_model.save(weights)
    return weights


def _run(weights, method: str, bench: str, settings=()) -> qshift.engine.RunResult:
    task = build_benchmark(bench, max_queries=32)
    model = qshift.load_model("world", direction=task.direction, weights=str(weights))
    return run_online(model, task, parse_settings(method, [*SETTINGS, *settings]), progress=False)


def _tables_text(tables) -> list[str]:
    return [table_markdown(t) + "\n" + table_csv(t) for t in tables]


@pytest.mark.slow
def test_a_folder_of_run_files_gives_the_grids_tables(small_world, tmp_path):
    weights = small_world
    runs = tmp_path / "runs"
    results = {}
    for i, (method, bench) in enumerate((m, b) for m in ("source", "tent") for b in BENCHES):
        res = _run(weights, method, bench)
        results[(method, bench)] = res
        # names need not follow `qshift run`'s: files are recognised by content, in subfolders too
        name = f"run{i}.json" if i % 3 else f"sub/{bench.replace('/', '-')}-{method}.result"
        res.save(runs / name)
    (runs / "notes.json").write_text(json.dumps({"benchmark": "x", "note": "not a run"}))
    (runs / "grid.yaml").write_text("methods: [source]\n")
    (runs / "half.json.123.tmp").write_text("{")
    gz = runs / "copied-cell.json.gz"  # a compressed copy of a run is read too
    gz.write_bytes(gzip.compress(json.dumps(_run(weights, "tent", BENCHES[0], ["lr=3e-3"]).as_json()).encode()))

    found = find_run_files(runs)
    assert len(found) == 7 and all(is_run_record(d) for _, d in found)
    cells = load_runs(runs)
    # the lr=3e-3 run is told apart from tent's default-lr runs by its label, not averaged with them
    assert sorted(c.label for c in cells) == ["source"] * 3 + ["tent"] * 3 + ["tent[lr=0.003]"]
    fog = next(c for c in cells if c.label == "source" and c.benchmark == BENCHES[0])
    assert fog.metrics["R@1"] == results[("source", BENCHES[0])].metrics["R@1"] and fog.seed == 0

    rep = write_report(runs)
    assert rep["source"] == "runs"
    md = rep["report"].read_text()
    assert "7 run result files (`qshift run --out`)" in md and "do not name their backbone" in md
    # and the protocol line says which cell ran under another rate
    assert "batch_size = 16, lr = 0.003, steps = 1 (1 cell: tent[lr=0.003])" in md
    names = {p.name for p in rep["plots"]}
    assert {"heatmap_image_corruptions_severity_5_i2t_r_1.png", "forgetting.png",
            "stream_world-diverse__i2t__mix8__order0.png"} <= names
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in rep["plots"])

    # the same cells run as a grid give the same tables
    gz.unlink()
    spec = G.GridSpec(methods=["source", "tent"], benchmarks=list(BENCHES), weights=str(weights),
                      protocol={"batch_size": 16, "steps": 1}, max_queries=32)
    G.run_grid(spec, tmp_path / "grid", progress=False, log=lambda m: None)
    from_grid, from_runs = load_cells(tmp_path / "grid"), load_runs(runs)
    assert _tables_text(build_tables(from_grid)) == _tables_text(build_tables(from_runs))
    assert _tables_text(build_summary(from_grid)) == _tables_text(build_summary(from_runs))

    result = runner.invoke(app, ["report", str(runs), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "run result files" in result.output and (tmp_path / "rep" / "report.md").is_file()


def test_run_folders_refuse_duplicates_and_empty_folders(small_world, tmp_path):
    res = _run(small_world, "source", BENCHES[0])
    res.save(tmp_path / "a" / "one.json")
    res.save(tmp_path / "a" / "two.json")
    with pytest.raises(ValueError, match=r"one\.json and .*two\.json are both source on world-c/i2t/fog/5"):
        load_runs(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.json").write_text("[1, 2]")
    with pytest.raises(FileNotFoundError, match="no run result files"):
        load_runs(tmp_path / "empty")
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no run result files" in result.output


def _record(method: str, options: dict | None = None, **protocol) -> dict:
    cfg = {"method": method, "seed": 0, "method_options": options or {}, "batch_size": 64, "steps": 3, "lr": 1e-3,
           "lr_default": 1e-3, **protocol}
    return {"benchmark": "world-c/i2t/fog/5", "config": cfg, "metrics": {"R@1": 1.0}, "per_domain": {}, "batches": []}


def test_run_labels_show_only_what_tells_a_methods_runs_apart():
    recs = [_record("rest", {"lambda_a": 1.0}), _record("rest", {"lambda_a": 0.1}), _record("rest", {"lambda_a": 1.0}, lr=3e-3),
            _record("tent", steps=1), _record("tent", steps=1), {**_record("tcr"), "label": "tcr-mine"}]
    # steps = 1 is shared by every tent run: the protocol line reports it, the label leaves it out
    assert run_labels(recs) == ["rest[lambda_a=1]", "rest[lambda_a=0.1]", "rest[lambda_a=1,lr=0.003]", "tent", "tent",
                                "tcr-mine"]
    assert is_run_record(recs[0])
    assert not is_run_record({"benchmark": "x", "config": {"method": "tent"}, "metrics": {}, "per_domain": {},
                              "batches": []})  # no seed


def _table(n_shifts: int, methods: list[str], kind: str = "family") -> Table:
    rng = np.random.default_rng(0)
    rows = {m: [float(v) for v in rng.uniform(0, 50, n_shifts)] for m in methods}
    rows[methods[-1]][0] = None
    return Table("Image corruptions, severity 5 (i2t R@1)", [f"shift_{i}" for i in range(n_shifts)], rows,
                 seeds=1, kind=kind)


def test_heatmaps_for_families_bars_for_streams_and_stale_plots_pruned(tmp_path):
    t = _table(16, ["source", "tent", "tcr", "rest", "oracle"])
    p = plot_heatmap(t, tmp_path)
    assert p.name == "heatmap_image_corruptions_severity_5_i2t_r_1.png" and p.stat().st_size > 20_000
    ablation = _table(3, ["source"] + [f"rest[v{i}]" for i in range(20)])  # many methods: drawn sideways
    (tmp_path / "abl").mkdir()
    assert plot_heatmap(ablation, tmp_path / "abl").stat().st_size > 20_000
    delta = _table(4, ["tent", "tcr"], kind="delta")
    assert plot_table(delta, tmp_path).name.startswith("heatmap_")
    diverse = Table("Diverse shift i2t/mix8", ["order0 online", "Δclean R@1 (mean)"],
                    {"source": [10.0, 0.0], "tent": [5.0, -20.0]}, kind="diverse")
    bars = plot_table(diverse, tmp_path)
    assert bars.name.startswith("bars_")
    # a regenerated report removes its own plots it no longer draws, and nothing else
    (tmp_path / "bars_image_corruptions_severity_5_i2t_r_1.png").write_bytes(b"old")
    (tmp_path / "mine.png").write_bytes(b"keep")
    gone = prune_plots(tmp_path, [p, bars])
    assert {g.name for g in gone} >= {"bars_image_corruptions_severity_5_i2t_r_1.png"}
    assert (tmp_path / "mine.png").is_file() and p.is_file() and bars.is_file()


@pytest.mark.parametrize("folder", ["results/readme-grid", "results/methods-grid"])
def test_committed_reports_tables_regenerate_unchanged(folder):
    root = REPO / folder
    if not (root / "cells.jsonl").is_file():
        pytest.skip(f"{folder} is not in this checkout")
    cells = load_cells(root)
    tables = build_summary(cells) + build_tables(cells)
    md = (root / "report" / "report.md").read_text()
    for t in tables:
        assert table_markdown(t) in md
        committed = (root / "report" / "tables" / f"{_slug(t.title)}.csv").read_text()
        assert list(csv.reader(io.StringIO(table_csv(t)))) == list(csv.reader(io.StringIO(committed)))
