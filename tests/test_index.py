"""The gallery index and top-K candidate mode (docs/large-galleries.md): exact where it says so, measured
where it approximates, tied to its gallery."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qshift
from qshift.data import world
from qshift.errors import UserError
from qshift.methods import create
from qshift.methods.guard import signals
from qshift.models.world_model import WorldRetrievalModel
from qshift.retrieval import index as index_mod
from qshift.retrieval.index import build_index, index_paths, load_index, save_index
from qshift.retrieval.metrics import candidate_ranks_and_ap, per_query_ranks_and_ap

faiss = pytest.importorskip("faiss")


def _gallery(n=2000, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def test_exact_index_is_topk_across_blocks(monkeypatch):
    gal = _gallery(1000)
    monkeypatch.setattr(index_mod, "_EXACT_BLOCK", 128)  # eight blocks and a partial one
    q = _gallery(40, seed=1)
    values, rows = build_index(gal).search(q, 25)
    ref = (q @ gal.T).topk(25, dim=1)
    torch.testing.assert_close(values, ref.values)
    assert torch.equal(rows, ref.indices)


def test_faiss_flat_is_exact_and_ivf_recall_is_high_with_enough_probes():
    gal, q = _gallery(), _gallery(64, seed=1)
    ref = (q @ gal.T).topk(10, dim=1).indices
    flat = build_index(gal, "Flat")
    assert flat.is_exact and torch.equal(flat.search(q, 10)[1], ref)
    ivf = build_index(gal, "IVF16,Flat", "nprobe=16")  # every list probed: exact
    assert torch.equal(ivf.search(q, 10)[1].sort(1).values, ref.sort(1).values)
    coarse = build_index(gal, "IVF16,Flat", "nprobe=1")
    found = (coarse.search(q, 10)[1][:, :, None] == ref[:, None, :]).any(2).float().mean()
    assert 0.05 < float(found) < 1.0  # one list of sixteen: approximate, and not empty


def test_saved_index_loads_only_for_its_own_gallery(tmp_path):
    gal = _gallery(500)
    path, sidecar = index_paths(tmp_path / "gallery.npy")
    assert path.name == "gallery.faiss" and sidecar.name == "gallery.faiss.json"
    save_index(build_index(gal, "IVF8,Flat", "nprobe=8"), path)
    back = load_index(path, gal)
    assert back.kind == "IVF8,Flat" and back.params == "nprobe=8"
    q = _gallery(5, seed=3)
    assert torch.equal(back.search(q, 5)[1], build_index(gal).search(q, 5)[1])
    other = gal.clone()
    other[0] = -other[0]
    with pytest.raises(UserError, match="other gallery embeddings"):
        load_index(path, other)
    with pytest.raises(UserError, match="sidecar"):
        load_index(tmp_path / "missing.faiss", gal)
    with pytest.raises(UserError, match="cannot build"):
        build_index(gal, "NotAnIndex42")
    with pytest.raises(UserError, match="do not fit"):
        build_index(gal, "Flat", "nprobe=4")
    with pytest.raises(UserError, match="dimensional"):
        back.search(torch.zeros(2, 7), 3)


@pytest.mark.parametrize("k, ties", [(60, True), (7, False), (25, False)])
def test_candidate_ranks_equal_whole_gallery_ranks_within_the_candidates(k, ties):
    torch.manual_seed(0)
    n, b = 60, 50
    gallery_ids = torch.randint(0, 12, (n,))
    query_ids = gallery_ids[torch.randint(0, n, (b,))]
    # with ties (they count against the query) the candidates are the whole gallery, as a cut through
    # tied scores would make which tied row is a candidate arbitrary
    scores = torch.randint(0, 6, (b, n)).float() if ties else torch.randn(b, n)
    full_r, full_ap = per_query_ranks_and_ap(scores, query_ids, gallery_ids)
    values, rows = scores.topk(k, dim=1)
    r, ap = candidate_ranks_and_ap(values, rows, query_ids, gallery_ids)
    inside = full_r < k
    assert torch.equal(r[inside], full_r[inside])
    assert bool((r[~inside] == n).all())
    if k == n:
        torch.testing.assert_close(ap, full_ap)
    else:
        assert bool((ap <= full_ap + 1e-12).all()) and bool((ap < full_ap).any())


def test_candidate_ranks_refuse_queries_without_positives():
    with pytest.raises(ValueError, match="no relevant"):
        candidate_ranks_and_ap(torch.ones(1, 2), torch.tensor([[0, 1]]), torch.tensor([9]), torch.tensor([0, 1]))


@pytest.fixture(scope="module")
def shipped_stream(shipped_model):
    split = world.generate_world(seed=21, n_images=96)
    rm = WorldRetrievalModel(shipped_model, "image")
    gallery = rm.encode_gallery(split.captions)
    imgs = shipped_model.preprocess_images(split.images())
    return rm, gallery, torch.as_tensor(split.caption_image), imgs


def _run(method, stream, batches=3, **kw):
    rm, gallery, gids, imgs = stream
    source = [p.detach().clone() for _, p in rm.adaptable_parameters()]
    m = create(method, rm, gallery, gallery_ids=gids, lr=1e-3, **kw)
    try:
        out = []
        for b in range(batches):
            s = m.adapt_batch(imgs[32 * b: 32 * b + 32])[0]
            out.append((s, m.last_cols))
        params = [p.detach().clone() for p in m.params]
    finally:
        with torch.no_grad():
            for (_, p), v in zip(rm.adaptable_parameters(), source):
                p.copy_(v)
    return out, params


@pytest.mark.parametrize("method", ["tcr", "rest"])
def test_tcr_and_rest_need_only_the_nearest_candidates(shipped_stream, method):
    """Their losses read each query's nearest gallery item only: top-K runs take the same steps."""
    full, p_full = _run(method, shipped_stream)
    topk, p_top = _run(method, shipped_stream, candidates=20)
    for a, b in zip(p_full, p_top):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for (s_full, _), (s_top, rows) in zip(full, topk):
        ref = s_full.topk(20, dim=1)
        torch.testing.assert_close(s_top, ref.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["tent", "eta", "sar", "shot-im", "read", "deyo"])
def test_entropy_baselines_run_over_the_candidates(shipped_stream, method):
    out, _ = _run(method, shipped_stream, batches=2, candidates=16)
    for s, rows in out:
        assert s.shape == rows.shape == (32, 16)
        assert bool(torch.isfinite(s).all())


def test_the_oracle_refuses_candidates(shipped_stream):
    rm, gallery, gids, _ = shipped_stream
    with pytest.raises(UserError, match="whole gallery"):
        create("oracle", rm, gallery, gallery_ids=gids, candidates=5)
    with pytest.raises(UserError, match="more than the gallery"):
        create("tcr", rm, gallery, gallery_ids=gids, candidates=len(gallery) + 1)


def test_guard_signals_in_top_k_mode_equal_the_whole_gallery_ones_when_k_is_n():
    torch.manual_seed(1)
    gal = _gallery(40, d=8)
    za, zs = _gallery(12, d=8, seed=2), _gallery(12, d=8, seed=3)
    adapted, source = za @ gal.T, zs @ gal.T
    full = signals(adapted, source)
    # the method's top-K path: adapted candidates, then the source's, duplicates masked in the source part
    a_rows, s_rows = adapted.topk(40, 1).indices, source.topk(40, 1).indices
    rows = torch.cat([a_rows, s_rows], 1)
    dup = torch.zeros_like(rows, dtype=torch.bool)
    dup[:, 40:] = True
    a = torch.cat([adapted.gather(1, a_rows), torch.full_like(adapted, float("-inf"))], 1)
    s = torch.cat([source.gather(1, a_rows), source.gather(1, s_rows)], 1).masked_fill(dup, float("-inf"))
    g = gal.double()
    mu, cov = g.mean(0), torch.cov(g.T)
    mean = zs.double() @ mu
    std = torch.einsum("bd,de,be->b", zs.double(), cov, zs.double()).sqrt()
    top = signals(a, s, rows=rows, source_mean=mean.float(), source_std=std.float())
    for key in full:
        assert top[key] == pytest.approx(full[key], abs=1e-6), key


def test_adapter_retrieves_gallery_ids_through_a_faiss_index(shipped_stream, tmp_path):
    rm, gallery, gids, imgs = shipped_stream
    idx = build_index(gallery, "Flat")
    with qshift.Adapter(rm, gallery, method="tcr", gallery_is_embedded=True, gallery_ids=gids, copy_model=True,
                        candidates=10, gallery_index=idx, reset="on-collapse") as ad:
        ids, scores = ad.retrieve(imgs[:16], k=5)
        assert ids.shape == scores.shape == (16, 5)
        assert ad.search(imgs[:16], k=5)[0].shape == (16, 5)
    assert float((ids[:, 0] == torch.arange(16)).float().mean()) > 0.3  # it retrieves
    with qshift.Adapter(rm, gallery, method="source", gallery_is_embedded=True, gallery_ids=gids,
                        copy_model=True) as whole, \
            qshift.Adapter(rm, gallery, method="source", gallery_is_embedded=True, gallery_ids=gids,
                           copy_model=True, candidates=10, index="Flat") as top:
        w_ids, w_scores = whole.search(imgs[:16], k=5)
        t_ids, t_scores = top.search(imgs[:16], k=5)
    torch.testing.assert_close(t_scores, w_scores, atol=1e-5, rtol=0)
    assert bool((t_ids == w_ids).float().mean() > 0.95)


def _png(a: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _saved_gallery(tmp_path, model):
    from qshift.data.world import load_split

    split = load_split("test1k")
    captions = [c for c, k in zip(split.captions, split.caption_image) if k < 40]
    with torch.no_grad():
        emb = model.encode_gallery(captions).numpy()
    path = tmp_path / "gallery.npy"
    np.save(path, emb)
    return path, split


def test_index_build_writes_an_index_beside_the_embeddings_and_serve_searches_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from qshift.cli import app

    model = qshift.load_model("world", "i2t")
    path, split = _saved_gallery(tmp_path, model)
    runner = CliRunner()
    res = runner.invoke(app, ["index", "build", str(path), "--index", "IVF4,Flat", "--params", "nprobe=4", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["recall@10"] == 1.0 and summary["ntotal"] == 200  # every list probed: exact
    assert (tmp_path / "gallery.faiss").is_file() and (tmp_path / "gallery.faiss.json").is_file()
    bad = runner.invoke(app, ["index", "build", str(tmp_path / "nope.npy")])
    assert bad.exit_code == 2 and "error:" in bad.stderr and "not found" in bad.stderr
    np.save(tmp_path / "raw.npy", np.ones((5, 4), dtype=np.float32))
    bad = runner.invoke(app, ["index", "build", str(tmp_path / "raw.npy")])
    assert bad.exit_code == 2 and "L2-normalised" in bad.stderr

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qshift.serve.app import create_app
    from qshift.serve.service import ServeSpec, build_service

    svc = build_service(ServeSpec(method="tcr", settings=["candidates=20", "batch_size=4"], model="world",
                                  direction="i2t", gallery_embeddings=str(path)))
    assert svc.adapter.method.index.kind == "IVF4,Flat"
    images = split.images(list(range(4)))
    with TestClient(create_app(svc)) as client:
        r = client.post("/v1/retrieve", json={"queries": [{"image": _png(a), "id": str(i)}
                                                          for i, a in enumerate(images)], "k": 5})
    assert r.status_code == 200, r.text
    answers = r.json()["results"]
    assert all(len(q["ids"]) == 5 for q in answers)
    # the ids are gallery rows (row numbers, no --gallery-ids): caption row // 5 is the image
    assert sum(int(q["ids"][0]) // 5 == i for i, q in enumerate(answers)) >= 2
    # another gallery: the saved index is refused, naming it
    np.save(path, np.roll(np.load(path), 1, axis=0))
    with pytest.raises(UserError, match="other gallery embeddings"):
        build_service(ServeSpec(method="tcr", settings=["candidates=20"], model="world", direction="i2t",
                                gallery_embeddings=str(path)))


def test_a_top_k_run_records_ranks_and_top_rows_and_matches_the_exact_run(shipped_model):
    from qshift.data.streams import QuerySet, sequential_stream
    from qshift.engine import RECORD_TOP, RunConfig, run_online
    from qshift.options import Protocol

    split = world.generate_world(seed=23, n_images=64)
    rm = WorldRetrievalModel(shipped_model, "image")
    images = split.images()

    class Task:
        name, direction = "tiny-topk", "i2t"
        query_sets = [QuerySet("a", images[:32], np.arange(32)), QuerySet("b", images[32:], np.arange(32, 64))]
        gallery, gallery_ids = split.captions, np.asarray(split.caption_image)
        clean_queries = QuerySet("clean", images, np.arange(64))

        def stream(self, batch_size, seed):
            return sequential_stream(self.query_sets, batch_size, seed)

    source = [p.detach().clone() for _, p in rm.adaptable_parameters()]
    runs = {}
    for k in (0, 20):
        runs[k] = run_online(rm, Task(), RunConfig("tcr", Protocol(batch_size=16, lr=1e-3, candidates=k)),
                             progress=False)
        with torch.no_grad():
            for (_, p), v in zip(rm.adaptable_parameters(), source):
                p.copy_(v)
    exact, top = runs[0], runs[20]
    assert exact.search is None and top.search["candidates"] == 20 and top.search["exact"]
    for key in ("R@1", "R@5", "R@10"):
        assert top.metrics[key] == pytest.approx(exact.metrics[key], abs=1e-9)
    assert top.forgetting["clean_delta_R@1"] == pytest.approx(exact.forgetting["clean_delta_R@1"], abs=1e-9)
    for a, b in zip(exact.batches, top.batches):
        assert len(a["ranks"]) == a["size"] and len(a["top"][0]) == RECORD_TOP
        assert a["top"] == b["top"]
        assert [r for r in a["ranks"] if r < 20] == [r for r in b["ranks"] if r < 20]
    assert top.metrics["mAP"] <= exact.metrics["mAP"] + 1e-9


def test_index_settings_fail_before_any_work():
    from qshift.engine import parse_settings

    with pytest.raises(UserError, match="could not parse"):
        parse_settings("tcr", ["candidates=10", "index=NotAnIndex"])
    with pytest.raises(UserError, match="no search parameters"):
        parse_settings("tcr", ["candidates=10", "index_params=nprobe=4"])
    with pytest.raises(ValueError, match="needs the whole gallery"):
        parse_settings("oracle", ["candidates=10"])
    cfg = parse_settings("rest", ["candidates=10", "index=IVF8,Flat", "index_params=nprobe=2"])
    assert cfg.protocol.candidates == 10 and cfg.protocol.index == "IVF8,Flat"
