"""The grid cell store: compressed full cells out of git, the compact index ``cells.jsonl`` in git."""
import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from qshift.bench import grid as G
from qshift.bench import store
from qshift.bench.report import build_tables, load_cells, load_errors

MODEL = {"weights_sha256": "ab" * 32, "world_version": 1, "render_size": 192}


def _payload(bench="world-diverse/i2t/mix8/order0", label="rest", seed=0, r1=41.5, domains=("fog-5", "fog-5", "snow-5")):
    batches = [{"steps": [{"loss": 0.5 + i, "rem": 0.01}], "seconds": 0.1 * i, "batch": i, "domain": d, "size": 64,
                "R@1": r1 + i / 64} for i, d in enumerate(domains)]
    return {"benchmark": bench, "direction": "i2t",
            "config": {"method": label.split("[")[0].split("-")[0], "batch_size": 64, "steps": 3, "lr": 1e-3,
                       "seed": seed, "method_options": {}, "method_resolved": {"tau": 0.02}},
            "metrics": {"R@1": r1, "R@5": 60.25, "mAP": 50.123456789012345},
            "per_domain": {d: {"R@1": r1} for d in dict.fromkeys(domains)}, "source_clean": None,
            "forgetting": {"clean_delta_R@1": -1.25, "first_domain_delta_R@1": 0.5}, "batches": batches,
            "n_queries": 64 * len(domains), "n_gallery": 200, "seconds": 12.345678, "peak_rss_mb": 100.5,
            "environment": {"python": "3.11"}, "label": label, "grid_shift_seed": 0, "max_queries": None,
            "model": MODEL}


def _reduced(payload):
    """What an index line keeps of a cell: everything, with batches reduced to (domain, R@1)."""
    return {**payload, "batches": [{"domain": b["domain"], "R@1": b["R@1"]} for b in payload["batches"]],
            "_source": "index"}


def _index_only(src: Path, dst: Path) -> Path:
    """A fresh clone's view of a grid folder: everything but cells/."""
    shutil.copytree(src, dst, ignore=lambda d, names: ["cells"] if Path(d) == src else [])
    assert not (dst / "cells").exists() and (dst / "cells.jsonl").is_file()
    return dst


def test_round_trip_full_cells_and_index(tmp_path):
    out = tmp_path / "grid"
    p = _payload()
    path = store.write_cell(out, p["benchmark"], p["label"], 0, p)
    assert path == store.cell_path(out, p["benchmark"], "rest", 0) == G.cell_path(out, p["benchmark"], "rest", 0)
    assert path.name == "seed0.json.gz" and path.read_bytes()[:2] == b"\x1f\x8b"
    assert store.read_cell(path) == p
    assert json.loads(gzip.decompress(path.read_bytes())) == p  # plain gzip: `zcat` reads it
    store.write_index(out)
    line = json.loads((out / "cells.jsonl").read_text())
    assert "batches" not in line and line["trace"] == {"R@1": [b["R@1"] for b in p["batches"]],
                                                       "domain": [["fog-5", 2], ["snow-5", 1]]}
    assert [r for r in store.iter_cells(out)] == [p]  # the full cell wins
    clone = _index_only(out, tmp_path / "clone")
    (rec,) = store.iter_cells(clone)
    assert rec == _reduced(p)
    assert store.get_cell(store.cell_path(clone, p["benchmark"], "rest", 0)) == _reduced(p)
    # the report sees the same cells, with the batch records its plots use
    full, idx = load_cells(out, model=None), load_cells(clone, model=None)
    assert [c.batches for c in idx] == [[{"domain": b["domain"], "R@1": b["R@1"]} for b in p["batches"]]]
    for a, b in zip(full, idx):
        a.batches = b.batches
    assert full == idx
    assert build_tables(full) == build_tables(idx)


def test_legacy_uncompressed_cells_are_read_and_replaced(tmp_path):
    out = tmp_path / "grid"
    p = _payload(bench="world-c/i2t/fog/5", label="tent", domains=("fog-5",))
    legacy = out / "cells" / "world-c__i2t__fog__5" / "tent" / "seed0.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps(p, indent=1))
    gz = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0)
    assert not gz.exists() and store.read_cell(gz) == p == store.read_cell(legacy)  # either name reads it
    assert G._finished(gz) and list(store.iter_cells(out)) == [p] and len(load_cells(out, model=None)) == 1
    store.write_index(out)
    assert json.loads((out / "cells.jsonl").read_text())["benchmark"] == "world-c/i2t/fog/5"
    p2 = {**p, "metrics": {"R@1": 99.0}}
    store.write_cell(out, "world-c/i2t/fog/5", "tent", 0, p2)  # rewriting compresses it, the legacy file goes
    assert not legacy.exists() and store.read_cell(gz) == p2


def test_index_only_folder_resumes_as_finished(tmp_path):
    out = tmp_path / "grid"
    p = _payload(bench="world-c/i2t/fog/5", label="tent", domains=("fog-5",))
    p["config"]["method_resolved"] = {"a": 1}
    store.write_cell(out, p["benchmark"], "tent", 0, p)
    store.write_index(out)
    clone = _index_only(out, tmp_path / "clone")
    for folder in (out, clone):
        path = G.cell_path(folder, "world-c/i2t/fog/5", "tent", 0)
        assert G._finished(path, {"a": 1}, MODEL) and G._finished(store.get_cell(path), {"a": 1}, MODEL)
        assert not G._finished(path, {"a": 2}, MODEL)  # other method defaults: stale
        assert not G._finished(path, {"a": 1}, {**MODEL, "weights_sha256": "0" * 64})  # another model: stale
    assert not G._finished(G.cell_path(clone, "world-c/i2t/fog/5", "tent", 1))  # a cell never run
    assert not G._finished(None)
    # a half-written full cell is not finished; where the index holds the cell, its line is used
    bad = G.cell_path(out, "world-c/i2t/fog/5", "tent", 0)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError):
        store.read_cell(bad)
    assert G._finished(bad, {"a": 1}, MODEL)
    (out / "cells.jsonl").unlink()
    assert not G._finished(bad)
    with pytest.raises(FileNotFoundError, match="no grid results"):
        load_cells(tmp_path / "nothing")


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    p = _payload()
    path = store.write_cell(out, p["benchmark"], "rest", 0, p)
    store.write_index(out)
    before_cell, before_index = path.read_bytes(), (out / "cells.jsonl").read_bytes()
    real_write = gzip.GzipFile.write

    def dies_half_way(self, data):
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(gzip.GzipFile, "write", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        store.write_cell(out, p["benchmark"], "rest", 0, {**p, "metrics": {"R@1": 0.0}})
    with pytest.raises(OSError, match="disk full"):
        store.write_cell(out, p["benchmark"], "rest", 1, p)
    monkeypatch.undo()
    assert path.read_bytes() == before_cell and not store.cell_path(out, p["benchmark"], "rest", 1).exists()

    def dies_writing_text(self, text):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dies_writing_text)
    store.write_cell(out, p["benchmark"], "rest", 2, p)
    with pytest.raises(OSError, match="disk full"):
        store.write_index(out)
    monkeypatch.undo()
    assert (out / "cells.jsonl").read_bytes() == before_index
    assert not list(out.rglob("*.tmp"))  # no temporary left behind either


def test_index_is_sorted_deterministically_and_keeps_index_only_cells(tmp_path):
    out = tmp_path / "grid"
    keys = [(b, lbl, s) for b in ("world-c/i2t/fog/5", "world-c/i2t/fog/3", "world-clean/i2t")
            for lbl in ("rest", "rest-x", "rest[a]", "tcr") for s in (0, 1, 2, 10)]
    random.Random(0).shuffle(keys)
    for b, lbl, s in keys:
        store.write_cell(out, b, lbl, s, _payload(bench=b, label=lbl, seed=s, domains=("d",)))
    first = store.write_index(out).read_bytes()
    assert store.write_index(out).read_bytes() == first  # same cells, same bytes
    lines = [json.loads(x) for x in first.decode().splitlines()]
    got = [(x["benchmark"], x["label"], x["config"]["seed"]) for x in lines]
    # the order readers always had: that of the sorted paths cells/<bench>/<label>/seed<k>.json
    legacy = sorted(Path("cells", b.replace("/", "__"), lbl, f"seed{s}.json") for b, lbl, s in keys)
    assert [(x["benchmark"].replace("/", "__"), x["label"], f"seed{x['config']['seed']}.json") for x in lines] == \
        [p.parts[1:] for p in legacy]
    assert [(c.benchmark, c.label, c.seed) for c in load_cells(out, model=None)] == got
    # a clone (index only) reruns one cell: its line changes, every other line is kept as it was
    clone = _index_only(out, tmp_path / "clone")
    store.write_cell(clone, "world-c/i2t/fog/5", "tcr", 1, _payload("world-c/i2t/fog/5", "tcr", 1, r1=7.0, domains=("d",)))
    store.write_index(clone)
    new = (clone / "cells.jsonl").read_text().splitlines()
    old = first.decode().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    assert len(new) == len(old) and len(changed) == 1 and json.loads(new[changed[0]])["metrics"]["R@1"] == 7.0


def test_error_files_stay_readable_beside_the_cells(tmp_path):
    out = tmp_path / "grid"
    err = store.error_path(out, "world-c/i2t/fog/5", "tcr-bad", 0)
    assert err.name == "seed0.error.json" and err.parent == store.cell_path(out, "world-c/i2t/fog/5", "tcr-bad", 0).parent
    G._atomic_json(err, {"benchmark": "world-c/i2t/fog/5", "label": "tcr-bad", "seed": 0, "error": "ValueError()"})
    store.write_cell(out, "world-c/i2t/fog/5", "tent", 0, _payload("world-c/i2t/fog/5", "tent", domains=("d",)))
    store.write_index(out)
    assert [e["label"] for e in load_errors(out)] == ["tcr-bad"]
    assert [c["label"] for c in store.iter_cells(out)] == ["tent"]  # an error is not a cell
    assert len((out / "cells.jsonl").read_text().splitlines()) == 1
