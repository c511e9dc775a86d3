"""Nothing run, nothing lost, nothing silent: state files, result files, non-finite outputs, early
validation, adapters that own their state, and the collapse guard."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import qshift
from qshift.api import StateFileError
from qshift.atomic import atomic_path, clean_stale_tmp, prepare_output_dir
from qshift.bench import grid as G
from qshift.cli import app
from qshift.data import world
from qshift.engine import RunConfig, parse_settings, result_filename, run_online
from qshift.errors import NonFiniteError, UserError
from qshift.methods import create
from qshift.methods.guard import CollapseGuard, distinct_top1, signals, spread
from qshift.models.world_model import WorldDualEncoder, WorldRetrievalModel
from qshift.options import Protocol

runner = CliRunner()


@pytest.fixture
def world_split():
    return world.generate_world(seed=9, n_images=32)


@pytest.fixture
def adapter(tiny_model, world_split):
    model = WorldRetrievalModel(tiny_model, "image")
    ad = qshift.Adapter(model, world_split.captions, method="tcr", gallery_ids=world_split.caption_image, lr=1e-2)
    yield ad
    ad.close()


def _params(ad):
    return [p.detach().clone() for p in ad.method.params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------ state files

class _Payload:
    """A pickle that runs code when it is unpickled (what a crafted state file does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_state_file_with_code_in_it_is_refused_and_nothing_runs(adapter, world_split, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 2, "state": _Payload(marker)}, evil)
    before = _params(adapter)
    with pytest.raises(StateFileError, match="refused.*nothing in it was run"):
        adapter.load_state(evil)
    assert not marker.exists() and _same(before, _params(adapter))


def test_the_saved_state_loads_with_weights_only(adapter, world_split, tmp_path):
    adapter.retrieve(world_split.images()[:8])
    path = adapter.save_state(tmp_path / "s.pt")
    payload = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert payload["format"] == 2 and payload["method"] == "tcr" and "queue" in payload["state"]["extra"]


def _tamper(adapter, tmp_path, edit):
    path = adapter.save_state(tmp_path / "s.pt")
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["state"]["extra"].pop("queue"), "does not fit|queue"),
    (lambda p: [p["state"]["params"].pop(k) for k in list(p["state"]["params"])[-2:]], "do not match"),
    (lambda p: [p["parameters"].pop(k) for k in list(p["parameters"])[-2:]], "other adaptable parameters"),
    (lambda p: next(iter(p["state"]["params"].values())).fill_(float("nan")), "NaN or inf"),
    (lambda p: p.update(format=1), "unsupported state format"),
    (lambda p: p.update(gallery="0" * 16), "different gallery"),
    (lambda p: p.pop("state"), "lacks"),
])
def test_a_bad_state_file_leaves_the_adapter_untouched(adapter, world_split, tmp_path, edit, message):
    imgs = world_split.images()
    adapter.retrieve(imgs[:8])
    path = _tamper(adapter, tmp_path, edit)
    adapter.retrieve(imgs[8:16])
    before, seen = _params(adapter), adapter.method.batches_seen
    queue = adapter.method.queue.state_dict()
    with pytest.raises(StateFileError, match=message):
        adapter.load_state(path)
    assert _same(before, _params(adapter)) and adapter.method.batches_seen == seen
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(queue.values(), adapter.method.queue.state_dict().values()))


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", None])
def test_a_corrupt_state_file_is_one_clear_error(adapter, tmp_path, content):
    path = tmp_path / "s.pt"
    if content is None:  # truncated
        adapter.save_state(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(StateFileError, match="not a readable state file|refused"):
        adapter.load_state(path)


# ------------------------------------------------------------------------------------------ result files

def _cfg_record(lr):
    return RunConfig("tcr", Protocol.build({"lr": lr}))


def test_result_names_differ_when_the_config_does(tiny_model):
    task = world.generate_world(seed=3, n_images=16)
    del task
    from types import SimpleNamespace

    model = WorldRetrievalModel(tiny_model, "image")
    a = SimpleNamespace(benchmark="world-c/i2t/fog/5", config=_cfg_record(1e-3).record(model), model={"m": 1},
                        shift_seed=0)
    b = SimpleNamespace(benchmark="world-c/i2t/fog/5", config=_cfg_record(3e-4).record(model), model={"m": 1},
                        shift_seed=0)
    c = SimpleNamespace(**{**vars(a), "shift_seed": 1})
    names = {result_filename(x) for x in (a, b, c)}
    assert len(names) == 3 and all(n.startswith("world-c__i2t__fog__5__tcr__seed0__") for n in names)
    assert result_filename(a) == result_filename(SimpleNamespace(**vars(a)))  # a rerun replaces its own file


def test_the_output_folder_is_checked_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_output_dir(afile)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            with pytest.raises(ValueError, match="cannot write"):
                prepare_output_dir(ro / "sub")
    finally:
        ro.chmod(0o700)
    t0 = time.perf_counter()
    res = runner.invoke(app, ["run", "--method", "source", "--benchmark", "world-c/i2t/fog/5", "--out", str(afile)])
    assert res.exit_code == 2 and "is a file" in res.output and time.perf_counter() - t0 < 30


def test_stale_temporary_files_are_cleaned(tmp_path):
    dead = tmp_path / "cell.json.999999999.tmp"  # no such process
    dead.write_text("{")
    live = tmp_path / f"cell.json.{os.getpid()}.tmp"
    live.write_text("{")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    assert clean_stale_tmp(tmp_path) == [dead]
    assert live.exists() and keep.exists()
    live.unlink()
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{")
            raise RuntimeError("crash")
    assert not list(tmp_path.glob("x.json*"))


# ------------------------------------------------------------------------------------ finite or an error

def test_source_and_search_refuse_nan_scores(tiny_model, world_split):
    model = WorldRetrievalModel(tiny_model, "image")
    imgs = tiny_model.preprocess_images(world_split.images()[:4]).clone()
    imgs[0, 0, 0, 0] = float("nan")
    src = create("source", model, model.encode_gallery(world_split.captions))
    with pytest.raises(NonFiniteError, match="non-finite scores"):
        src.adapt_batch(imgs)
    with qshift.Adapter(model, world_split.captions, method="tcr") as ad:
        with pytest.raises(NonFiniteError):
            ad.search(imgs)
        with pytest.raises(NonFiniteError):
            ad.retrieve(imgs)


@pytest.mark.parametrize("name", ["eta", "deyo", "tent"])
def test_an_update_that_overflows_the_parameters_is_rolled_back_and_the_adapter_goes_on(tiny_model, world_split,
                                                                                       name):
    model = WorldRetrievalModel(tiny_model, "image")
    imgs = world_split.images()
    with qshift.Adapter(model, world_split.captions, method=name, lr=1e-2, optimizer="sgd", momentum=0.0) as ad:
        ad.retrieve(imgs[:8])
        before = _params(ad)
        # an lr that sends the parameters to inf in one step
        for g in ad.method.optimizer.param_groups:
            g["lr"] = 1e38
        try:
            ad.retrieve(imgs[8:16])
            overflowed = False
        except NonFiniteError as e:
            overflowed = True
            assert "parameters became non-finite after the update" in str(e) or "non-finite" in str(e)
        for g in ad.method.optimizer.param_groups:
            g["lr"] = 1e-2
        if overflowed:
            assert _same(before, _params(ad))
        ids, scores = ad.retrieve(imgs[16:24])  # still usable
        assert torch.isfinite(scores).all()


def test_a_nan_parameter_after_the_last_step_is_caught(tiny_model, world_split):
    model = WorldRetrievalModel(tiny_model, "image")
    with qshift.Adapter(model, world_split.captions, method="tent", lr=1e-3) as ad:
        before = _params(ad)
        step = ad.method.optimizer.step

        def poisoned_step(*a, **k):
            step(*a, **k)
            with torch.no_grad():
                ad.method.params[0].fill_(float("inf"))
        ad.method.optimizer.step = poisoned_step
        with pytest.raises(NonFiniteError, match="parameters became non-finite after the update.*rolled back"):
            ad.retrieve(world_split.images()[:8])
        assert _same(before, _params(ad))


# ------------------------------------------------------------------------------------ validation first

@pytest.mark.parametrize("settings, message", [
    (["lr=nan"], "finite"), (["lr=inf"], "finite"), (["batch_size=100000"], "≤ 4096"),
    (["scoring=bogus"], "scoring"), (["lambda_zz=1"], "unknown setting"), (["steps=0"], "steps"),
    (["reset=sometimes"], "reset"), (["collapse_ratio=2"], "collapse_ratio"),
])
def test_bad_settings_fail_before_any_data_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        parse_settings("tcr", settings)


def test_unknown_method_and_bad_settings_exit_2_in_seconds():
    for args in (["--method", "nosuch"], ["--method", "tcr", "--set", "lr=nan"],
                 ["--method", "tcr", "--set", "scoring=bogus"], ["--method", "tcr", "--set", "batch_size=100000"]):
        t0 = time.perf_counter()
        res = runner.invoke(app, ["run", *args, "--benchmark", "world-c/i2t/fog/5"])
        assert res.exit_code == 2 and "error:" in res.output, res.output
        assert time.perf_counter() - t0 < 20  # nothing was built


def _grid_file(tmp_path, text):
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("methods: [tcr\nbenchmarks: [world-clean/i2t]\n", "not a valid grid YAML file.*line"),
    ("methods: [tcr]\nbenchmarks: [world-clean/i2t]\nx: !!python/object/apply:os.system ['true']\n",
     "not a valid grid YAML file"),
    ("methods: []\nbenchmarks: [world-clean/i2t]\n", "methods"),
    ("methods: [tcr]\nbenchmarks: []\n", "benchmarks"),
    ("methods: [tcr]\nbenchmarks: [world-clean/i2t]\nonly: [tcr]\n", "'only' must map"),
    ("methods: [tcr]\nbenchmarks: [world-clean/i2t]\nonly: {'world-c/*': [tcr]}\n", "matches none"),
    ("methods: [tcr]\nbenchmarks: [world-clean/i2t]\nonly: {'world-clean/*': [rest]}\n", "not in the grid"),
    ("methods: [{name: tcr, label: ../../escape}]\nbenchmarks: [world-clean/i2t]\n", "label"),
    ("methods: [tcr]\nbenchmarks: [world-clean/i2t]\nseeds: [zero]\n", "seeds"),
])
def test_bad_grid_files_are_one_error_before_any_cell(tmp_path, text, message):
    path = _grid_file(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        spec, only = G.load_grid(path)
        G.plan(spec, only)
    res = runner.invoke(app, ["bench", "--grid", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.startswith("error:") and "Traceback" not in res.output
    assert not (tmp_path / "escape").exists()


def test_a_checkpoint_whose_tensors_do_not_fit_is_one_error(tiny_model, tmp_path):
    path = tmp_path / "w.pt"
    tiny_model.save(path) if hasattr(tiny_model, "save") else None
    payload = torch.load(path, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.ndim == 2)
    payload["state_dict"][key] = torch.zeros(3, 3)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not match its config"):
        WorldDualEncoder.load(path)
    res = runner.invoke(app, ["eval", "--weights", str(path)])
    assert res.exit_code == 2 and "do not match its config" in res.output


def test_an_embedded_gallery_of_the_wrong_dimension_is_refused_at_once(tiny_model):
    model = WorldRetrievalModel(tiny_model, "image")
    wrong = torch.nn.functional.normalize(torch.randn(10, 7), dim=1)
    with pytest.raises(UserError, match="dimension 7, the model embeds in 16"):
        qshift.Adapter(model, wrong, gallery_is_embedded=True)


# ---------------------------------------------------------------------------- adapters own their state

def test_two_adapters_on_one_model_copy_or_refuse(tiny_model, world_split):
    model = WorldRetrievalModel(tiny_model, "image")
    source = [p.detach().clone() for _, p in model.adaptable_parameters()]
    imgs = world_split.images()
    first = qshift.Adapter(model, world_split.captions, method="tent", lr=1e-2)
    first.retrieve(imgs[:16])
    with pytest.raises(UserError, match="already adapted by another Adapter"):
        qshift.Adapter(model, world_split.captions, method="tent")
    second = qshift.Adapter(model, world_split.captions, method="tent", lr=1e-2, copy_model=True)
    assert _same(second.method.source_state, first.method.source_state)  # the true source, not adapted weights
    second.retrieve(imgs[16:])
    second.reset()
    assert _same(_params(second), source)
    first.close()
    assert _same([p.detach() for _, p in model.adaptable_parameters()], source)
    third = qshift.Adapter(model, world_split.captions, method="tcr")  # released by close()
    third.close()


# ----------------------------------------------------------------------------------------- collapse guard

def test_the_guard_signals():
    g = CollapseGuard(window=2, ratio=0.5, signal="diversity")
    diverse = torch.eye(8)
    one = torch.zeros(8, 8)
    one[:, 3] = 1
    assert distinct_top1(diverse) == 8 and distinct_top1(one) == 1
    source = torch.eye(8)
    source[0, 3] = source[1, 3] = 0.5  # item 3 is second for queries 0 and 1
    sig = signals(one, source, k=2)
    assert sig["diversity"] == 1 / 8 and sig["agreement"] == 1 / 8  # only query 3's top-1 is the source's
    assert sig["containment"] == 3 / 8  # in the source's top 2 for queries 0, 1 and 3
    assert not g.observe(diverse, diverse)["collapsed"]
    assert not g.observe(one, diverse)["collapsed"]  # window mean (1 + 1/8) / 2 is above 0.5
    assert g.observe(one, diverse)["collapsed"] and g.fired == 1 and not g.history
    with pytest.raises(ValueError, match="collapse signal"):
        CollapseGuard(window=2, ratio=0.5, signal="vibes")


def test_the_spread_signal_sees_queries_pulled_together_and_pushed_apart():
    torch.manual_seed(0)
    zs = torch.nn.functional.normalize(torch.randn(16, 12), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(30, 12), dim=1)
    common = torch.nn.functional.normalize(torch.randn(1, 12), dim=1)
    pulled = torch.nn.functional.normalize(zs + 2.0 * common, dim=1)  # a collapse towards one direction
    kw = {"z_source": zs}
    assert spread(zs) == pytest.approx(1 - float((zs @ zs.T).fill_diagonal_(0).sum()) / (16 * 15))
    assert signals(zs @ gallery.T, zs @ gallery.T, z_adapted=zs, **kw)["spread"] == pytest.approx(1.0)
    assert signals(pulled @ gallery.T, zs @ gallery.T, z_adapted=pulled, **kw)["spread"] < 0.5
    # adaptation that separates noise-blurred source queries again reads above 1
    assert signals(zs @ gallery.T, pulled @ gallery.T, z_adapted=zs, z_source=pulled)["spread"] > 2.0
    assert signals(zs @ gallery.T, zs @ gallery.T)["spread"] == 1.0  # no embeddings: no evidence
    g = CollapseGuard(window=2, ratio=0.9, signal="spread")
    assert not g.observe(zs @ gallery.T, zs @ gallery.T, z_adapted=zs, **kw)["collapsed"]
    assert g.observe(pulled @ gallery.T, zs @ gallery.T, z_adapted=pulled, **kw)["collapsed"]
    assert g.fired == 1 and CollapseGuard(window=1, ratio=0.5).signal == "spread"


@pytest.mark.slow
def test_the_guard_fires_on_a_collapsing_tent_and_resets_to_source(shipped_model, world_split):
    model = WorldRetrievalModel(shipped_model, "image")  # trained: its source top-1 is diverse
    gallery = model.encode_gallery(world_split.captions)
    imgs = world_split.images()
    m = create("tent", model, gallery, lr=0.5, reset="on-collapse", collapse_window=2)  # default signal, threshold
    assert (m.guard.signal, m.guard.ratio) == ("spread", Protocol().collapse_ratio)
    try:
        fired, ratios = [], []
        for k in range(8):
            _, rec = m.adapt_batch(imgs[(8 * k) % 32: (8 * k) % 32 + 8])
            fired.append(rec.get("collapse_reset", False))
            ratios.append(rec["guard"]["spread"])
        assert min(ratios) < m.guard.ratio and any(fired) and m.guard.fired == sum(fired)
        assert m.batches_seen == 8  # the counters survive the resets
        # the same collapse with the guard off: nothing resets
        m_off = create("tent", model, gallery, lr=0.5)
        recs = [m_off.adapt_batch(imgs[:8])[1] for _ in range(4)]
        assert m_off.guard is None and not any("guard" in r or r.get("collapse_reset") for r in recs)
        m_off.reset()
    finally:
        m.reset()
    assert _same(m.params, m.source_state)


@pytest.mark.slow
def test_the_guard_never_fires_on_a_healthy_tcr_run(shipped_model):
    from qshift.bench.registry import build_benchmark

    task = build_benchmark("world-clean/i2t", split="val", max_queries=640)
    model = WorldRetrievalModel(shipped_model, "image")
    res = run_online(model, task, RunConfig("tcr", Protocol.build({"reset": "on-collapse"})), progress=False)
    assert res.collapse_resets == 0 and all("guard" in b for b in res.batches)
    assert json.loads(json.dumps(res.as_json(), default=str))["collapse_resets"] == 0


@pytest.mark.slow
def test_run_out_keeps_both_configs_and_prints_metrics_when_writing_fails(tmp_path, monkeypatch):
    from qshift.engine import RunResult

    out = tmp_path / "runs"
    base = ["run", "--method", "tent", "--benchmark", "world-clean/i2t", "--max-queries", "64", "--json",
            "--out", str(out)]
    first = runner.invoke(app, [*base, "--set", "lr=1e-3"])
    second = runner.invoke(app, [*base, "--set", "lr=3e-4"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    files = sorted(out.glob("*.json"))
    assert len(files) == 2 and {json.loads(f.read_text())["config"]["lr"] for f in files} == {1e-3, 3e-4}
    assert all(json.loads(f.read_text())["model"]["weights_sha256"] for f in files)

    def refuse(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(RunResult, "save", refuse)
    failed = runner.invoke(app, [*base, "--set", "lr=1e-4"])
    assert failed.exit_code == 1 and '"R@1"' in failed.stdout  # the metrics came out first
    assert "could not be written" in failed.output and "No space left" in failed.output
    assert len(list(out.glob("*.json"))) == 2
