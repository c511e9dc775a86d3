import csv
import io
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qshift.bench import grid as G
from qshift.bench.restamp import restamp_cells
from qshift.bench.store import read_cell
from qshift.bench.report import (README_END, README_START, Cell, _order, build_summary, build_tables, load_cells,
                                 protocol_deviations, protocol_notes, readme_markers, table_markdown, update_readme,
                                 write_report)
from qshift.cli import app
from qshift.data import world
from qshift.models.world_model import WorldRetrievalModel

runner = CliRunner()


@pytest.fixture
def small_world(tmp_path, monkeypatch, tiny_model):
    small = world.generate_world(seed=57, n_images=40, name="small-grid")
    monkeypatch.setattr(world, "load_split", lambda name: small if name == "test" else small.subset(20, "small-grid-1k"))
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "tiny.pt"
    tiny_model.save(weights)
    return small, weights


def test_grid_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        G.GridSpec(methods=["tent"], benchmarks=["world-clean/i2t"], protocol={"batchsize": 3})
    spec = G.GridSpec(methods=["tent", {"name": "rest", "label": "rest-sgd", "options": {"signal": "memory"}}],
                      benchmarks=["world-c/i2t/*/5", "world-clean/i2t"])
    names = spec.expanded_benchmarks()
    assert len(names) == 17 and names[-1] == "world-clean/i2t" and all(n.endswith("/5") for n in names[:16])
    assert [m.key for m in spec.methods] == ["tent", "rest-sgd"]
    with pytest.raises(ValueError, match="matches nothing"):
        G.GridSpec(methods=["tent"], benchmarks=["world-zz/*"]).expanded_benchmarks()
    with pytest.raises(ValueError, match="unknown method"):
        G.plan(G.GridSpec(methods=["magic"], benchmarks=["world-clean/i2t"]))
    with pytest.raises(ValueError, match="unknown option"):
        G.plan(G.GridSpec(methods=[{"name": "rest", "options": {"lamda_u": 1.0}}], benchmarks=["world-clean/i2t"]))
    with pytest.raises(ValueError, match="expects a number"):
        G.plan(G.GridSpec(methods=[{"name": "rest", "options": {"lambda_u": "1.0x"}}], benchmarks=["world-clean/i2t"]))
    with pytest.raises(ValueError, match="unique"):
        G.plan(G.GridSpec(methods=["tent", "tent"], benchmarks=["world-clean/i2t"]))
    bad = tmp_path / "g.yaml"
    bad.write_text("methods: [tent]\nbenchmark: [world-clean/i2t]\n")
    with pytest.raises(ValueError, match="invalid grid"):
        G.load_grid(bad)
    with pytest.raises(FileNotFoundError):
        G.load_grid(tmp_path / "missing.yaml")
    # PyYAML reads 1e-3 (no dot) as a string: the grid loader reads it as the number meant
    sci = tmp_path / "sci.yaml"
    sci.write_text("methods: [{name: tent, label: t, options: {lr: 1e-3}}, {name: rest, options: {lambda_a: 5E-1}}]\n"
                   "benchmarks: [world-c/i2t/fog/5]\nprotocol: {lr: 3e-4}\n")
    sci_spec, _ = G.load_grid(sci)
    assert sci_spec.methods[0].options["lr"] == 1e-3 and sci_spec.methods[1].options["lambda_a"] == 0.5
    assert sci_spec.protocol["lr"] == 3e-4 and sci_spec.benchmarks == ["world-c/i2t/fog/5"]
    G.plan(sci_spec)
    # presets resolve, and the README preset restricts the diverse streams to source / tcr / rest
    spec, only = G.preset("world-readme")
    cells = G.plan(spec, only)
    diverse = {m.key for b, m, _ in cells if b.startswith("world-diverse")}
    assert diverse == {"source", "tcr", "rest"} and len(cells) == 22 * len(spec.methods) + 9


@pytest.mark.slow  # a whole small grid, twice
def test_grid_runs_resumes_and_records_failures(small_world, tmp_path):
    _, weights = small_world
    spec = G.GridSpec(methods=["source", "tent", {"name": "rest", "label": "rest-bad", "options": {"precondition": "adam", "optimizer": "sgd"}},
                               {"name": "tent", "label": "tent-fast", "options": {"lr": 0.01}}],
                      benchmarks=["world-c/i2t/fog/5", "world-diverse/i2t/mix8/order0"], weights=str(weights),
                      protocol={"batch_size": 16, "steps": 1}, max_queries=32,
                      diagnostics=["world-c/i2t/fog/5"])
    out = tmp_path / "grid"
    counts = G.run_grid(spec, out, progress=False, log=lambda m: None)
    assert counts == {"cells": 8, "skipped": 0, "done": 6, "failed": 2, "stale": 0}
    fast = read_cell(G.cell_path(out, "world-c/i2t/fog/5", "tent-fast", 0))
    assert fast["config"]["lr"] == 0.01 and "lr" not in fast["config"]["method_options"]
    errors = sorted((out / "cells").glob("*/*/seed0.error.json"))
    assert len(errors) == 2 and "precondition" in json.loads(errors[0].read_text())["error"]
    cell = read_cell(G.cell_path(out, "world-c/i2t/fog/5", "tent", 0))
    assert cell["n_queries"] == 32 and cell["n_gallery"] == 200 and cell["label"] == "tent"
    # a row without its own lr runs at the world model's rate, and the cell says so
    assert cell["config"]["lr"] == cell["config"]["lr_default"] == WorldRetrievalModel.default_lr == 1e-3
    div = read_cell(G.cell_path(out, "world-diverse/i2t/mix8/order0", "source", 0))
    assert div["n_queries"] == 32 and len(div["per_domain"]) == 8 and div["forgetting"]["clean_delta_R@1"] == 0
    assert (out / "diagnostics" / "world-c__i2t__fog__5.json").is_file()
    before = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0).stat().st_mtime_ns
    again = G.run_grid(spec, out, progress=False, log=lambda m: None)
    assert again["skipped"] == 6 and again["done"] == 0 and again["failed"] == 2
    assert G.cell_path(out, "world-c/i2t/fog/5", "tent", 0).stat().st_mtime_ns == before
    # a method default that changed since a cell ran makes that cell stale: it is rerun, not trusted
    p = G.cell_path(out, "world-c/i2t/fog/5", "tent-fast", 0)
    cell = read_cell(p)
    assert cell["config"]["method_resolved"] == G._expected_options(spec.methods[3])
    cell["config"]["method_resolved"] = {"an_old_default": 1}
    p.write_text(json.dumps(cell))
    third = G.run_grid(spec, out, progress=False, log=lambda m: None)
    assert third["stale"] == 1 and third["done"] == 1 and third["skipped"] == 5
    # so does a protocol that changed since: a grid-wide knob reruns every cell, a row's own lr that row
    assert G.run_grid(spec, out, progress=False, log=lambda m: None)["skipped"] == 6
    steps2 = spec.model_copy(update={"protocol": {"batch_size": 16, "steps": 2}})
    assert all(not G._finished(G.cell_path(out, b, m.key, 0), G._expected_options(m), None,
                               G._expected_protocol(steps2, m, 1e-3)) for b, m, _ in G.plan(steps2))
    slower = spec.model_copy(update={"methods": [*spec.methods[:3], G.MethodSpec(name="tent", label="tent-fast",
                                                                                 options={"lr": 0.02})]})
    fourth = G.run_grid(slower, out, progress=False, log=lambda m: None)
    assert fourth["stale"] == 2 and fourth["done"] == 2 and fourth["skipped"] == 4
    assert read_cell(p)["config"]["lr"] == 0.02
    # a cell made under the old default rate (3e-4, docs/method.md §2's CLIP rate) is stale for a grid at the default
    tent = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0)
    assert G._finished(tent, G._expected_options(spec.methods[1]), None, G._expected_protocol(spec, spec.methods[1], 1e-3))
    old_rate = read_cell(tent)
    old_rate["config"]["lr"] = 3e-4
    tent.write_text(json.dumps(old_rate))
    assert not G._finished(tent, G._expected_options(spec.methods[1]), None, G._expected_protocol(spec, spec.methods[1], 1e-3))
    fewer = spec.model_copy(update={"max_queries": 16})
    assert not G._finished(G.cell_path(out, "world-c/i2t/fog/5", "tent", 0), None, None,
                           G._expected_protocol(fewer, spec.methods[1], 1e-3))


def test_report_tables_plots_and_readme_block(small_world, tmp_path):
    _, weights = small_world
    spec = G.GridSpec(methods=["source", "tent", "oracle"], benchmarks=["world-c/i2t/fog/5", "world-c/i2t/snow/5",
                                                                        "world-diverse/i2t/mix8/order0"],
                      weights=str(weights), protocol={"batch_size": 16, "steps": 1}, max_queries=32,
                      diagnostics=["world-c/i2t/fog/5"])
    out = tmp_path / "grid"
    G.run_grid(spec, out, progress=False, log=lambda m: None)
    cells = load_cells(out)
    assert len(cells) == 9
    tables = {t.title: t for t in build_tables(cells)}
    img = tables["Image corruptions, severity 5 (i2t R@1)"]
    assert img.columns == ["fog", "snow"] and list(img.rows) == ["source", "tent", "oracle"]
    fog = next(c for c in cells if c.label == "source" and c.benchmark.endswith("fog/5"))
    assert img.rows["source"][0] == pytest.approx(fog.metrics["R@1"])
    cols, rows = img.with_mean()
    assert cols[-1] == "mean" and rows["tent"][-1] == pytest.approx(np.mean(img.rows["tent"]))
    rep = write_report(out)
    md = rep["report"].read_text()
    assert "| source |" in md and "oracle *(uses labels)*" in md and "![diagnostics]" in md
    # the grid's protocol is not docs/method.md §2's, and the report says so before any table
    assert ("**Protocol differs from the defaults (docs/method.md §2: B = 64, 3 inner steps, adamw with weight decay "
            "0.0001, scoring `tcr`, reset `never`, lr: each backbone's protocol rate) in 9 of 9 cells**: "
            "batch_size = 16, steps = 1 "
            "(9 cells: source, tent, oracle)") in md.split("|")[0]
    assert "Streams longer than 32 queries subsampled to 32, evenly over their domains" in md
    # the oracle is never bolded
    assert not any("**" in line for line in md.splitlines() if line.startswith("| oracle"))
    rows_csv = list(csv.reader(io.StringIO(rep["csv"][0].read_text())))
    assert rows_csv[0][0] == "method" and len(rows_csv) == 4
    names = {p.name for p in rep["plots"]}
    assert {"forgetting.png", "diagnostics.png", "stream_world-diverse__i2t__mix8__order0.png"} <= names
    assert all(p.stat().st_size > 10_000 for p in rep["plots"])
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold\n{README_END}\n\ntail\n")
    update_readme(readme, rep["tables"], "qshift report grid", rep["protocol"])
    text = readme.read_text()
    assert "Protocol differs" in text and "old" not in text and "| tent |" in text and text.endswith("tail\n") and "generated by" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, rep["tables"], "x")
    # a named block sits beside the default one and is replaced alone
    av_start, av_end = readme_markers("av")
    readme.write_text(f"{README_START}\nkeep\n{README_END}\n{av_start}\nold\n{av_end}\n")
    update_readme(readme, rep["tables"], "qshift report grid --block av", block="av")
    text = readme.read_text()
    assert "keep" in text and "old" not in text and "| tent |" in text.split(av_start)[1]
    with pytest.raises(ValueError, match="block name"):
        readme_markers("a b")
    # a cell made with another world model is left out of every table, and the report says so
    p = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0)
    cell = read_cell(p)
    cell["model"] = {**cell["model"], "weights_sha256": "0" * 64}
    p.write_text(json.dumps(cell))
    excluded = []
    kept = load_cells(out, excluded=excluded)
    assert len(kept) == 8 and excluded == [p]
    assert len(load_cells(out, model=None)) == 9
    rep = write_report(out)
    assert rep["stale"] == 1 and "1 cell(s) made with another world model are left out" in rep["report"].read_text()
    fog_tent = {t.title: t for t in rep["tables"]}["Image corruptions, severity 5 (i2t R@1)"].rows["tent"]
    assert fog_tent[0] is None


def test_bench_and_report_cli_errors(tmp_path):
    both = runner.invoke(app, ["bench"])
    assert both.exit_code == 2 and "exactly one" in both.output
    bad = runner.invoke(app, ["bench", "--preset", "nope"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
    dry = runner.invoke(app, ["bench", "--preset", "demo", "--dry-run", "--out", str(tmp_path / "d")])
    assert dry.exit_code == 0 and len(dry.stdout.strip().splitlines()) == 20
    assert all(line.startswith("todo\t") for line in dry.stdout.strip().splitlines())
    empty = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "no grid results" in empty.output


def test_library_api_adapts_retrieves_and_resumes(tiny_model, tmp_path):
    import qshift
    from qshift.models.world_model import WorldRetrievalModel

    split = world.generate_world(seed=9, n_images=32)
    images = split.images()
    model = WorldRetrievalModel(tiny_model, "image")
    ad = qshift.Adapter(model, split.captions, method="tcr", gallery_ids=split.caption_image, lr=1e-2)
    ids, scores = ad.retrieve(images[:8], k=5)
    assert ids.shape == (8, 5) and set(ids.flatten().tolist()) <= set(split.caption_image.tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    state = tmp_path / "state.pt"
    ad.save_state(state)
    ref_ids, ref_scores = ad.retrieve(images[8:16], k=5)  # the uninterrupted stream
    params_after = [p.detach().clone() for p in ad.method.params]
    # a fresh process: new adapter, load the state, feed the same next batch
    ad.close()  # back to the source parameters, and the model is free for another Adapter
    ad2 = qshift.Adapter(model, split.captions, method="tcr", gallery_ids=split.caption_image, lr=1e-2)
    ad2.load_state(state)
    ids2, scores2 = ad2.retrieve(images[8:16], k=5)
    assert torch.equal(ids2, ref_ids) and torch.allclose(scores2, ref_scores)
    assert all(torch.allclose(a, b) for a, b in zip(ad2.method.params, params_after))
    other = qshift.Adapter(model, split.captions, method="tent", gallery_ids=split.caption_image, copy_model=True)
    with pytest.raises(ValueError, match="method"):
        other.load_state(state)
    with pytest.raises(ValueError, match="normalised"):
        qshift.Adapter(model, torch.ones(4, 16), gallery_is_embedded=True)
    with pytest.raises(ValueError, match="direction"):
        qshift.load_model("world", direction="x2y")
    with pytest.raises(ValueError, match="gallery is empty"):
        qshift.Adapter(model, [], method="tcr")
    for bad_k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            ad2.retrieve(images[16:24], k=bad_k)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            ad2.search(images[16:24], k=bad_k)
    assert ad2.search(images[:2], k=10_000)[0].shape == (2, len(split.captions))  # capped at the gallery


def test_a_cell_run_with_other_method_defaults_is_stale(tmp_path):
    from qshift.methods.base import resolved_options
    m = G.MethodSpec(name="rest", label="rest[x]", options={"lambda_a": 0.5, "lr": 1e-3})
    expected = G._expected_options(m)
    assert expected["lambda_a"] == 0.5 and "lr" not in expected and expected["lambda_u"] == 1.0  # TCR's too
    assert expected == resolved_options("rest", {"lambda_a": 0.5})
    cell = tmp_path / "seed0.json"
    cell.write_text(json.dumps({"metrics": {"R@1": 1.0}, "config": {"method_resolved": expected}}))
    assert G._finished(cell, expected)
    cell.write_text(json.dumps({"metrics": {"R@1": 1.0}, "config": {"method_resolved": {**expected, "tau_a": 9.0}}}))
    assert not G._finished(cell, expected) and G._finished(cell)  # stale, though it holds metrics
    cell.write_text(json.dumps({"metrics": {"R@1": 1.0}, "config": {}}))  # older cells, no record: trusted
    assert G._finished(cell, expected)
    cell.write_text('{"metrics": ')  # half-written
    assert not G._finished(cell, expected)


def test_a_cell_made_with_another_world_model_is_stale(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    ida, idb = G.model_identity(a), G.model_identity(b)
    assert ida != idb and len(ida["weights_sha256"]) == 64
    cell = tmp_path / "seed0.json"
    cell.write_text(json.dumps({"metrics": {"R@1": 1.0}, "config": {}, "model": ida}))
    assert G._finished(cell, None, ida) and not G._finished(cell, None, idb)
    cell.write_text(json.dumps({"metrics": {"R@1": 1.0}, "config": {}}))  # no record: made before it existed
    assert not G._finished(cell, None, ida) and G._finished(cell)


def test_printed_tables_keep_bracketed_labels(monkeypatch):
    from rich.console import Console
    from qshift import cli
    from qshift.bench.report import Table as ReportTable

    rec = Console(record=True, width=120)
    monkeypatch.setattr(cli.grids, "console", rec)
    t = ReportTable("Image corruptions", ["fog"], {"rest": [1.0], "rest[no-decoupling]": [2.0]})
    cli.grids._print_tables([t])
    out = rec.export_text()
    assert "rest[no-decoupling]" in out  # Rich would otherwise read "[no-decoupling]" as a style tag


def test_restamp_only_after_identical_reruns(small_world, tmp_path, tiny_model):
    """Zeroing n-gram rows no clean caption uses cannot change an i2t cell (clean caption gallery) but does
    change a typo cell: restamp must accept the first after rerunning it and refuse the second."""
    from qshift.train.world_training import zero_unseen_pieces

    small, weights_a = small_world
    spec = G.GridSpec(methods=["tent"], benchmarks=["world-c/i2t/fog/5", "world-c/t2i/keyboard/6"],
                      weights=str(weights_a), protocol={"batch_size": 16, "steps": 1}, max_queries=32)
    out = tmp_path / "grid"
    G.run_grid(spec, out, progress=False, log=lambda m: None)
    seen = torch.zeros(tiny_model.text.pieces.num_embeddings, dtype=torch.bool)
    seen[tiny_model.tokenizer(list(small.captions)).unique()] = True
    assert zero_unseen_pieces(tiny_model, seen) > 0
    weights_b = tmp_path / "tiny_b.pt"
    tiny_model.save(weights_b)
    i2t = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0)
    t2i = G.cell_path(out, "world-c/t2i/keyboard/6", "tent", 0)
    before_t2i = t2i.read_bytes()

    refused = restamp_cells(out, ["world-c/t2i/*"], verify=1, weights=weights_b, log=lambda m: None)
    assert refused["restamped"] == 0 and refused["mismatch"] and t2i.read_bytes() == before_t2i

    done = restamp_cells(out, ["world-c/i2t/*"], verify=1, weights=weights_b, log=lambda m: None)
    assert done["restamped"] == 1 and done["verified_by"]
    cell = read_cell(i2t)
    assert cell["model"] == G.model_identity(weights_b) and cell["restamped"]["from"] == G.model_identity(weights_a)
    # the grid now treats the restamped cell as finished and reruns only the typo cell
    spec_b = spec.model_copy(update={"weights": str(weights_b)})
    counts = G.run_grid(spec_b, out, progress=False, log=lambda m: None)
    assert counts["skipped"] == 1 and counts["done"] == 1
    with pytest.raises(ValueError, match="verify"):
        restamp_cells(out, ["*"], verify=0, weights=weights_b)


def test_restamp_needs_one_old_model(small_world, tmp_path):
    _, weights = small_world
    out = tmp_path / "grid"
    for i, sha in enumerate(("a" * 64, "b" * 64)):
        G._atomic_json(G.cell_path(out, "world-c/i2t/fog/5", f"m{i}", 0), {
            "benchmark": "world-c/i2t/fog/5", "metrics": {"R@1": 1.0}, "model": {"weights_sha256": sha}})
    with pytest.raises(ValueError, match="2 different models"):
        restamp_cells(out, ["world-c/*"], weights=weights, log=lambda m: None)
    assert restamp_cells(out, ["world-c/*"], weights=weights, from_sha="c", log=lambda m: None)["candidates"] == 0


def _cell(bench, label, seed, r1, **protocol):
    return Cell(bench, label, label.split("[")[0], seed, {"R@1": r1}, {}, None, [], 1.0, protocol)


def _proto(direction="i2t", **kw):
    return {"batch_size": 64, "steps": 3, "weight_decay": 1e-4, "scoring": "tcr", "reset": "never", "lr": 1e-3,
            "direction": direction, "max_queries": None, **kw}


def test_report_says_which_protocol_its_cells_ran_under():
    default = [_cell("world-c/i2t/fog/5", "tcr", 0, 1.0, **_proto()),
               _cell("world-c/t2i/ocr/6", "rest", 0, 1.0, **_proto("t2i"))]
    assert protocol_notes(default) == ["Protocol: the defaults in every cell (docs/method.md §2: B = 64, 3 inner "
                                       "steps, adamw with weight decay 0.0001, scoring `tcr`, reset `never`, lr: each "
                                       "backbone's protocol rate (here lr 0.001))."]
    assert protocol_deviations(_proto(lr=1.0000000001e-3)) == {}
    # docs/method.md §2's CLIP rate is a deviation for the world model, and the report says so
    mixed = default + [_cell("world-c/i2t/fog/5", "tcr-lr3e-4", 0, 1.0, **_proto(lr=3e-4)),
                       _cell("world-c/i2t/snow/5", "tcr-lr3e-4", 0, 1.0, **_proto(lr=3e-4)),
                       _cell("world-c/i2t/snow/5", "rest[pre]", 0, 1.0, **_proto(scoring="pre", max_queries=6000,
                                                                                  n_queries=6000)),
                       _cell("world-c/i2t/fog/5", "rest", 1, 1.0, **_proto(max_queries=6000, n_queries=2000))]
    notes = protocol_notes(mixed)
    assert notes[0] == ("**Protocol differs from the defaults (docs/method.md §2: B = 64, 3 inner steps, adamw with "
                        "weight decay 0.0001, scoring `tcr`, reset `never`, lr: each backbone's protocol rate) in 3 "
                        "of 6 cells**: lr = 0.0003 (2 cells: tcr-lr3e-4); "
                        "scoring = pre (1 cell: rest[pre]). The other 3 cells use its defaults.")
    # suffixed labels sort with their method, not alphabetically after every named method
    assert _order(["zzz", "tcr-lr1e-3", "deyo-lr1e-3", "rest", "shot-im-lr1e-3", "source", "rest[x]"]) == \
        ["source", "shot-im-lr1e-3", "deyo-lr1e-3", "tcr-lr1e-3", "rest", "rest[x]", "zzz"]
    assert notes[1] == ("Streams longer than 6,000 queries subsampled to 6,000, evenly over their domains (a grid "
                        "setting): 1 cell.")  # the 2,000-query stream under the same cap is scored whole


def test_summary_family_means_seed_spread_and_change_against_source():
    cells = [_cell("world-clean/i2t", "source", 0, 50.0), _cell("world-clean/i2t", "rest", 0, 52.0),
             _cell("world-clean/i2t", "rest", 1, 54.0), _cell("world-clean/i2t", "tent", 0, 40.0)]
    for seed, (a, b) in enumerate([(10.0, 20.0), (14.0, 24.0)]):  # rest: family means 15 and 19 -> 17 ± 2
        cells += [_cell("world-c/i2t/fog/5", "rest", seed, a), _cell("world-c/i2t/snow/5", "rest", seed, b)]
    cells += [_cell("world-c/i2t/fog/5", "source", 0, 5.0), _cell("world-c/i2t/snow/5", "source", 0, 7.0),
              _cell("world-c/i2t/fog/5", "tent", 0, 9.0),  # tent lacks snow: no family mean
              _cell("world-c/i2t/fog/3", "source", 0, 30.0), _cell("world-c/i2t/fog/5", "eta", 0, 9.0)]
    cells += [_cell("world-diverse/i2t/mix8/order0", "rest", 0, 30.0)]  # streams stay out of the summary
    summary, delta = build_summary(cells)
    # severity 5 before 3; eta has no complete family and is left out
    assert summary.columns == ["clean i2t", "corruptions s5", "corruptions s3"]
    assert list(summary.rows) == ["source", "tent", "rest"]
    assert summary.rows["rest"][:2] == pytest.approx([53.0, 17.0]) and summary.spread["rest"][:2] == pytest.approx([1.0, 2.0])
    assert summary.rows["tent"] == [40.0, None, None] and summary.seeds == 2
    assert delta.columns == ["Δ clean i2t", "Δ corruptions s5", "Δ corruptions s3"] and "source" not in delta.rows
    assert delta.rows["rest"] == pytest.approx([3.0, 11.0, None]) and delta.rows["tent"] == [-10.0, None, None]
    assert "where ± is shown; other cells: fewer seeds" in table_markdown(summary)  # tent ran 1 seed
    md = table_markdown(delta)
    assert "| rest | **+3.0** | +11.0 | – |" in md and "| tent | -10.0 | – | – |" in md
    assert build_summary([c for c in cells if c.benchmark.endswith("/5")]) == []  # one family: no summary


def _write_cell(out, bench, label, seed, r1, n, lr=3e-4, clean_delta=None):
    G._atomic_json(G.cell_path(out, bench, label, seed), {
        "benchmark": bench, "label": label, "direction": "i2t", "n_queries": n, "max_queries": None,
        "config": {"method": label.split("-lr")[0], "seed": seed, "lr": lr, "batch_size": 64, "steps": 3,
                   "weight_decay": 1e-4, "scoring": "tcr", "reset": "never"},
        "metrics": {"R@1": r1}, "forgetting": None if clean_delta is None else {"clean_delta_R@1": clean_delta}})


def test_compare_grids_matches_cells_and_skips_unequal_streams(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_grids.py"
    spec = importlib.util.spec_from_file_location("compare_grids", path)
    cg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cg)
    a, b = tmp_path / "a", tmp_path / "b"
    for bench, r1a, r1b in (("world-c/i2t/fog/5", 10.0, 14.0), ("world-c/i2t/snow/5", 20.0, 21.0)):
        _write_cell(a, bench, "tcr", 0, r1a, 2000)
        _write_cell(b, bench, "tcr-lr1e-3", 0, r1b, 2000, lr=1e-3)
    _write_cell(a, "world-c/i2t/zoom_blur/5", "tcr", 0, 5.0, 2000)  # only in A: not in the means
    _write_cell(a, "world-diverse/i2t/mix8/order0", "tcr", 0, 20.0, 6000, clean_delta=-3.0)
    _write_cell(b, "world-diverse/i2t/mix8/order0", "tcr-lr1e-3", 0, 30.0, 8000, lr=1e-3, clean_delta=-1.0)
    res = cg.compare(a, b)
    r = res["rows"][("tcr", "Image corruptions, severity 5")]
    assert r["a"] == [10.0, 20.0] and r["b"] == [14.0, 21.0]
    assert ("tcr", "world-diverse/i2t/mix8") not in res["rows"]  # 6,000 vs 8,000 queries: not comparable
    assert res["skipped"] == ["tcr on world-diverse/i2t/mix8/order0 seed 0: 6000 vs 8000 queries"]
    assert res["only_a"] == 1 and res["only_b"] == 0
    md = cg.to_markdown(res, "a", "b")
    assert "| tcr | Image corruptions, severity 5 | 2 | 15.0 | 17.5 | +2.5 |  |  |" in md
    assert "lr = 0.0003" in md.splitlines()[0] and "the defaults in every cell" in md.splitlines()[1]
    # by label nothing matches (tcr vs tcr-lr1e-3)
    assert cg.compare(a, b, by="label")["rows"] == {}
