"""qshift serve: the app in-process (TestClient), and one real server on 127.0.0.1 (slow)."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

import qshift  # noqa: E402
from qshift.data.world import load_split  # noqa: E402
from qshift.errors import NonFiniteError, UserError  # noqa: E402
from qshift.serve.app import AppSettings, create_app  # noqa: E402
from qshift.serve.batcher import Batcher, Unavailable  # noqa: E402
from qshift.serve.checkpoints import CheckpointRefused, CheckpointStore  # noqa: E402
from qshift.serve.inputs import InputLimits  # noqa: E402
from qshift.serve.service import Service, service_identity  # noqa: E402

B = 4
ROOT = Path(__file__).resolve().parents[1]


def _png(a: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def world():
    """The world model (i2t), a 200-caption gallery (the first 40 images' captions) and 16 query images."""
    split = load_split("test1k")
    model = qshift.load_model("world", "i2t")
    captions = [c for c, k in zip(split.captions, split.caption_image) if k < 40]
    with torch.no_grad():
        emb = model.encode_gallery(captions)
    images = split.images(list(range(16)))
    return SimpleNamespace(model=model, emb=emb, ids=[f"cap{i}" for i in range(len(captions))], images=images,
                           b64=[_png(a) for a in images])


def make_service(world, method="tent", *, store=None, checkpoint_every=0, emb=None, limits=None, batch_size=B,
                 **config):
    config = {"steps": 1, "reset": "on-collapse", **config}
    emb = world.emb if emb is None else emb
    adapter = qshift.Adapter(world.model, emb, method, gallery_is_embedded=True, copy_model=True, **config)
    ids = world.ids[:len(emb)]
    identity = service_identity({"spec": "world"}, "i2t", {"source": "test"}, adapter)
    store = None if store is None else CheckpointStore(store, identity)
    return Service(adapter, ids, identity, batch_size=batch_size, store=store, checkpoint_every=checkpoint_every,
                   limits=limits)


def params(service):
    return [p.detach().clone() for p in service.adapter.method.params]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def body(world, rows, k=5):
    return {"queries": [{"image": world.b64[i], "id": str(i)} for i in rows], "k": k}


def test_retrieve_equals_a_plain_adapter_batch_by_batch(world):
    svc = make_service(world, "rest")
    plain = qshift.Adapter(world.model, world.emb, "rest", gallery_is_embedded=True, copy_model=True,
                           **svc.adapter.config)
    with TestClient(create_app(svc)) as client:
        for j in range(3):  # B-sized requests, one at a time: one batch each, in order
            rows = list(range(B * j, B * j + B))
            r = client.post("/v1/retrieve", json=body(world, rows, k=5))
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["batches"] == [j + 1] and out["k"] == 5
            assert [q["id"] for q in out["results"]] == [str(i) for i in rows]
            ids, scores = plain.retrieve(world.images[rows], k=5)
            for q, want_ids, want_scores in zip(out["results"], ids.tolist(), scores.tolist()):
                assert len(q["ids"]) == len(q["scores"]) == 5
                assert q["ids"] == [world.ids[i] for i in want_ids]
                assert q["scores"] == pytest.approx(want_scores, abs=1e-6)
        assert same(params(svc), [p.detach() for p in plain.method.params])
        status = client.get("/v1/status").json()
    assert status["batches"] == 3 and status["queries"] == 3 * B and status["method"] == "rest"
    assert status["protocol"]["batch_size"] == B and status["collapse_guard"]["enabled"]


def test_concurrent_requests_coalesce_and_each_gets_its_own_answer(world):
    """Requests of 1-5 queries at once: fewer batches than requests, some split over two batches, and
    each answer is its own queries' (the source method ranks each query independently of its batch)."""
    svc = make_service(world, "source")
    sizes = [1, 3, 2, 5, 1, 2, 1, 1]  # the 5 cannot fit one batch of B = 4
    starts = np.cumsum([0] + sizes[:-1])
    results: dict[int, object] = {}
    with TestClient(create_app(svc, AppSettings(max_wait_ms=300))) as client:
        gate = threading.Barrier(len(sizes))

        def send(n: int) -> None:
            gate.wait()
            rows = [int(r) % 16 for r in range(starts[n], starts[n] + sizes[n])]
            results[n] = (rows, client.post("/v1/retrieve", json=body(world, rows, k=3)))

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        status = client.get("/v1/status").json()
    assert len(results) == len(sizes)
    assert all(r.status_code == 200 for _, r in results.values()), [r.text for _, r in results.values()]
    assert status["batches"] < len(sizes) and status["queries"] == sum(sizes)
    assert any(len(r.json()["batches"]) == 2 for _, r in results.values())  # a request split over two batches
    for rows, r in results.values():
        ids, scores = svc.adapter.search(world.images[rows], k=3)
        got = r.json()["results"]
        assert [q["id"] for q in got] == [str(i) for i in rows]
        for q, want_ids, want_scores in zip(got, ids.tolist(), scores.tolist()):
            assert q["scores"] == pytest.approx(want_scores, abs=1e-5)
            assert q["ids"][0] == world.ids[want_ids[0]]


def test_bad_inputs_are_4xx_naming_the_field_and_leave_the_adapter_unchanged(world, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(world.images[0]).save(root / "q.png")
    Image.fromarray(world.images[1]).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    svc = make_service(world, "rest", limits=InputLimits(image_root=root))
    before = params(svc)
    gif = io.BytesIO()
    Image.fromarray(world.images[0]).save(gif, "GIF")
    cases = [
        ('{"queries": [', 400, "body"),
        ('{"queries": []}', 422, "queries"),
        ('{"queries": "x"}', 422, "queries"),
        ('{"queries": [{"image": 5}]}', 422, "queries[0].image"),
        ('{"queries": [{"image": "aGVsbG8="}], "k": "3"}', 422, "k"),
        ('{"queries": [{"image": "aGVsbG8="}], "k": 0}', 422, "k"),
        ('{"queries": [{"image": "aGVsbG8="}], "k": 1000}', 422, "k"),
        ('{"queries": [{"image": "aGVsbG8=", "colour": 1}]}', 422, "queries[0].colour"),
        ('{"queries": [{"image": "aGVsbG8=", "text": "a"}]}', 422, "queries[0]"),
        ('{"queries": [{"text": "a red circle"}]}', 422, "queries[0]"),
        (json.dumps({"queries": [{"image": world.b64[0]}, {"image": "%%%"}]}), 422, "queries[1].image"),
        ('{"queries": [{"image": "aGVsbG8="}]}', 422, "queries[0].image"),
        (json.dumps({"queries": [{"image": base64.b64encode(gif.getvalue()).decode()}]}), 422, "queries[0].image"),
        (json.dumps({"queries": [{"image": _png(np.zeros((100, 100, 3), np.uint8))}]}), 422, "queries[0].image"),
        (json.dumps({"queries": [{"image": world.b64[0]}] * 9}), 422, "queries"),
        ('{"queries": [{"path": "../outside.png"}]}', 403, "queries[0].path"),
        (json.dumps({"queries": [{"path": str(tmp_path / "outside.png")}]}), 403, "queries[0].path"),
        ('{"queries": [{"path": "link.png"}]}', 403, "queries[0].path"),
        ('{"queries": [{"path": "missing.png"}]}', 404, "queries[0].path"),
        ("x" * 2_000_001, 413, "body"),
    ]
    settings = AppSettings(max_request_queries=8, max_body_bytes=2_000_000)
    with TestClient(create_app(svc, settings)) as client:
        for text, code, field in cases:
            r = client.post("/v1/retrieve", content=text, headers={"content-type": "application/json"})
            assert r.status_code == code, (text[:80], r.status_code, r.text[:300])
            out = r.json()
            assert out["field"] == field and out["status"] == code and out["error"], (text[:80], out)
        assert same(before, params(svc))
        assert client.get("/v1/status").json()["batches"] == 0
        ok = client.post("/v1/retrieve", json={"queries": [{"path": "q.png"}, {"image": _png(world.images[2], "JPEG")}]})
        assert ok.status_code == 200 and client.get("/v1/status").json()["batches"] == 1


def test_a_full_queue_is_429_with_retry_after_and_a_stopped_worker_503(world):
    svc = make_service(world, batch_size=64)
    with TestClient(create_app(svc, AppSettings(max_queue=4, max_wait_ms=20_000))) as client:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", client.post("/v1/retrieve", json=body(world, range(4)))))
        t.start()
        deadline = time.time() + 30
        while client.get("/v1/status").json()["queue"]["queries"] < 4 and time.time() < deadline:
            time.sleep(0.05)
        r = client.post("/v1/retrieve", json=body(world, [5]))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["error"]
        assert client.post("/v1/reset").status_code == 200  # an operation behind the queued batch: it runs at once
        t.join(30)
        assert first["r"].status_code == 200 and first["r"].json()["batches"] == [1]
    batcher = Batcher(make_service(world))
    batcher.start()
    batcher.close()
    with pytest.raises(Unavailable):
        batcher.submit([world.images[0]], 1)


def test_reset_restores_the_source_and_a_failed_batch_is_a_500_with_the_reason(world, monkeypatch):
    svc = make_service(world, "tent")
    source = [s.clone() for s in svc.adapter.method.source_state]
    digest0 = svc.state_digest
    with TestClient(create_app(svc)) as client:
        assert client.post("/v1/retrieve", json=body(world, range(4))).status_code == 200
        assert not same(source, params(svc))
        r = client.post("/v1/reset")
        assert r.status_code == 200 and r.json()["state_digest"] == digest0
        assert same(source, params(svc))

        def broken(batch):
            raise NonFiniteError("tent: non-finite loss at batch 0, step 0; the batch's updates were rolled back")

        monkeypatch.setattr(svc.adapter, "adapt", broken)
        r = client.post("/v1/retrieve", json=body(world, range(4)))
        assert r.status_code == 500 and "NonFiniteError" in r.json()["error"] and "rolled back" in r.json()["error"]
        monkeypatch.undo()
        assert client.post("/v1/retrieve", json=body(world, range(4))).status_code == 200
        status = client.get("/v1/status").json()
        assert status["batch_failures"] == 1 and "NonFiniteError" in status["last_failure"]
        assert "qshift_batch_failures_total 1" in client.get("/metrics").text


def test_checkpoint_and_restart_resume_and_a_foreign_checkpoint_is_refused(world, tmp_path):
    svc = make_service(world, "tent", store=tmp_path, checkpoint_every=2)
    with TestClient(create_app(svc)) as client:
        for j in range(3):
            assert client.post("/v1/retrieve", json=body(world, range(4 * j, 4 * j + 4))).status_code == 200
        meta = json.loads((tmp_path / "checkpoint.json").read_text())
        assert meta["batches"] == 2  # every 2 batches
        r = client.post("/v1/checkpoint")
        assert r.status_code == 200 and r.json()["batches"] == 3
        assert client.post("/v1/retrieve", json=body(world, range(12, 16))).status_code == 200
    # leaving the client shut the app down: a final checkpoint after batch 4
    assert json.loads((tmp_path / "checkpoint.json").read_text())["batches"] == 4
    assert len(list(tmp_path.glob("state-*.pt"))) == 1
    after = params(svc)
    again = make_service(world, "tent", store=tmp_path, checkpoint_every=2)
    assert not same(after, params(again))
    again.resume()
    assert same(after, params(again)) and again.counters["batches"] == 4 and again.state_digest == svc.state_digest
    with TestClient(create_app(again)) as client:
        assert client.get("/v1/status").json()["checkpoints"]["resumed_from"]["batches"] == 4
    other = make_service(world, "rest", store=tmp_path)
    before = params(other)
    with pytest.raises(CheckpointRefused, match="method.*'tent'.*'rest'|method: \"tent\" in the checkpoint"):
        other.resume()
    assert same(before, params(other))
    smaller = make_service(world, "tent", store=tmp_path, emb=world.emb[:100])
    with pytest.raises(CheckpointRefused, match="gallery"):
        smaller.resume()
    first, second = CheckpointStore(tmp_path, svc.identity), CheckpointStore(tmp_path, svc.identity)
    first.lock()
    with pytest.raises(UserError, match="in use by another running server"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_mutating_endpoints_need_the_token(world, tmp_path):
    svc = make_service(world, store=tmp_path)
    stopped = []
    settings = AppSettings(api_key="s3cret", on_shutdown=lambda: stopped.append(True))
    with TestClient(create_app(svc, settings)) as client:
        for path in ("/v1/reset", "/v1/checkpoint", "/v1/shutdown"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = client.post(path, headers=headers)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, headers)
                assert r.json()["field"] == "Authorization"
        assert not stopped and not (tmp_path / "checkpoint.json").exists()
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/retrieve", json=body(world, [0])).status_code == 200  # retrieve stays open
        assert client.get("/v1/status").json()["auth"] is True and client.get("/healthz").status_code == 200
        assert client.post("/v1/reset", headers=good).status_code == 200
        assert client.post("/v1/checkpoint", headers=good).status_code == 200
        assert client.post("/v1/shutdown", headers=good).status_code == 202 and stopped


# ---------------------------------------------------------------------------------------- a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, data: dict | None = None, token: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "QSHIFT_API_KEY": "tok"}
    fh = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "qshift.cli", "serve", "--port", str(port), *args],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _call(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server not healthy in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_real_server_checkpoints_on_sigterm_resumes_and_refuses_another_method(world, tmp_path):
    np.save(tmp_path / "gallery.npy", world.emb.numpy())
    (tmp_path / "ids.txt").write_text("\n".join(world.ids) + "\n")
    state = tmp_path / "state"
    common = ["--gallery-embeddings", str(tmp_path / "gallery.npy"), "--gallery-ids", str(tmp_path / "ids.txt"),
              "--set", "steps=1", "--set", f"batch_size={B}", "--state-dir", str(state), "--log-level", "warning"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(["--method", "tent", "--checkpoint-every", "2", *common], port, tmp_path / "log1.txt")
    try:
        _wait_healthy(proc, port, tmp_path / "log1.txt")
        for j in range(3):
            code, out = _call(f"{url}/v1/retrieve", body(world, range(4 * j, 4 * j + 4), k=3))
            assert code == 200 and out["batches"] == [j + 1] and len(out["results"][0]["ids"]) == 3
        assert _call(f"{url}/v1/checkpoint", {})[0] == 401
        code, status = _call(f"{url}/v1/status")
        assert status["batches"] == 3 and status["checkpoints"]["last"]["batches"] == 2
        digest = status["state_digest"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    meta = json.loads((state / "checkpoint.json").read_text())
    assert meta["batches"] == 3 and meta["state_digest"] == digest  # written on SIGTERM
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(["--method", "tent", *common], port, tmp_path / "log2.txt")
    try:
        _wait_healthy(proc, port, tmp_path / "log2.txt")
        status = _call(f"{url}/v1/status")[1]
        assert status["batches"] == 3 and status["state_digest"] == digest
        assert status["checkpoints"]["resumed_from"]["batches"] == 3
        assert _call(f"{url}/v1/shutdown", {}, token="tok")[0] == 202
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    refused = subprocess.run([sys.executable, "-m", "qshift.cli", "serve", "--method", "rest", "--port",
                              str(_free_port()), *common], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "method" in refused.stderr and "tent" in refused.stderr and "error:" in refused.stderr


@pytest.mark.slow
def test_a_real_backbone_over_a_local_dataset_in_both_directions(tmp_path):
    """A tiny open_clip checkpoint and a Karpathy-format dataset: i2t with path and base64 queries of
    different sizes, t2i with its image paths as gallery ids, a checkpoint and its resume."""
    from backbone_fixtures import TINY_OPENCLIP, tiny_karpathy, tiny_openclip_checkpoint

    from qshift.serve.service import ServeSpec, build_service

    ckpt = tiny_openclip_checkpoint(tmp_path / "openclip")
    root = tiny_karpathy(tmp_path / "data", "coco", n_images=4)
    common = dict(method="tent", settings=["steps=1", f"batch_size={B}"], model=f"openclip:{TINY_OPENCLIP}",
                  weights=ckpt, dataset="coco", data_root=str(root), limits=InputLimits(image_root=root))
    i2t = build_service(ServeSpec(direction="i2t", **common))
    assert i2t.n_gallery == 20 and i2t.identity["gallery"]["source"] == "dataset captions"
    jpeg = base64.b64encode((root / "images" / "img_003.jpg").read_bytes()).decode()
    with TestClient(create_app(i2t)) as client:
        r = client.post("/v1/retrieve", json={"queries": [{"path": "images/img_000.jpg"},
                                                          {"path": str(root / "images" / "img_001.jpg")},
                                                          {"image": jpeg}], "k": 4})
        assert r.status_code == 200, r.text
        assert all(len(q["ids"]) == 4 and set(q["ids"]) <= set(map(str, range(20))) for q in r.json()["results"])
    i2t.adapter.close()
    state = tmp_path / "state"
    t2i = build_service(ServeSpec(direction="t2i", state_dir=str(state), **common))
    assert t2i.gallery_ids == [f"images/img_{i:03d}.jpg" for i in range(4)]
    with TestClient(create_app(t2i)) as client:
        r = client.post("/v1/retrieve", json={"queries": [{"text": "a red dog on the mat"}, {"text": "a cat"}], "k": 2})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["ids"][0] in t2i.gallery_ids
        assert client.post("/v1/retrieve", json={"queries": [{"path": "images/img_000.jpg"}]}).status_code == 422
    digest = t2i.state_digest
    t2i.store.unlock()
    t2i.adapter.close()
    again = build_service(ServeSpec(direction="t2i", state_dir=str(state), **common))
    assert again.counters["batches"] == 1 and again.state_digest == digest
    again.store.unlock()
