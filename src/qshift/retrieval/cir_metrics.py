"""Composed image retrieval metrics: CIRR's Recall@K and Recall_subset@K, FashionIQ's Recall@K.

A CIR query (reference image + modification text) has exactly one target image in the gallery.

* **CIRR** ranks the whole gallery with the query's *reference image removed* (a query must not score by
  returning its own reference) and reports Recall@1/5/10/50; Recall_subset@1/2/3 ranks only the query's
  group — the ~6 near-duplicate images its reference belongs to — again without the reference.
* **FashionIQ** reports Recall@10/50 over the whole gallery, reference kept (as its evaluation does).

As everywhere in :mod:`qshift.retrieval.metrics`, ties count against the query: a target's 0-based rank
is the number of other (not removed) items scoring at least as high.  Rows are processed in chunks, so
memory stays at a ``chunk × N`` block; no sort of the gallery is made.
"""
from __future__ import annotations

import torch

__all__ = ["CIRR_KS", "CIRR_SUBSET_KS", "FASHIONIQ_KS", "cir_ranks", "cirr_metrics", "fashioniq_metrics"]

CIRR_KS: tuple[int, ...] = (1, 5, 10, 50)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
FASHIONIQ_KS: tuple[int, ...] = (10, 50)


def _check(scores: torch.Tensor, targets: torch.Tensor, references: torch.Tensor | None,
           subsets: torch.Tensor | None) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_gallery], got shape {tuple(scores.shape)}")
    q, n = scores.shape
    if targets.shape != (q,):
        raise ValueError(f"targets must have shape ({q},), got {tuple(targets.shape)}")
    if bool(((targets < 0) | (targets >= n)).any()):
        raise ValueError(f"a target is not a gallery row (0..{n - 1})")
    if references is not None:
        if references.shape != (q,):
            raise ValueError(f"references must have shape ({q},), got {tuple(references.shape)}")
        if bool((references == targets).any()):
            raise ValueError("a query's reference is its target: removing the reference would remove the target")
    if subsets is not None:
        if subsets.ndim != 2 or subsets.shape[0] != q:
            raise ValueError(f"subsets must be [n_queries, group size] gallery rows (-1 pads), got "
                             f"{tuple(subsets.shape)}")
        if bool((subsets >= n).any()) or bool((subsets < -1).any()):
            raise ValueError("a subset entry is neither a gallery row nor -1 (padding)")
        if not bool((subsets == targets[:, None]).any(1).all()):
            raise ValueError("a query's subset does not hold its target")


@torch.no_grad()
def cir_ranks(scores: torch.Tensor, targets: torch.Tensor, references: torch.Tensor | None = None,
              subsets: torch.Tensor | None = None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(0-based rank of each query's target over the gallery [Q], its rank within its subset [Q] or None).

    ``references`` [Q] (gallery rows) are removed from both rankings; ``subsets`` [Q, S] are gallery rows
    of each query's group, ``-1`` padding shorter groups."""
    targets = torch.as_tensor(targets).long()
    references = None if references is None else torch.as_tensor(references).long()
    subsets = None if subsets is None else torch.as_tensor(subsets).long()
    _check(scores, targets, references, subsets)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ranks, sub_ranks = [], []
    for s in range(0, scores.shape[0], chunk):
        block = scores[s:s + chunk].detach()
        block = block if block.is_floating_point() else block.float()
        if bool(torch.isnan(block).any()):
            raise ValueError("scores contain NaN")
        t = targets[s:s + chunk].to(block.device)
        target_score = block.gather(1, t[:, None])
        at_or_above = block >= target_score  # the target itself counts: subtract it below
        if references is not None:
            ref = references[s:s + chunk].to(block.device)
            at_or_above.scatter_(1, ref[:, None], False)
        ranks.append(at_or_above.sum(1) - 1)
        if subsets is not None:
            sub = subsets[s:s + chunk].to(block.device)
            valid = sub >= 0
            member = at_or_above.gather(1, sub.clamp_min(0)) & valid & (sub != t[:, None])
            if references is not None:
                member &= sub != ref[:, None]
            sub_ranks.append(member.sum(1))
    return torch.cat(ranks).cpu(), (torch.cat(sub_ranks).cpu() if subsets is not None else None)


def cirr_metrics(scores: torch.Tensor, targets: torch.Tensor, references: torch.Tensor,
                 subsets: torch.Tensor | None = None, ks: tuple[int, ...] = CIRR_KS,
                 subset_ks: tuple[int, ...] = CIRR_SUBSET_KS) -> dict[str, float]:
    """CIRR's metrics in percent: ``R@K`` with each reference removed, ``R_s@K`` within each query's group
    (when ``subsets`` are given), and their means ``R-mean`` / ``R_s-mean``."""
    ranks, sub = cir_ranks(scores, targets, references, subsets)
    out = {f"R@{k}": 100.0 * float((ranks < k).double().mean()) for k in ks}
    out["R-mean"] = sum(out[f"R@{k}"] for k in ks) / len(ks)
    if sub is not None:
        out.update({f"R_s@{k}": 100.0 * float((sub < k).double().mean()) for k in subset_ks})
        out["R_s-mean"] = sum(out[f"R_s@{k}"] for k in subset_ks) / len(subset_ks)
    return out


def fashioniq_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = FASHIONIQ_KS
                      ) -> dict[str, float]:
    """FashionIQ's Recall@10/50 in percent over the whole gallery (the reference kept), and their mean."""
    ranks, _ = cir_ranks(scores, targets)
    out = {f"R@{k}": 100.0 * float((ranks < k).double().mean()) for k in ks}
    out["R-mean"] = sum(out[f"R@{k}"] for k in ks) / len(ks)
    return out
