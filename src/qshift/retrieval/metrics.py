"""Retrieval metrics: Recall@K with any-positive semantics, mAP over all positives, R-mean.

Relevance is given by ids: gallery item ``j`` is relevant to query ``i`` iff
``query_ids[i] == gallery_ids[j]`` (an image and its captions share the image's id; a product or
person id makes many-to-many relevance).  Ties are broken *against* the query: a negative with the
same score as a positive ranks above it, so a collapsed model cannot score by ties.
"""
from __future__ import annotations

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _check(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_gallery], got shape {tuple(scores.shape)}")
    if query_ids.shape != (scores.shape[0],):
        raise ValueError(f"query_ids must have shape ({scores.shape[0]},), got {tuple(query_ids.shape)}")
    if gallery_ids.shape != (scores.shape[1],):
        raise ValueError(f"gallery_ids must have shape ({scores.shape[1]},), got {tuple(gallery_ids.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")


def first_positive_rank(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked relevant gallery item (ties counted against it)."""
    _check(scores, query_ids, gallery_ids)
    rel = query_ids[:, None] == gallery_ids[None, :]
    if not rel.any(1).all():
        missing = int((~rel.any(1)).nonzero()[0])
        raise ValueError(f"query {missing} (id {int(query_ids[missing])}) has no relevant gallery item")
    best = scores.masked_fill(~rel, float("-inf")).amax(1, keepdim=True)
    above = (scores > best).sum(1)
    tied_neg = ((scores == best) & ~rel).sum(1)
    return above + tied_neg


def average_precision(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """Per-query average precision over all relevant items (ties ranked against the query)."""
    _check(scores, query_ids, gallery_ids)
    rel = query_ids[:, None] == gallery_ids[None, :]
    n_rel = rel.sum(1)
    if (n_rel == 0).any():
        missing = int((n_rel == 0).nonzero()[0])
        raise ValueError(f"query {missing} (id {int(query_ids[missing])}) has no relevant gallery item")
    # negatives first, then a stable descending sort by score: among equal scores negatives lead
    order0 = torch.argsort(rel.to(torch.int8), dim=1, stable=True)
    s0 = torch.gather(scores, 1, order0)
    order1 = torch.argsort(s0, dim=1, descending=True, stable=True)
    rel_sorted = torch.gather(torch.gather(rel, 1, order0), 1, order1).to(scores.dtype if scores.is_floating_point() else torch.float32)
    hits = rel_sorted.cumsum(1)
    positions = torch.arange(1, scores.shape[1] + 1, dtype=hits.dtype, device=scores.device)
    return (hits / positions * rel_sorted).sum(1) / n_rel.to(hits.dtype)


def retrieval_metrics(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                      ks: tuple[int, ...] = DEFAULT_KS, chunk: int = 2048) -> dict[str, float]:
    """``{"R@1", "R@5", "R@10", "mAP", "R-mean"}`` in percent, over all queries.

    ``chunk`` bounds memory: rows are processed in blocks of that many queries.
    """
    query_ids = torch.as_tensor(query_ids)
    gallery_ids = torch.as_tensor(gallery_ids)
    _check(scores, query_ids, gallery_ids)
    if scores.shape[0] == 0:
        raise ValueError("no queries to score")
    ranks, aps = [], []
    for s in range(0, scores.shape[0], chunk):
        block = scores[s:s + chunk]
        block = block if block.is_floating_point() else block.float()
        ranks.append(first_positive_rank(block, query_ids[s:s + chunk], gallery_ids))
        aps.append(average_precision(block, query_ids[s:s + chunk], gallery_ids))
    rank = torch.cat(ranks)
    out = {f"R@{k}": 100.0 * (rank < k).double().mean().item() for k in ks}
    out["mAP"] = 100.0 * torch.cat(aps).double().mean().item()
    out["R-mean"] = sum(out[f"R@{k}"] for k in ks) / len(ks)
    return out


def per_query_ranks_and_ap(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                           chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's first-positive rank and average precision (for online scoring batch by batch)."""
    query_ids, gallery_ids = torch.as_tensor(query_ids), torch.as_tensor(gallery_ids)
    ranks, aps = [], []
    for s in range(0, scores.shape[0], chunk):
        block = scores[s:s + chunk].detach()
        block = block if block.is_floating_point() else block.float()
        ranks.append(first_positive_rank(block, query_ids[s:s + chunk], gallery_ids))
        aps.append(average_precision(block, query_ids[s:s + chunk], gallery_ids))
    return torch.cat(ranks), torch.cat(aps)


def summarise(ranks: torch.Tensor, aps: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Metrics from per-query ranks and APs (same keys as ``retrieval_metrics``)."""
    if ranks.numel() == 0:
        raise ValueError("no queries to summarise")
    out = {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
    out["mAP"] = 100.0 * aps.double().mean().item()
    out["R-mean"] = sum(out[f"R@{k}"] for k in ks) / len(ks)
    return out
