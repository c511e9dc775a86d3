"""CIRR and FashionIQ metrics (qshift.retrieval.cir_metrics) against a brute-force reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qshift.retrieval.cir_metrics import cir_ranks, cirr_metrics, fashioniq_metrics


def brute_rank(row: list[float], target: int, removed: set[int], members: list[int] | None = None) -> int:
    """Sort the candidates best first, ties against the target (it goes after every tied item)."""
    pool = [j for j in (range(len(row)) if members is None else members) if j not in removed]
    order = sorted(pool, key=lambda j: (-row[j], j == target))
    return order.index(target)


@st.composite
def cir_case(draw):
    n = draw(st.integers(3, 12))
    q = draw(st.integers(1, 8))
    scores = draw(st.lists(st.lists(st.integers(0, 4), min_size=n, max_size=n), min_size=q, max_size=q))
    targets = [draw(st.integers(0, n - 1)) for _ in range(q)]
    refs = [draw(st.integers(0, n - 1).filter(lambda r, t=t: r != t)) for t in targets]
    groups = []
    for t, r in zip(targets, refs):
        others = draw(st.lists(st.integers(0, n - 1), max_size=4, unique=True))
        members = list(dict.fromkeys([t, r, *others]))
        groups.append(members)
    width = max(len(g) for g in groups)
    padded = [g + [-1] * (width - len(g)) for g in groups]
    return scores, targets, refs, groups, padded


@settings(max_examples=150, deadline=None)
@given(cir_case(), st.integers(1, 3))
def test_cir_ranks_equal_brute_force_with_ties_against_the_query(case, chunk):
    scores, targets, refs, groups, padded = case
    s = torch.tensor(scores, dtype=torch.float32)
    ranks, sub = cir_ranks(s, torch.tensor(targets), torch.tensor(refs), torch.tensor(padded), chunk=chunk)
    for i, row in enumerate(scores):
        assert int(ranks[i]) == brute_rank(row, targets[i], {refs[i]})
        assert int(sub[i]) == brute_rank(row, targets[i], {refs[i]}, groups[i])
    plain, _ = cir_ranks(s, torch.tensor(targets))
    for i, row in enumerate(scores):
        assert int(plain[i]) == brute_rank(row, targets[i], set())


def test_cirr_removes_the_reference_and_reports_subset_recall():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # the reference (row 0) scores highest: removed, the target is first
                           [0.1, 0.2, 0.3, 0.95]])  # reference row 3 removed; row 2 still beats the target
    targets, refs = torch.tensor([1, 1]), torch.tensor([0, 3])
    groups = torch.tensor([[0, 1, 2], [1, 3, -1]])  # query 1's group leaves row 2 out
    assert cir_ranks(scores, targets, refs, groups)[0].tolist() == [0, 1]
    m = cirr_metrics(scores, targets, refs, groups)
    assert (m["R@1"], m["R@5"], m["R_s@1"], m["R_s@3"]) == (50.0, 100.0, 100.0, 100.0)
    kept = fashioniq_metrics(scores, targets, ks=(1, 2, 3))  # FashionIQ keeps the references
    assert (kept["R@1"], kept["R@2"], kept["R@3"]) == (0.0, 50.0, 100.0)


def test_bad_cir_inputs_are_named():
    s = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="reference is its target"):
        cir_ranks(s, torch.tensor([1, 2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="not a gallery row"):
        cir_ranks(s, torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="subset does not hold its target"):
        cir_ranks(s, torch.tensor([1, 2]), subsets=torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        cir_ranks(torch.full((1, 3), float("nan")), torch.tensor([0]))
