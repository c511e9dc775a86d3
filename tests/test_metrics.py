import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qshift.retrieval import metrics
from qshift.retrieval.metrics import (average_precision, first_positive_rank, per_query_ranks_and_ap,
                                      retrieval_metrics, summarise)


def brute_force(scores, qids, gids, ks=(1, 5, 10)):
    """Reference: per query, walk the ranking (ties broken against the query) in plain Python."""
    hits = {k: 0 for k in ks}
    aps = []
    for i in range(scores.shape[0]):
        row = scores[i].tolist()
        rel = [int(qids[i]) == int(g) for g in gids.tolist()]
        order = sorted(range(len(row)), key=lambda j: (-row[j], rel[j]))
        first = next(r for r, j in enumerate(order) if rel[j])
        for k in ks:
            hits[k] += first < k
        found, prec = 0, []
        for r, j in enumerate(order):
            if rel[j]:
                found += 1
                prec.append(found / (r + 1))
        aps.append(sum(prec) / len(prec))
    n = scores.shape[0]
    out = {f"R@{k}": 100 * hits[k] / n for k in ks}
    out["mAP"] = 100 * sum(aps) / n
    return out


@st.composite
def problems(draw):
    n_ids = draw(st.integers(1, 6))
    n_gallery = draw(st.integers(n_ids, 25))
    gids = [i % n_ids for i in range(n_gallery)]
    gids = draw(st.permutations(gids))
    n_q = draw(st.integers(1, 12))
    qids = draw(st.lists(st.integers(0, n_ids - 1), min_size=n_q, max_size=n_q))
    # few distinct values so that ties are frequent
    vals = draw(st.lists(st.integers(-3, 3), min_size=n_q * n_gallery, max_size=n_q * n_gallery))
    scores = torch.tensor(vals, dtype=torch.float64).view(n_q, n_gallery) / 3
    return scores, torch.tensor(qids), torch.tensor(gids)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_matches_brute_force_with_ties_and_many_positives(p):
    scores, q, g = p
    got = retrieval_metrics(scores, q, g, chunk=3)
    ref = brute_force(scores, q, g)
    for k, v in ref.items():
        assert math.isclose(got[k], v, abs_tol=1e-6), (k, got[k], v)
    assert math.isclose(got["R-mean"], (ref["R@1"] + ref["R@5"] + ref["R@10"]) / 3, abs_tol=1e-6)


def test_any_positive_semantics_image_to_text():
    # image 0 has captions 0..4; only its 3rd caption ranks first
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.3, 0.0, 0.5, 0.6]])
    q, g = torch.tensor([0]), torch.tensor([0, 0, 0, 0, 0, 1, 1])
    m = retrieval_metrics(scores, q, g)
    assert m["R@1"] == 100.0
    # AP: positives at ranks 1, 4, 5, 6, 7 → (1 + 2/4 + 3/5 + 4/6 + 5/7) / 5
    assert math.isclose(m["mAP"], 100 * (1 + 2 / 4 + 3 / 5 + 4 / 6 + 5 / 7) / 5, rel_tol=1e-6)


def test_constant_scores_do_not_score_by_ties():
    scores = torch.zeros(4, 10)
    q = torch.arange(4)
    g = torch.arange(10)
    assert first_positive_rank(scores, q, g).tolist() == [9, 9, 9, 9]
    assert retrieval_metrics(scores, q, g)["R@1"] == 0.0


def test_perfect_and_worst_rankings():
    g = torch.arange(20)
    assert retrieval_metrics(torch.eye(20), g, g) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "mAP": 100.0, "R-mean": 100.0}
    worst = retrieval_metrics(-torch.eye(20), g, g)
    assert worst["R@10"] == 0.0 and math.isclose(worst["mAP"], 100 / 20, rel_tol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no relevant"):
        retrieval_metrics(torch.rand(2, 3), torch.tensor([0, 7]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.rand(2, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[n_queries, n_gallery\]"):
        average_precision(torch.rand(3), torch.tensor([0]), torch.tensor([0]))


def argsort_reference(scores, qids, gids):
    """Reference: per row, a full argsort of the gallery (score descending, negatives first among
    equal scores); the rank of the first positive and the AP read off the sorted relevance."""
    scores, qids, gids = np.asarray(scores, dtype=np.float64), np.asarray(qids), np.asarray(gids)
    ranks, aps = [], []
    for row, q in zip(scores, qids):
        rel = gids == q
        order = np.lexsort((rel, -row))  # primary key -score, then negatives (False) first
        rel_sorted = rel[order]
        hit_at = np.flatnonzero(rel_sorted)
        ranks.append(hit_at[0])
        aps.append(np.mean(np.arange(1, len(hit_at) + 1) / (hit_at + 1)))
    return np.array(ranks), np.array(aps)


def random_problem(seed, n_q, n_gallery, n_ids, n_values):
    """Scores from ``n_values`` distinct levels (ties everywhere when small); ids with every query's
    id present in the gallery and varying numbers of positives."""
    g = torch.Generator().manual_seed(seed)
    gids = torch.cat([torch.arange(n_ids), torch.randint(0, n_ids, (n_gallery - n_ids,), generator=g)])
    gids = gids[torch.randperm(n_gallery, generator=g)]
    qids = torch.randint(0, n_ids, (n_q,), generator=g)
    scores = torch.randint(0, n_values, (n_q, n_gallery), generator=g).float() / n_values
    return scores, qids, gids


@pytest.mark.parametrize("path", ["count", "sort"])
@pytest.mark.parametrize("seed,n_q,n_gallery,n_ids,n_values", [
    (0, 40, 60, 12, 4),        # heavy ties, ~5 positives per query, varying
    (1, 33, 50, 50, 1000),     # one positive each, rare ties
    (2, 20, 30, 1, 3),         # every gallery item relevant to every query
    (3, 25, 80, 3, 2),         # many positives, two score levels
    (4, 17, 1, 1, 5),          # a one-item gallery
    (5, 64, 257, 40, 10**6),   # nearly tie-free, more rows than a tile
])
def test_matches_argsort_reference(monkeypatch, path, seed, n_q, n_gallery, n_ids, n_values):
    # small tiles and chunks so that several of each are used; "sort" forces the one-sort-per-row path
    monkeypatch.setitem(metrics._TILE_ELEMENTS, "cpu", 97)
    if path == "sort":
        monkeypatch.setattr(metrics, "_MAX_COUNT_PASSES", 0)
    scores, q, g = random_problem(seed, n_q, n_gallery, n_ids, n_values)
    ranks, aps = per_query_ranks_and_ap(scores, q, g, chunk=7)
    ref_r, ref_a = argsort_reference(scores, q, g)
    assert ranks.dtype == torch.int64 and aps.dtype == torch.float64
    assert ranks.tolist() == ref_r.tolist()
    assert np.allclose(aps.numpy(), ref_a, rtol=1e-12, atol=1e-12)
    m = summarise(ranks, aps)
    assert m["R@1"] == 100 * float(np.mean(ref_r < 1)) and math.isclose(m["mAP"], 100 * ref_a.mean(), rel_tol=1e-12)


def test_edge_cases_equal_scores_single_item_infinities():
    # all-equal scores: every negative ranks above every positive
    g = torch.tensor([0, 1, 0, 2, 0, 1])
    ranks, aps = per_query_ranks_and_ap(torch.full((3, 6), 0.5), torch.tensor([0, 1, 2]), g)
    assert ranks.tolist() == [3, 4, 5]
    assert np.allclose(aps.numpy(), [(1 / 4 + 2 / 5 + 3 / 6) / 3, (1 / 5 + 2 / 6) / 2, 1 / 6])
    # one gallery item: rank 0, AP 1
    ranks, aps = per_query_ranks_and_ap(torch.tensor([[-3.0], [7.0]]), torch.tensor([4, 4]), torch.tensor([4]))
    assert ranks.tolist() == [0, 0] and aps.tolist() == [1.0, 1.0]
    # +-inf scores are ordinary values (ties included); integer scores are accepted
    inf = float("inf")
    scores = torch.tensor([[inf, -inf, inf, 0.0], [-inf, -inf, 1.0, -inf]])
    q, gg = torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0])
    for s in (scores, scores.T.contiguous().T):  # contiguous and strided
        r, a = per_query_ranks_and_ap(s, q, gg)
        ref_r, ref_a = argsort_reference(s, q, gg)
        assert r.tolist() == ref_r.tolist() and np.allclose(a.numpy(), ref_a)
    ints = torch.randint(0, 3, (9, 11), generator=torch.Generator().manual_seed(0))
    qi, gi = torch.arange(9, dtype=torch.int32) % 4, torch.arange(11) % 4
    r, a = per_query_ranks_and_ap(ints, qi, gi)
    ref_r, ref_a = argsort_reference(ints, qi, gi)
    assert r.tolist() == ref_r.tolist() and np.allclose(a.numpy(), ref_a)
    # no queries: empty results (summarise refuses them)
    r, a = per_query_ranks_and_ap(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.arange(5))
    assert r.shape == (0,) and a.shape == (0,)
    with pytest.raises(ValueError, match="no queries"):
        summarise(r, a)


@pytest.mark.parametrize("path", ["count", "sort"])
def test_absent_positive_and_bad_arguments_raise(monkeypatch, path):
    if path == "sort":
        monkeypatch.setattr(metrics, "_MAX_COUNT_PASSES", 0)
    scores = torch.rand(5, 4)
    # query 3 (in the second chunk of two rows) has id 9, which no gallery item has
    with pytest.raises(ValueError, match=r"query 3 \(id 9\) has no relevant gallery item"):
        per_query_ranks_and_ap(scores, torch.tensor([0, 1, 2, 9, 0]), torch.tensor([0, 1, 2, 3]), chunk=2)
    with pytest.raises(ValueError, match="no relevant"):
        per_query_ranks_and_ap(torch.zeros(1, 0), torch.tensor([0]), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        per_query_ranks_and_ap(scores, torch.arange(5) % 4, torch.arange(4), chunk=0)
    nan = scores.clone()
    nan[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        per_query_ranks_and_ap(nan, torch.arange(5) % 4, torch.arange(4))
    # +inf and -inf in one row sum to NaN, but hold no NaN: accepted
    both = scores.clone()
    both[0, :2] = torch.tensor([float("inf"), float("-inf")])
    per_query_ranks_and_ap(both, torch.arange(5) % 4, torch.arange(4))
