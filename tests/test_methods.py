import copy
import math

import numpy as np
import pytest
import torch

from qshift.data import world
from qshift.data.streams import QuerySet
from qshift.engine import RunConfig, run_online
from qshift.methods.base import resolved_options
from qshift.options import Protocol
from qshift.methods import available_methods, create
from qshift.methods.objectives import ReliableQueue, gap_loss, rem_loss, rem_weights, uniformity_loss
from qshift.methods.rest import project_conflict
from qshift.models.world_model import WorldRetrievalModel


@pytest.fixture
def setup(tiny_model):
    split = world.generate_world(seed=8, n_images=24)
    rm = WorldRetrievalModel(tiny_model, "image")
    gallery = rm.encode_gallery(split.captions)
    return rm, gallery, split


def test_registry_lists_methods_and_rejects_bad_options(setup):
    rm, g, _ = setup
    assert {"source", "tent", "tcr", "rest", "oracle"} <= set(available_methods())
    with pytest.raises(ValueError, match="unknown method"):
        create("magic", rm, g)
    with pytest.raises(ValueError, match="unknown option"):
        create("tcr", rm, g, lambda_zz=1)
    with pytest.raises(ValueError, match="scoring"):
        create("tent", rm, g, scoring="later")
    # option values of the wrong type fail at once, naming the option
    with pytest.raises(ValueError, match="'lambda_u' of method 'rest' expects a number"):
        create("rest", rm, g, lambda_u="abc")
    with pytest.raises(ValueError, match="'decoupling' of method 'rest' expects true or false"):
        create("rest", rm, g, decoupling=3)
    with pytest.raises(ValueError, match="'queue_batches' .* expects an integer"):
        create("tcr", rm, g, queue_batches=2.5)
    create("rest", rm, g, lambda_u=1)  # an integer for a float option is fine


def test_learning_rate_defaults_to_the_backbones_rate(setup):
    from qshift.models.dual_tower import DualTowerModel

    rm, g, _ = setup
    m = create("tcr", rm, g)
    # the world model declares 1e-3; the optimizer is built with it, and an explicit rate wins
    assert m.lr == 1e-3 and all(grp["lr"] == 1e-3 for grp in m.optimizer.param_groups)
    assert create("tcr", rm, g, lr=3e-4).lr == 3e-4
    # a backbone that declares nothing gets docs/method.md §2's rate for its query modality
    towers = {"image": rm.encoder.visual, "text": rm.encoder.text}
    plain = DualTowerModel({"image": rm.encoder.encode_image, "text": rm.encoder.encode_text}, towers, "image")
    assert create("tcr", plain, g).lr == 3e-4
    blip_like = DualTowerModel({"image": rm.encoder.encode_image, "text": rm.encoder.encode_text}, towers, "text",
                               default_lr=3e-5)
    assert create("tent", blip_like, g).lr == 3e-5


@pytest.mark.parametrize("name", ["tent", "tcr", "rest"])
def test_only_query_tower_layernorms_change(setup, name):
    rm, g, split = setup
    before = {k: v.clone() for k, v in rm.encoder.state_dict().items()}
    g_before = g.clone()
    m = create(name, rm, g, lr=1e-2, gallery_ids=torch.as_tensor(split.caption_image))
    m.adapt_batch(split.images()[:16])
    adaptable = {n for n, _ in rm.adaptable_parameters()}
    changed = {k for k, v in rm.encoder.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= adaptable, changed - adaptable
    torch.testing.assert_close(rm.encode_gallery(split.captions), g_before)  # gallery tower untouched
    assert torch.equal(m.gallery, g_before)


def test_reset_restores_source_exactly(setup):
    rm, g, split = setup
    before = {k: v.clone() for k, v in rm.encoder.state_dict().items()}
    m = create("tcr", rm, g, lr=1e-2)
    m.adapt_batch(split.images()[:16])
    assert m.parameter_drift() > 0
    m.reset()
    assert all(torch.equal(v, before[k]) for k, v in rm.encoder.state_dict().items())
    assert len(m.queue) == 0 and m.batches_seen == 0


def test_scoring_modes_use_the_forward_they_claim(setup):
    rm, g, split = setup
    x = split.images()[:16]
    with torch.no_grad():
        s0 = rm.encode_query(x) @ g.T
    pre = create("tent", rm, g, lr=5e-2, scoring="pre")
    sp, _ = pre.adapt_batch(x)
    torch.testing.assert_close(sp, s0)
    pre.reset()
    post = create("tent", rm, g, lr=5e-2, scoring="post")
    s_post, _ = post.adapt_batch(x)
    torch.testing.assert_close(s_post, post.scores(x))
    post.reset()
    tcr_mode = create("tent", rm, g, lr=5e-2, scoring="tcr", steps=3)
    s_tcr, _ = tcr_mode.adapt_batch(x)
    assert not torch.allclose(s_tcr, s0) and not torch.allclose(s_tcr, tcr_mode.scores(x))
    # "tcr" = the forward of the last inner step, i.e. after steps-1 updates: replay 2 steps by hand
    tcr_mode.reset()
    replay = create("tent", rm, g, lr=5e-2, scoring="pre", steps=2)
    replay.adapt_batch(x)
    torch.testing.assert_close(s_tcr, replay.scores(x))


def test_queue_keeps_the_smallest_scores():
    q = ReliableQueue(capacity=3, ratio=0.5, tau=0.02)
    c = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    z1 = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0], [0.2, 1.0], [1.0, 1.0]]), dim=1)
    q.push(z1, c, batch_index=0)
    assert len(q) == 2  # ⌊0.5·4⌋ pairs with the smallest s
    s_all = (2 * (z1 - c).norm(dim=1) - (z1 - z1.mean(0)).norm(dim=1) - (c - c.mean(0)).norm(dim=1))
    assert sorted(q.s.tolist()) == pytest.approx(sorted(s_all.sort().values[:2].tolist()))
    q.push(z1, c, batch_index=1)
    assert len(q) == 3 and (q.s <= s_all.sort().values[1] + 1e-6).all()
    q.drop_older_than(1)
    assert set(q.born.tolist()) == {1}


def test_rem_weights_and_the_zero_reliable_case():
    h = torch.tensor([0.1, 0.5, 2.0], requires_grad=True)
    w = rem_weights(h, torch.tensor(1.0))
    assert w.tolist() == pytest.approx([1 - 0.1 / 1.001, 1 - 0.5 / 1.001, 0.0])
    loss, mask = rem_loss(h, torch.tensor(1.0))
    assert mask.tolist() == [True, True, False]
    assert float(loss.detach()) == pytest.approx((0.1 * w[0] + 0.5 * w[1]).item() / 2)
    none, mask = rem_loss(h, torch.tensor(0.01))
    assert float(none.detach()) == 0.0 and not mask.any()
    (g,) = torch.autograd.grad(none, h)
    assert torch.isfinite(g).all()


def test_uniformity_and_gap_by_hand():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(uniformity_loss(z, t=0.1)) == pytest.approx(math.exp(-0.1))
    c = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # mean(z) = 0, mean(c) = (0, 1): gap 1
    assert float(gap_loss(z, c, 0.25)) == pytest.approx(0.75 ** 2)


def test_projection_removes_conflict_and_leaves_agreement_alone():
    spec = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    gen = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    out, logs = project_conflict(spec, gen)
    flat = torch.cat([o.flatten() for o in out])
    assert float(flat @ torch.tensor([-1.0, 1.0, 0.0])) >= -1e-7
    assert logs["fired"] == 1 and logs["angle_before"] > 90 and logs["angle_after"] == pytest.approx(90)
    agree = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    out2, logs2 = project_conflict(agree, gen)
    assert logs2["fired"] == 0 and all(torch.equal(a, b) for a, b in zip(out2, agree))
    always, _ = project_conflict(agree, gen, mode="always")
    assert not torch.equal(always[0], agree[0])


def test_batched_double_gradient_equals_two_backward_passes(setup):
    rm, g, split = setup
    x = split.images()[:8]
    m = create("rest", rm, g, gallery_ids=torch.as_tensor(split.caption_image))
    z = rm.encode_query(x)
    cot = torch.randn(2, *z.shape)
    batched = m._vjp(z, cot)
    z2 = rm.encode_query(x)
    m.batched_backward = False
    separate = m._vjp(z2, cot)
    for a, b in zip(batched, separate):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def _task(split, rm):
    class Task:
        name, direction = "tiny", "i2t"
        query_sets = [QuerySet("d1", split.images()[:12], np.arange(12)),
                      QuerySet("d2", split.images()[12:24], np.arange(12, 24))]
        gallery, gallery_ids = split.captions, np.asarray(split.caption_image)
        clean_queries = QuerySet("clean", split.images(), np.arange(24))

        def stream(self, batch_size, seed):
            from qshift.data.streams import sequential_stream
            return sequential_stream(self.query_sets, batch_size, seed)
    return Task()


def test_same_seed_same_result_and_forgetting_is_reported(setup, tiny_model):
    rm, g, split = setup
    runs = []
    for _ in range(2):
        fresh = {k: v.clone() for k, v in tiny_model.state_dict().items()}
        res = run_online(rm, _task(split, rm), RunConfig(method="tcr", protocol=Protocol(batch_size=8, lr=1e-2)), progress=False)
        tiny_model.load_state_dict(fresh)
        runs.append(res)
    assert runs[0].metrics == runs[1].metrics
    assert [b["R@1"] for b in runs[0].batches] == [b["R@1"] for b in runs[1].batches]
    r = runs[0]
    assert r.n_queries == 24 and set(r.per_domain) == {"d1", "d2"}
    assert r.forgetting is not None and r.forgetting["first_domain"] == "d1"
    assert len(r.forgetting["curve"]) == 2 and 0 < r.params_adapted < r.params_total
    # hardware: the device the run used; no CUDA peak on a CPU run
    assert r.environment["device"] == "cpu" and "gpu" not in r.environment and r.environment["processor"]
    assert r.peak_cuda_mb is None and r.peak_rss_mb > 0


def test_a_run_leaves_the_model_with_the_parameters_it_came_with(setup, tiny_model):
    rm, g, split = setup
    before = [p.detach().clone() for _, p in rm.adaptable_parameters()]
    res = run_online(rm, _task(split, rm), RunConfig(method="tent", protocol=Protocol(batch_size=8, lr=1e-2)),
                     progress=False)
    assert res.batches[-1]["steps"]  # it adapted
    after = [p.detach() for _, p in rm.adaptable_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    again = run_online(rm, _task(split, rm), RunConfig(method="tent", protocol=Protocol(batch_size=8, lr=1e-2)),
                       progress=False)
    assert again.metrics == res.metrics  # the second run starts from the source too


def test_oracle_needs_labels(setup):
    rm, g, split = setup
    m = create("oracle", rm, g, gallery_ids=torch.as_tensor(split.caption_image))
    with pytest.raises(ValueError, match="labels"):
        m.adapt_batch(split.images()[:4])
    scores, rec = m.adapt_batch(split.images()[:4], labels=torch.arange(4))
    assert scores.shape == (4, len(split.captions))



def test_oracle_negatives_gallery_or_batch_on_a_hand_built_case(setup):
    rm, g, split = setup
    ids = torch.as_tensor(split.caption_image)
    labels = torch.tensor([0, 1])
    sims = torch.randn(2, len(ids), generator=torch.Generator().manual_seed(0))
    t = 0.05
    full = create("oracle", rm, g, gallery_ids=ids, temperature=t).loss(None, sims, 0, labels).loss
    batch = create("oracle", rm, g, gallery_ids=ids, temperature=t, negatives="batch").loss(None, sims, 0, labels).loss

    def nll(cols):  # -log of the softmax mass on each query's own items, over the columns kept
        logp = torch.log_softmax(sims[:, cols] / t, dim=1)
        own = ids[cols][None, :] == labels[:, None]
        return -torch.stack([torch.logsumexp(logp[i][own[i]], 0) for i in range(2)]).mean()

    torch.testing.assert_close(full, nll(torch.arange(len(ids))))
    in_batch = ((ids == 0) | (ids == 1)).nonzero().flatten()
    assert len(in_batch) == 10  # five captions each
    torch.testing.assert_close(batch, nll(in_batch))
    assert batch < full  # fewer negatives, less to push away
    with pytest.raises(ValueError, match="negatives"):
        create("oracle", rm, g, gallery_ids=ids, negatives="queue")


def test_sar_resets_when_its_loss_ema_collapses(setup):
    rm, g, split = setup
    m = create("sar", rm, g, lr=1e-2, reset_below=1e9)  # any loss counts as collapsed
    _, rec = m.adapt_batch(split.images()[:16])
    assert rec["reset"] and m.resets == 1
    assert m.parameter_drift() == 0.0
    keep = create("sar", rm, g, lr=1e-2, reset_below=-1.0)
    _, rec = keep.adapt_batch(split.images()[:16])
    assert "reset" not in rec and keep.parameter_drift() > 0


def test_eta_skips_unreliable_queries_and_eata_anchors(setup):
    rm, g, split = setup
    m = create("eta", rm, g, lr=1e-2, e_margin=1e-6)  # nothing is reliable enough
    _, rec = m.adapt_batch(split.images()[:16])
    assert all(s["kept"] == 0 for s in rec["steps"]) and m.parameter_drift() == 0.0
    m.reset()
    e = create("eata", rm, g, lr=1e-2, fisher_items=split.images()[16:24])
    assert e.fisher is not None and any(float(f.sum()) > 0 for f in e.fisher)
    e.adapt_batch(split.images()[:16])
    assert e.parameter_drift() > 0


def test_shot_im_runs_and_changes_parameters(setup):
    rm, g, split = setup
    m = create("shot-im", rm, g, lr=1e-2)
    _, rec = m.adapt_batch(split.images()[:16])
    assert "diversity" in rec["steps"][0] and m.parameter_drift() > 0


def test_embedding_diagnostics_by_hand():
    from qshift.bench.diagnose import embedding_diagnostics
    zq = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    zg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = embedding_diagnostics(zq, zg)
    # nearest gallery: 0, 1, 1; nearest query of gallery 0 is 0, of gallery 1 is 1 → 2 of 3 mutual
    assert d["consistency"] == pytest.approx(2 / 3)
    assert d["gap"] == pytest.approx(float((zq.mean(0) - zg.mean(0)).norm()))
    assert d["top1_similarity"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert d["uniformity"] == pytest.approx(float((zq - zq.mean(0)).norm(dim=1).mean()))


def test_gradient_angle_is_an_angle(setup):
    from qshift.bench.diagnose import gradient_angle
    rm, g, split = setup
    a = gradient_angle(rm, g, torch.as_tensor(split.caption_image), split.images(), batch_size=12, n_batches=2)
    assert 0.0 <= a["angle_deg"] <= 180.0 and a["n_batches"] == 2


# ------------------------------------------------------------------ READ, DeYO, REST variants

def test_read_loss_sharpens_confident_and_flattens_unconfident_queries(setup):
    rm, g, _ = setup
    m = create("read", rm, g)
    gamma = m.gamma
    # d/dp of p·(1 − log(p/γ)) is log(γ/p): negative above γ, positive below
    p = torch.tensor([0.9, 0.1], requires_grad=True)
    (p * (1 - torch.log(p / gamma))).sum().backward()
    assert p.grad[0] < 0 < p.grad[1]
    with pytest.raises(ValueError, match="gamma"):
        create("read", rm, g, gamma=1.5)


def test_read_and_deyo_adapt_only_query_layernorms(setup):
    rm, g, split = setup
    adaptable = {n for n, _ in rm.adaptable_parameters()}
    for name, opts in (("read", {}), ("deyo", {"plpd_threshold": -1.0, "e_margin": 0.999})):
        before = {k: v.clone() for k, v in rm.encoder.state_dict().items()}
        m = create(name, rm, g, lr=1e-2, **opts)
        _, rec = m.adapt_batch(split.images()[:16])
        changed = {k for k, v in rm.encoder.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and changed <= adaptable, (name, changed - adaptable)
        m.reset()


def test_deyo_filters_by_plpd(setup):
    rm, g, split = setup
    m = create("deyo", rm, g, plpd_threshold=2.0)  # a probability drop can never exceed 1
    before = [p.clone() for p in m.params]
    _, rec = m.adapt_batch(split.images()[:16])
    assert all(s["kept"] == 0 for s in rec["steps"])
    assert all(torch.equal(a, b) for a, b in zip(before, m.params))


def test_patch_and_word_shuffles_keep_content():
    from qshift.methods.confidence_baselines import shuffle_queries

    gen = torch.Generator().manual_seed(0)
    imgs = np.random.default_rng(0).integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    out = shuffle_queries(imgs, 4, gen)
    assert out.shape == imgs.shape and out.dtype == imgs.dtype and not np.array_equal(out, imgs)
    # same multiset of pixel values per image (patches moved, none changed)
    for a, b in zip(imgs, out):
        assert np.array_equal(np.sort(a.reshape(-1)), np.sort(b.reshape(-1)))
    # a 2x2 grid of constant patches: the shuffle is a permutation of the four patch values
    quad = np.zeros((1, 4, 4, 1), np.uint8)
    quad[0, :2, 2:], quad[0, 2:, :2], quad[0, 2:, 2:] = 1, 2, 3
    q = shuffle_queries(quad, 2, torch.Generator().manual_seed(1))[0, ::2, ::2, 0]
    assert sorted(q.reshape(-1).tolist()) == [0, 1, 2, 3]
    texts = shuffle_queries(["a red circle on the left", "one"], 4, gen)
    assert sorted(texts[0].split()) == sorted("a red circle on the left".split()) and texts[1] == "one"
    with pytest.raises(ValueError, match="too small"):
        shuffle_queries(np.zeros((1, 3, 3, 3), np.uint8), 4, gen)
    # composed queries: each half by its own rule
    pairs = shuffle_queries([(imgs[0], "make the red circle blue"), (imgs[1], "remove the star")], 4, gen)
    assert [len(p) for p in pairs] == [2, 2] and not np.array_equal(pairs[0][0], imgs[0])
    assert np.array_equal(np.sort(pairs[0][0].reshape(-1)), np.sort(imgs[0].reshape(-1)))
    assert sorted(pairs[0][1].split()) == sorted("make the red circle blue".split())


def test_preconditioned_projection_removes_conflict_in_the_metric():
    g_gen = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    g_spec = [torch.tensor([-1.0, 1.0]), torch.tensor([2.0])]
    metric = [torch.tensor([4.0, 1.0]), torch.tensor([1.0])]
    out, logs = project_conflict(g_spec, g_gen, metric=metric)
    dot = sum((a * m * b).sum() for a, m, b in zip(out, metric, g_gen))
    assert logs["fired"] == 1 and abs(float(dot)) < 1e-6
    # no conflict in the metric → untouched
    agree = [torch.tensor([1.0, 5.0]), torch.tensor([0.0])]
    out2, logs2 = project_conflict(agree, g_gen, metric=metric)
    assert logs2["fired"] == 0 and all(torch.equal(a, b) for a, b in zip(out2, agree))


def test_rest_memory_signal_replays_reliable_queries(setup):
    rm, g, split = setup
    m = create("rest", rm, g, lr=1e-3, signal="memory", memory_size=20, memory_min=4, ratio=1.0,
               gallery_ids=torch.as_tensor(split.caption_image))
    imgs = split.images()
    fired_or_logged = []
    for k in range(3):
        _, rec = m.adapt_batch(imgs[8 * k: 8 * k + 8])
        fired_or_logged.append(rec["steps"][-1].get("memory", 0))
    assert 0 < len(m._memory) <= 20
    assert fired_or_logged[-1] == len(m._memory) or fired_or_logged[-1] >= 4
    state = m.state_dict()
    m.reset()
    assert m._memory == []
    m.load_state_dict(state)
    assert len(m._memory) == len(state["extra"]["memory"])
    with pytest.raises(ValueError, match="signal"):
        create("rest", rm, g, signal="dream")


def _count_vjps(m, monkeypatch):
    calls = []
    real = m._vjp

    def counted(z, cot):
        calls.append(len(cot))
        return real(z, cot)
    monkeypatch.setattr(m, "_vjp", counted)
    return calls


def test_rest_gen_refresh_batch_computes_the_general_gradient_once_per_batch(setup, tiny_model, monkeypatch):
    rm, g, split = setup
    imgs, gids = split.images(), torch.as_tensor(split.caption_image)
    source = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # one inner step: nothing to reuse, so it is the default REST exactly
    outs = []
    for opts in ({}, {"gen_refresh": "batch"}):
        tiny_model.load_state_dict(source)
        m = create("rest", rm, g, lr=1e-2, steps=1, gallery_ids=gids, **opts)
        outs.append([m.adapt_batch(imgs[8 * k: 8 * k + 8])[0] for k in range(2)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    tiny_model.load_state_dict(source)
    m = create("rest", rm, g, lr=1e-2, steps=3, gallery_ids=gids, gen_refresh="batch")
    calls = _count_vjps(m, monkeypatch)
    m.adapt_batch(imgs[:8])
    m.adapt_batch(imgs[8:16])
    assert calls == [2, 1, 1, 2, 1, 1]  # both gradients at each batch's first step, then the customising one only
    tiny_model.load_state_dict(source)
    with pytest.raises(ValueError, match="gen_refresh"):
        create("rest", rm, g, gen_refresh="batch", signal="memory")


def test_rest_embedding_space_projection_uses_one_backward_and_removes_the_conflict_there(setup, tiny_model,
                                                                                          monkeypatch):
    from qshift.methods.rest import project_conflict

    rm, g, split = setup
    source = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    m = create("rest", rm, g, lr=1e-2, steps=2, gallery_ids=torch.as_tensor(split.caption_image),
               projection_space="embeddings", mode="always")
    calls = _count_vjps(m, monkeypatch)
    seen = []
    real = project_conflict

    def spy(g_spec, g_gen, *a, **k):
        out, logs = real(g_spec, g_gen, *a, **k)
        seen.append(float(sum((x * y).sum() for x, y in zip(out, g_gen))))
        return out, logs
    monkeypatch.setattr("qshift.methods.rest.project_conflict", spy)
    scores, rec = m.adapt_batch(split.images()[:8])
    assert calls == [1, 1]  # one backward per inner step
    assert len(seen) == 2 and all(abs(v) < 1e-6 for v in seen)  # mode=always: orthogonal to the general part
    assert all(s["fired"] == 1 for s in rec["steps"]) and bool(torch.isfinite(scores).all())
    tiny_model.load_state_dict(source)
    with pytest.raises(ValueError, match="projection_space"):
        create("rest", rm, g, projection_space="embeddings", signal="reliable")


def test_rest_adam_preconditioning_runs_and_needs_adamw(setup):
    rm, g, split = setup
    m = create("rest", rm, g, lr=1e-3, precondition="adam")
    for k in range(2):
        m.adapt_batch(split.images()[8 * k: 8 * k + 8])
    assert m._metric() is not None and all((w > 0).all() for w in m._metric())
    with pytest.raises(ValueError, match="adamw"):
        create("rest", rm, g, precondition="adam", optimizer="sgd")


@pytest.mark.parametrize("bad, match", [({"steps": 2.5}, "'steps' of the protocol expects an integer"),
                                        ({"lr": "abc"}, "'lr' of the protocol expects a number"),
                                        ({"batch_size": 0}, "'batch_size' of the protocol must be ≥ 1"),
                                        ({"batch_size": 100000}, "must be ≤ 4096"),
                                        ({"steps": 0}, "'steps' of the protocol must be ≥ 1"),
                                        ({"lr": -1.0}, "'lr' of the protocol must be ≥ 0"),
                                        ({"lr": float("nan")}, "finite"),
                                        ({"reset": "sometimes"}, "'reset' of the protocol must be one of"),
                                        ({"optimizer": "lbfgs"}, "'optimizer' of the protocol must be one of"),
                                        ({"warmup": 3}, "unknown option")])
def test_protocol_rejects_bad_values_naming_the_knob(bad, match):
    with pytest.raises(ValueError, match=match):
        Protocol.build(bad)
    assert Protocol.build({"lr": 1e-3, "steps": 1, "batch_size": 1}).lr == 1e-3


def test_run_config_validates_seed_and_method_options():
    with pytest.raises(ValueError, match="seed must be an integer"):
        RunConfig(seed="x").validate()
    with pytest.raises(ValueError, match="unknown method"):
        RunConfig(method="magic").validate()
    with pytest.raises(ValueError, match="'lambda_a' of method 'rest' must be ≥ 0"):
        RunConfig(method="rest", method_options={"lambda_a": -1.0}).validate()
    RunConfig(method="rest", method_options={"lambda_a": 0.3}).validate()


def test_settings_parse_by_declared_type_before_any_work():
    from qshift.engine import parse_settings

    cfg = parse_settings("rest", ["lr=1e-3", "steps=1", "seed=2", "consistency=off", "decoupling=false",
                                  "lambda_a=1", "optimizer=sgd"])
    assert cfg.protocol.lr == 1e-3 and cfg.protocol.steps == 1 and cfg.protocol.optimizer == "sgd" and cfg.seed == 2
    # a string option keeps the word (YAML 1.1 would read "off" as False); a float option reads "1" as 1.0
    assert cfg.method_options == {"consistency": "off", "decoupling": False, "lambda_a": 1.0}
    for bad, match in ((["lambda_zz=1"], "unknown setting 'lambda_zz'"), (["decoupling=maybe"], "true or false"),
                       (["lr=fast"], "'lr' of the protocol expects a number"), (["steps"], "key=value"),
                       (["consistency=sideways"], "must be one of")):
        with pytest.raises(ValueError, match=match):
            parse_settings("rest", bad)


def test_options_are_declared_once_and_rest_extends_tcr():
    from qshift.methods.base import method_class

    tcr, rest = method_class("tcr").Options, method_class("rest").Options
    assert set(tcr.names()) < set(rest.names())
    assert rest.defaults()["lambda_a"] == 0.1 and tcr.defaults()["tau"] == 0.02
    # the defaults a method runs with are its declaration's: nothing else holds a copy
    rm_defaults = resolved_options("rest")
    assert rm_defaults == rest.defaults()
    for row in rest.describe():
        assert row["help"], f"option {row['name']} has no help line"


ADAPTING = ["tent", "eta", "sar", "shot-im", "read", "deyo", "tcr", "rest", "oracle"]


@pytest.fixture
def stream_parts(setup, tiny_model):
    """24 preprocessed queries of the setup split, their ids, and the source weights (restored after)."""
    _, g, split = setup
    source = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    yield split, g, tiny_model.preprocess_images(split.images()), torch.arange(24), source
    tiny_model.load_state_dict(source)


def _fresh(tiny_model, name, split, gallery, **kw):
    return create(name, WorldRetrievalModel(tiny_model, "image"), gallery, lr=1e-2,
                  gallery_ids=torch.as_tensor(split.caption_image), **kw)


@pytest.mark.parametrize("name", ADAPTING)
def test_a_failing_batch_is_rolled_back_and_the_stream_goes_on_as_if_it_never_came(stream_parts, tiny_model, name):
    split, g, imgs, ids, source = stream_parts

    def stream(poison: bool):
        tiny_model.load_state_dict(source)
        m = _fresh(tiny_model, name, split, g)
        out = [m.adapt_batch(imgs[:8], labels=ids[:8])[0]]
        if poison:
            before = m.state_dict()
            bad = imgs[8:16].clone()
            bad[0, 0, 0, 0] = float("nan")
            with pytest.raises(FloatingPointError, match="non-finite"):
                m.adapt_batch(bad, labels=ids[8:16])
            after = m.state_dict()
            assert all(torch.equal(a, b) for a, b in zip(before["params"].values(), after["params"].values()))
            assert after["batches_seen"] == before["batches_seen"] == 1
        out.append(m.adapt_batch(imgs[16:24], labels=ids[16:24])[0])
        return out

    clean, poisoned = stream(False), stream(True)
    tiny_model.load_state_dict(source)
    for a, b in zip(clean, poisoned):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ADAPTING)
def test_saved_state_resumes_the_stream_exactly(stream_parts, tiny_model, name):
    split, g, imgs, ids, source = stream_parts
    m = _fresh(tiny_model, name, split, g)
    for k in range(2):
        m.adapt_batch(imgs[8 * k: 8 * k + 8], labels=ids[8 * k: 8 * k + 8])
    state = copy.deepcopy(m.state_dict())
    go_on = m.adapt_batch(imgs[16:], labels=ids[16:])[0]
    tiny_model.load_state_dict(source)
    resumed = _fresh(tiny_model, name, split, g)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.adapt_batch(imgs[16:], labels=ids[16:])[0], go_on, rtol=0, atol=0)
    tiny_model.load_state_dict(source)


def test_docs_options_tables_are_generated_from_the_declarations():
    from pathlib import Path

    from qshift.methods.catalog import DOCS_END, DOCS_START, docs_block

    text = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    block = text[text.index(DOCS_START):text.index(DOCS_END) + len(DOCS_END)]
    assert block == docs_block(), "docs/methods.md is stale: run `qshift methods --markdown` and paste its block"
    assert "`lambda_a` | float | `0.1`" in block and "`scoring` | str | `tcr`" in block
