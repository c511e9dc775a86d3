"""Per-query positives (``QueryRelevance.positive``): queries that share a target but not a reference or
group, as on real CIRR val.  The engine's ranks, R@K and R_s@K (whole gallery and top-K candidates), the
oracle's labels and its adaptation, and the unchanged behaviour without ``positive``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qshift.data.streams import QuerySet
from qshift.data.task import QueryRelevance, RetrievalTask
from qshift.engine import RunConfig, _probe, batch_ranks, run_online
from qshift.methods.simple import Oracle
from qshift.options import Protocol
from qshift.retrieval.metrics import summarise

COMPOSED = ("R@1", "R@5", "R@10", "R@50", "R_s@1", "R_s@2", "R_s@3")


def _shared_case(q=16, n=30, s=4, seed=0):
    """``q`` queries whose targets are 4 shared rows, each with its own reference (never its target) and its
    own group (target + others, no reference, -1 padded); random scores with the reference scoring high."""
    g = np.random.default_rng(seed)
    targets = np.arange(q) % 4  # rows 0..3, each the target of q/4 queries
    refs = 4 + np.arange(q) % (n - 4)  # distinct references: queries sharing a target differ here
    subsets = np.full((q, s), -1, np.int64)
    for i in range(q):
        pool = [j for j in range(n) if j not in (targets[i], refs[i])]
        width = s if i % 3 else s - 1  # some shorter groups
        subsets[i, :width] = [targets[i], *g.choice(pool, width - 1, replace=False)]
        subsets[i, :width] = subsets[i, g.permutation(width)]
    scores = torch.as_tensor(g.standard_normal((q, n)))
    scores[torch.arange(q), torch.as_tensor(refs)] += 4.0  # the reference would win if it were not removed
    rel = QueryRelevance(exclude=refs.copy(), subsets=subsets, positive=targets.copy())
    return scores, targets, refs, subsets, rel


def _brute(scores, targets, refs, subsets, cols=None):
    """Rank of the target with the reference removed, and within the group (ties against the query), by
    loops; with ``cols`` (each query's candidate rows) only candidates count, a target outside them is a miss
    (rank N) and group members outside them score -inf."""
    s = scores.numpy()
    n = s.shape[1]
    ranks, sub = [], []
    for i in range(len(s)):
        t, r = int(targets[i]), int(refs[i])
        seen = set(range(n)) if cols is None else set(cols[i].tolist())
        score = {j: (s[i, j] if j in seen and j != r else -np.inf) for j in range(n)}
        ranks.append(sum(1 for j in seen if j not in (t, r) and score[j] >= score[t]) if t in seen else n)
        group = [int(j) for j in subsets[i] if j >= 0 and j != r]
        sub.append(sum(1 for j in group if j != t and score[j] >= score[t]))
    ranks = torch.as_tensor(ranks)
    out = {f"R@{k}": 100.0 * np.mean([x < k for x in ranks.tolist()]) for k in (1, 5, 10, 50)}
    out.update({f"R_s@{k}": 100.0 * np.mean([x < k for x in sub]) for k in (1, 2, 3)})
    return ranks, torch.as_tensor(sub), out


def _check_metrics(ranks, aps, sub, want_ranks, want_sub, want):
    assert torch.equal(ranks, want_ranks) and torch.equal(sub, want_sub)
    got = summarise(ranks, aps, metrics=COMPOSED, subset_ranks=sub)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_gallery_ranks_with_shared_targets_equal_a_brute_force_loop(seed):
    scores, targets, refs, subsets, rel = _shared_case(seed=seed)
    ids = torch.arange(len(targets))  # query ids are free: the query's index
    # the task's gallery ids do not decide relevance once positive is set (here: nonsense ids)
    gallery_ids = torch.full((scores.shape[1],), 7)
    ranks, aps, sub = batch_ranks(SimpleNamespace(last_cols=None), scores, ids, gallery_ids, rel)
    want_ranks, want_sub, want = _brute(scores, targets, refs, subsets)
    _check_metrics(ranks, aps, sub, want_ranks, want_sub, want)
    assert torch.allclose(aps, 1.0 / (want_ranks.double() + 1))  # one positive: AP = 1 / (rank + 1)
    assert want["R@1"] < 100 and 0 < want["R@10"]  # not a degenerate case
    # the queries really share targets and differ in references: the old, id-indexed rule cannot say it
    assert len(np.unique(targets)) < len(targets) and len(np.unique(refs)) == len(refs)
    # the batch may hold any subset of the ids, in any order
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(ids))[:9])
    r2, a2, s2 = batch_ranks(SimpleNamespace(last_cols=None), scores[perm], ids[perm], gallery_ids, rel)
    assert torch.equal(r2, want_ranks[perm]) and torch.equal(s2, want_sub[perm]) and torch.equal(a2, aps[perm])


@pytest.mark.parametrize("k", [5, 12, 30])
def test_top_k_ranks_with_shared_targets_equal_a_brute_force_loop(k):
    scores, targets, refs, subsets, rel = _shared_case(seed=k)
    ids = torch.arange(len(targets))
    g = torch.Generator().manual_seed(k)
    cols = torch.stack([torch.randperm(scores.shape[1], generator=g)[:k] for _ in range(len(ids))])
    for i, row in ((0, int(targets[0])), (1, int(refs[1]))):  # a target and a reference among the candidates
        if row not in cols[i].tolist():
            cols[i, 0] = row
    cand = scores.gather(1, cols)
    ranks, aps, sub = batch_ranks(SimpleNamespace(last_cols=cols), cand, ids, torch.arange(scores.shape[1]), rel)
    want_ranks, want_sub, want = _brute(scores, targets, refs, subsets, cols=cols)
    _check_metrics(ranks, aps, sub, want_ranks, want_sub, want)
    if k == scores.shape[1]:  # every row a candidate: the whole-gallery ranks
        whole = batch_ranks(SimpleNamespace(last_cols=None), scores, ids, torch.arange(scores.shape[1]), rel)
        assert torch.equal(whole[0], ranks) and torch.equal(whole[2], sub)


def test_without_positive_results_are_unchanged():
    """A case both rules can express (one query per target): the id-indexed relevance and per-query
    positives give the same ranks, APs and subset ranks, and ``relevant_ids`` passes ids through untouched."""
    scores, _, refs, subsets, _ = _shared_case(q=12, seed=5)
    q, n = scores.shape
    gen = np.random.default_rng(5)
    targets = gen.permutation(np.setdiff1d(np.arange(n), refs))[:q]  # one target each, no reference
    subsets[:, 0] = targets  # each group holds its target
    subsets[:, 1:] = np.where(np.isin(subsets[:, 1:], targets), -1, subsets[:, 1:])
    # the old encoding: id = the target's position in the target list, gallery ids name the targets
    gallery_ids = torch.full((n,), -1, dtype=torch.long)
    gallery_ids[torch.as_tensor(targets)] = torch.arange(q)
    old = QueryRelevance(exclude=refs, subsets=subsets)
    new = QueryRelevance(exclude=refs, subsets=subsets, positive=targets)
    ids = torch.arange(q)
    for cols in (None, torch.argsort(scores, 1, descending=True)[:, :8]):
        s = scores if cols is None else scores.gather(1, cols)
        a = batch_ranks(SimpleNamespace(last_cols=cols), s, ids, gallery_ids, old)
        b = batch_ranks(SimpleNamespace(last_cols=cols), s, ids, torch.arange(n), new)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    same_ids, same_gallery = old.relevant_ids(ids, gallery_ids)
    assert same_ids is ids and same_gallery is gallery_ids
    labels, rows = new.relevant_ids(ids, gallery_ids)
    assert labels.tolist() == targets.tolist() and rows.tolist() == list(range(n))


def test_positive_is_checked():
    with pytest.raises(ValueError, match="positive"):
        QueryRelevance(positive=np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="positive"):
        QueryRelevance(positive=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        QueryRelevance(positive=np.array([0, -1]))
    with pytest.raises(ValueError, match="beyond the gallery"):
        QueryRelevance(positive=np.array([0, 9])).relevant_ids(torch.arange(2), torch.arange(5))


# ------------------------------------------------------------------------------ the engine and the oracle

class _Toy:
    """Queries are feature vectors scaled and shifted per dimension (the adaptable parameters); the gallery
    is fixed unit vectors."""

    query_modality, gallery_modality = "image+text", "image"
    default_lr = 0.05

    def __init__(self, d):
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def encode_query(self, batch):
        return F.normalize(torch.as_tensor(np.asarray(batch), dtype=torch.float32) * self.scale + self.shift, dim=-1)

    @torch.no_grad()
    def encode_gallery(self, batch):
        return F.normalize(torch.as_tensor(np.asarray(batch), dtype=torch.float32), dim=-1)

    def adaptable_parameters(self):
        return [("scale", self.scale), ("shift", self.shift)]


def _toy_task(q=24, n=12, gallery_ids=None):
    """Targets are rows 0 and 1 (shared by 12 queries each), every query has its own reference (rows 2..7
    paired with a target, so queries sharing a target differ in reference) and a distractor (rows 8..11)
    that beats the target in the source model once the reference is removed."""
    g = np.random.default_rng(0)
    k = np.arange(q)
    targets, refs, distract = k % 2, 2 + (k // 2) % 6, 8 + k % 4
    x = 0.02 * g.standard_normal((q, n)).astype(np.float32)
    x[k, refs] += 1.0
    x[k, targets] += 0.5
    x[k, distract] += 0.7
    subsets = np.stack([targets, distract, 8 + (k + 1) % 4], 1)
    rel = QueryRelevance(exclude=refs, subsets=subsets, positive=targets)
    gallery = np.eye(n, dtype=np.float32)
    ids = np.arange(q)
    task = RetrievalTask("toy-cirr", "cir", [QuerySet("toy", x, ids)], gallery,
                         np.arange(n) if gallery_ids is None else gallery_ids,
                         clean_queries=QuerySet("clean", x, ids), relevance=rel)
    return task, x, targets, refs, subsets


def test_engine_and_oracle_read_each_querys_own_positive(monkeypatch):
    # the task's gallery ids say nothing about relevance (reversed rows): positive decides
    task, x, targets, refs, subsets = _toy_task(gallery_ids=np.arange(12)[::-1].copy())
    model = _Toy(x.shape[1])
    with torch.no_grad():
        scores = model.encode_query(x) @ model.encode_gallery(task.gallery).T
    want_ranks, want_sub, want = _brute(scores, targets, refs, subsets)
    assert want["R@1"] == 0.0 and want["R@5"] == 100.0  # the distractor wins, the target is close
    src = run_online(model, task, RunConfig("source", Protocol(batch_size=5)), progress=False)
    for k, v in want.items():
        assert src.metrics[k] == pytest.approx(v), k
    assert sorted(r for b in src.batches for r in b["ranks"]) == sorted(want_ranks.tolist())
    # the probe the forgetting metrics use reads the same positives
    probe = _probe(SimpleNamespace(last_cols=None, scores=lambda items: model.encode_query(items).detach()
                                   @ model.encode_gallery(task.gallery).T),
                   task.clean_queries, torch.as_tensor(task.gallery_ids), relevance=task.relevance, metrics=COMPOSED)
    for k, v in want.items():
        assert probe[k] == pytest.approx(v), k

    seen = []
    loss = Oracle.loss

    def spy(self, z, sims, step, labels):
        if step == 0:
            seen.append((labels.clone(), self.gallery_ids.clone()))
        return loss(self, z, sims, step, labels)

    monkeypatch.setattr(Oracle, "loss", spy)
    cfg = RunConfig("oracle", Protocol(batch_size=6, steps=5, lr=0.05, scoring="post"), method_options={"temperature": 0.05})
    oracle = run_online(model, task, cfg, progress=False, keep_adapted=True)
    try:
        # its loss labels are each batch's positive rows, against the gallery's row numbers
        stream = task.stream(batch_size=6, seed=0)
        assert len(seen) == len(stream)
        for (labels, gids), batch in zip(seen, stream):
            assert labels.tolist() == targets[batch.ids].tolist()
            assert gids.tolist() == list(range(12))
        # and it adapts towards them: after the stream every query finds its own target first
        assert oracle.metrics["R@1"] > src.metrics["R@1"]
        with torch.no_grad():
            after = model.encode_query(x) @ model.encode_gallery(task.gallery).T
        assert _brute(after, targets, refs, subsets)[2]["R@1"] == 100.0
    finally:
        with torch.no_grad():
            model.scale.fill_(1.0)
            model.shift.zero_()


def test_top_k_runs_read_the_positives_too():
    task, x, targets, refs, subsets = _toy_task()
    model = _Toy(x.shape[1])
    whole = run_online(model, task, RunConfig("source", Protocol(batch_size=7)), progress=False)
    every = run_online(model, task, RunConfig("source", Protocol(batch_size=7, candidates=12)), progress=False)
    assert every.metrics == whole.metrics
    top = run_online(model, task, RunConfig("source", Protocol(batch_size=7, candidates=4)), progress=False)
    with torch.no_grad():
        scores = model.encode_query(x) @ model.encode_gallery(task.gallery).T
    cols = scores.topk(4, dim=1).indices
    _, _, want = _brute(scores, targets, refs, subsets, cols=cols)
    for k, v in want.items():
        assert top.metrics[k] == pytest.approx(v), k
