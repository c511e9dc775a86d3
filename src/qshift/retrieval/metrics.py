"""Retrieval metrics: Recall@K with any-positive semantics, mAP over all positives, R-mean; opt-in
median rank (MedR).

Relevance is given by ids: gallery item ``j`` is relevant to query ``i`` iff
``query_ids[i] == gallery_ids[j]`` (an image and its captions share the image's id; a product or
person id makes many-to-many relevance).  A query with no relevant gallery item is an error.

Tie rule: ties are broken *against* the query, so a collapsed model cannot score by ties.  A
negative with the same score as a positive ranks above it; positives tied with each other keep
gallery order (which does not change any metric).  Hence the 0-based position of a query's ``j``-th
best positive (``j`` from 1) is ``neg_ge + j - 1``, where ``neg_ge`` is the number of negatives
scoring at least that positive's score, and

* first-positive rank = ``neg_ge`` of the best positive = the number of items scoring strictly higher
  plus the negatives tied with it;
* AP = mean over the positives of ``j / (neg_ge_j + j)``.

So only the few positives' ``neg_ge`` are needed, not a sort of the gallery: each is one
compare-and-count pass over the row (rows processed in cache-sized tiles).  A query with more than
``_MAX_COUNT_PASSES`` positives sorts its rows once instead.  Memory stays bounded by ``chunk`` rows:
nothing larger than a ``chunk x n_gallery`` matrix is made (a float tile of at most
``_TILE_ELEMENTS`` elements on CPU).  APs are computed in float64.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# more positives per query than this: one sort of each row beats one counting pass per positive
_MAX_COUNT_PASSES = 128
# elements per compare-and-count tile (the tile and its float mask stay in cache on CPU)
_TILE_ELEMENTS = {"cpu": 1 << 20}
_TILE_ELEMENTS_OTHER = 1 << 24
_RECALL_NAME = re.compile(r"R@([1-9][0-9]*)")
_SUBSET_RECALL_NAME = re.compile(r"R_s@([1-9][0-9]*)")


def _check_shapes(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_gallery], got shape {tuple(scores.shape)}")
    if query_ids.shape != (scores.shape[0],):
        raise ValueError(f"query_ids must have shape ({scores.shape[0]},), got {tuple(query_ids.shape)}")
    if gallery_ids.shape != (scores.shape[1],):
        raise ValueError(f"gallery_ids must have shape ({scores.shape[1]},), got {tuple(gallery_ids.shape)}")


def _check_finite_or_inf(block: torch.Tensor) -> None:
    """Raise if ``block`` holds a NaN (a NaN makes the sum NaN; only then is the exact test run)."""
    if torch.isnan(block.sum()) and torch.isnan(block).any():
        raise ValueError("scores contain NaN")


def _count_at_or_above(block: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``out[i, k]`` = number of entries of ``block[i]`` that are ``>= thresholds[i, k]`` (int64).

    One compare-and-count pass per threshold column, tile by tile; the comparison is written into a
    float buffer (exact for counts below 2**24, float64 beyond), whose row sums are much faster than
    a boolean mask's.
    """
    n_rows, n = block.shape
    per_tile = _TILE_ELEMENTS.get(block.device.type, _TILE_ELEMENTS_OTHER)
    rows = max(1, min(n_rows, per_tile // max(n, 1)))
    buf = torch.empty(rows, n, dtype=torch.float32 if n < (1 << 24) else torch.float64, device=block.device)
    out = torch.empty(thresholds.shape, dtype=torch.int64, device=block.device)
    for s in range(0, n_rows, rows):
        tile, t = block[s:s + rows], thresholds[s:s + rows]
        _check_finite_or_inf(tile)
        mask = buf[:tile.shape[0]]
        for k in range(t.shape[1]):
            out[s:s + rows, k] = torch.ge(tile, t[:, k:k + 1], out=mask).sum(1)
    return out


def _negatives_at_or_above(block: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                           count: torch.Tensor) -> torch.Tensor:
    """Per query, ``neg_ge`` of each positive, ascending; padding slots (``~valid``) hold ``n + 1``.

    ``pos[i, k]`` is the score of query ``i``'s ``k``-th positive where ``valid[i, k]``, and
    ``count[i]`` its number of positives.
    """
    n = block.shape[1]
    # positives scoring >= each positive: padding as +inf sorts last and is never < a score
    pos_sorted = pos.masked_fill(~valid, float("inf")).sort(1).values
    pos_ge = count[:, None] - torch.searchsorted(pos_sorted, pos, side="left")
    if pos.shape[1] <= _MAX_COUNT_PASSES:
        all_ge = _count_at_or_above(block, pos)
    else:
        _check_finite_or_inf(block)
        all_ge = n - torch.searchsorted(block.sort(1).values, pos, side="left")
    return (all_ge - pos_ge).masked_fill(~valid, n + 1).sort(1).values


def _ranks_and_ap_block(block: torch.Tensor, query_ids: torch.Tensor, sorted_ids: torch.Tensor,
                        order: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First-positive ranks and APs of one block of rows (``sorted_ids = gallery_ids[order]``)."""
    lo = torch.searchsorted(sorted_ids, query_ids, side="left")
    count = torch.searchsorted(sorted_ids, query_ids, side="right") - lo
    if (count == 0).any():
        missing = int((count == 0).nonzero()[0])
        raise ValueError(f"query {offset + missing} (id {query_ids[missing].item()}) has no relevant gallery item")
    slots = torch.arange(int(count.max()), device=block.device)
    valid = slots < count[:, None]
    index = order[(lo[:, None] + slots).clamp_(max=len(order) - 1)]
    neg_ge = _negatives_at_or_above(block, torch.gather(block, 1, index), valid, count)
    j = (slots + 1).to(torch.float64)
    ap = (j / (neg_ge.to(torch.float64) + j)).masked_fill_(~valid, 0.0).sum(1) / count
    return neg_ge[:, 0], ap


def per_query_ranks_and_ap(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                           chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's first-positive rank (0-based, int64) and average precision (float64).

    Ties count against the query (module docstring).  ``chunk`` rows are scored at a time; the
    results are on ``scores``' device.  Raises ``ValueError`` for bad shapes, NaN scores or a query
    with no relevant gallery item.
    """
    query_ids, gallery_ids = torch.as_tensor(query_ids), torch.as_tensor(gallery_ids)
    _check_shapes(scores, query_ids, gallery_ids)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = scores.device
    common = torch.promote_types(query_ids.dtype, gallery_ids.dtype)
    query_ids, gallery_ids = query_ids.to(device, common), gallery_ids.to(device, common)
    order = torch.argsort(gallery_ids, stable=True)
    sorted_ids = gallery_ids[order].contiguous()
    ranks = [torch.empty(0, dtype=torch.int64, device=device)]
    aps = [torch.empty(0, dtype=torch.float64, device=device)]
    for s in range(0, scores.shape[0], chunk):
        block = scores[s:s + chunk].detach()
        block = (block if block.is_floating_point() else block.float()).contiguous()
        r, a = _ranks_and_ap_block(block, query_ids[s:s + chunk].contiguous(), sorted_ids, order, s)
        ranks.append(r)
        aps.append(a)
    return torch.cat(ranks), torch.cat(aps)


def first_positive_rank(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked relevant gallery item (ties counted against it)."""
    return per_query_ranks_and_ap(scores, query_ids, gallery_ids)[0]


def average_precision(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """Per-query average precision over all relevant items (ties ranked against the query), float64."""
    return per_query_ranks_and_ap(scores, query_ids, gallery_ids)[1]


def median_rank(ranks: torch.Tensor) -> float:
    """MedR: the median over queries of the 1-based rank of each query's first positive.

    ``ranks`` are this module's 0-based first-positive ranks (ties counted against the query).  With an
    even number of queries the two middle ranks are averaged (numpy's median), as CAV-MAE's retrieval
    evaluation (``np.median(ind) + 1``) and the video-retrieval literature report it; lower is better.
    """
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("no queries to summarise")
    r = ranks.detach().reshape(-1).to("cpu", torch.float64).sort().values + 1.0
    n = r.numel()
    return float(r[n // 2]) if n % 2 else float((r[n // 2 - 1] + r[n // 2]) / 2)


def summarise(ranks: torch.Tensor, aps: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS,
              metrics: Sequence[str] | None = None, subset_ranks: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics from per-query ranks and APs (same keys as ``retrieval_metrics``).

    ``metrics`` (opt-in, e.g. a task's ``Task.metrics``) adds the named metrics that the default keys
    lack: ``"MedR"`` (:func:`median_rank`, in ranks, not percent) and ``"R@K"`` for a K outside ``ks``;
    names already among the default keys are left as they are.  A name these ranks cannot give (CIRR's
    subset recall ``R_s@K`` needs each query's rank within its group, ``subset_ranks``, from
    :func:`qshift.retrieval.cir_metrics.cir_ranks`) raises ``ValueError``.
    """
    if ranks.numel() == 0:
        raise ValueError("no queries to summarise")
    out = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
    out["mAP"] = 100.0 * aps.double().mean().item()
    out["R-mean"] = sum(out[f"R@{k}"] for k in ks) / len(ks)
    for name in metrics or ():
        if name in out:
            continue
        recall = _RECALL_NAME.fullmatch(name)
        subset = _SUBSET_RECALL_NAME.fullmatch(name)
        if subset and subset_ranks is not None:
            out[name] = 100.0 * (torch.as_tensor(subset_ranks) < int(subset.group(1))).double().mean().item()
        elif name == "MedR":
            out[name] = median_rank(ranks)
        elif recall:
            out[name] = 100.0 * (ranks < int(recall.group(1))).double().mean().item()
        elif subset:
            raise ValueError(f"summarise cannot compute {name!r} without each query's rank within its group "
                             "(subset_ranks, from qshift.retrieval.cir_metrics.cir_ranks)")
        else:
            raise ValueError(f"summarise cannot compute {name!r} from ranks and APs; it computes R@K, mAP, "
                             "R-mean, MedR and, given subset_ranks, R_s@K")
    return out


def retrieval_metrics(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                      ks: tuple[int, ...] = DEFAULT_KS, chunk: int = 2048,
                      metrics: Sequence[str] | None = None) -> dict[str, float]:
    """``{"R@1", "R@5", "R@10", "mAP", "R-mean"}`` in percent, over all queries (plus the opt-in
    ``metrics`` of :func:`summarise`, e.g. ``"MedR"``).

    ``chunk`` bounds memory: rows are processed in blocks of that many queries.
    """
    query_ids, gallery_ids = torch.as_tensor(query_ids), torch.as_tensor(gallery_ids)
    _check_shapes(scores, query_ids, gallery_ids)
    if scores.shape[0] == 0:
        raise ValueError("no queries to score")
    return summarise(*per_query_ranks_and_ap(scores, query_ids, gallery_ids, chunk), ks, metrics)


def candidate_ranks_and_ap(scores: torch.Tensor, rows: torch.Tensor, query_ids: torch.Tensor,
                           gallery_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks and APs from each query's top-K candidates only: ``scores`` [B, K] over gallery ``rows``
    [B, K] (a method run with ``candidates=K``).

    Within the candidates the ranking is exact (ties against the query, as everywhere here).  A query
    with no positive among its candidates gets rank ``N`` (the gallery size: a miss at every depth), and
    positives outside the candidates add 0 to its AP — so R@k for k ≤ K equals the whole-gallery value
    when the candidates are the true top-K, while mAP, MedR and R@k for k > K are bounds (docs/large-galleries.md).
    """
    query_ids, gallery_ids = torch.as_tensor(query_ids), torch.as_tensor(gallery_ids)
    if scores.ndim != 2 or rows.shape != scores.shape or query_ids.shape != (scores.shape[0],):
        raise ValueError(f"scores {tuple(scores.shape)}, rows {tuple(rows.shape)} and query_ids "
                         f"{tuple(query_ids.shape)} do not fit: [B, K], [B, K], [B]")
    device = scores.device
    gallery_ids, query_ids, rows = gallery_ids.to(device), query_ids.to(device), rows.to(device)
    block = scores.detach().double()
    _check_finite_or_inf(block)
    rel = gallery_ids[rows] == query_ids[:, None]
    # ties against the query: negatives first, then a stable sort by score, best first
    first = torch.argsort(rel.to(torch.int8), dim=1, stable=True)
    second = torch.argsort(block.gather(1, first), dim=1, descending=True, stable=True)
    rel_sorted = rel.gather(1, first.gather(1, second))
    ids, counts = torch.unique(gallery_ids, return_counts=True)
    at = torch.searchsorted(ids, query_ids).clamp_max(len(ids) - 1)
    n_pos = torch.where(ids[at] == query_ids, counts[at], torch.zeros_like(counts[at]))
    if bool((n_pos == 0).any()):
        raise ValueError("a query has no relevant gallery item")
    found = rel_sorted.any(1)
    position = torch.arange(scores.shape[1], device=device, dtype=torch.float64)
    hits = rel_sorted.double()
    ap = (hits * hits.cumsum(1) / (position + 1)).sum(1) / n_pos.double()
    ranks = torch.where(found, rel_sorted.to(torch.int8).argmax(1), torch.full_like(n_pos, len(gallery_ids)))
    return ranks.to(torch.int64), ap
