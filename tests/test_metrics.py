import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qshift.retrieval.metrics import average_precision, first_positive_rank, retrieval_metrics


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
