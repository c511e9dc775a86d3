"""CIRR's test-server submission files (https://cirr.cecs.anu.edu.au/, Test-split_server.md of the CIRR repo).

Two JSON objects, each with the dataset version and the metric, then one entry per query ``pairid``:

* recall: ``{"version": "rc2", "metric": "recall", "<pairid>": [the top-50 gallery names], ...}`` — the query's
  reference image removed from its ranking;
* subset: ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [the top-3 names], ...}`` — ranked among
  the query's ``img_set`` members, the reference removed.

Both are computed from one score matrix [Q, N] with ``torch.topk`` (no Python loop over the gallery) and
written atomically.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qshift.atomic import write_text_atomic

CIRR_VERSION = "rc2"
RECALL_TOP = 50
SUBSET_TOP = 3


def _check(scores: torch.Tensor, pair_ids, gallery_names: Sequence[str], reference_rows, subsets) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, n_gallery], got shape {tuple(scores.shape)}")
    q, n = scores.shape
    if len(gallery_names) != n:
        raise ValueError(f"scores have {n} gallery columns but {len(gallery_names)} gallery names are given")
    if len(pair_ids) != q:
        raise ValueError(f"scores have {q} query rows but {len(pair_ids)} pair ids are given")
    if len(set(int(p) for p in pair_ids)) != q:
        raise ValueError("pair ids must be unique (one entry per query)")
    if reference_rows.shape != (q,) or bool(((reference_rows < 0) | (reference_rows >= n)).any()):
        raise ValueError(f"reference_rows must be {q} gallery rows in [0, {n}), got shape {tuple(reference_rows.shape)}")
    if subsets.ndim != 2 or subsets.shape[0] != q:
        raise ValueError(f"subsets must be [{q}, S] gallery rows (-1 pads), got shape {tuple(subsets.shape)}")
    if bool(((subsets < -1) | (subsets >= n)).any()):
        raise ValueError("a subset entry is neither a gallery row nor -1 (padding)")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")


@torch.no_grad()
def cirr_predictions(scores: torch.Tensor, pair_ids: Sequence[int], gallery_names: Sequence[str],
                     reference_rows, subsets, top: int = RECALL_TOP, subset_top: int = SUBSET_TOP
                     ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``({pairid: top-``top`` gallery names, reference removed}, {pairid: top-``subset_top`` names among the
    query's subset rows, reference and -1 padding removed})`` from ``scores`` [Q, N]."""
    scores = torch.as_tensor(scores).detach().float().cpu()
    ref = torch.as_tensor(np.asarray(reference_rows)).long()
    sub = torch.as_tensor(np.asarray(subsets)).long()
    _check(scores, pair_ids, gallery_names, ref, sub)
    q, n = scores.shape
    rows = torch.arange(q)
    masked = scores.clone()
    masked[rows, ref] = float("-inf")
    k = min(top, n - 1)
    top_rows = masked.topk(k, dim=1).indices
    valid = (sub >= 0) & (sub != ref[:, None])
    member = scores.gather(1, sub.clamp_min(0)).masked_fill(~valid, float("-inf"))
    ks = min(subset_top, sub.shape[1])
    best = member.topk(ks, dim=1).indices
    sub_rows = sub.gather(1, best)
    sub_ok = valid.gather(1, best)
    names = np.asarray(gallery_names, dtype=object)
    recall = {str(int(p)): names[r].tolist() for p, r in zip(pair_ids, top_rows.numpy())}
    subset = {str(int(p)): names[r[ok]].tolist() for p, r, ok in zip(pair_ids, sub_rows.numpy(), sub_ok.numpy())}
    return recall, subset


def write_cirr_submission(scores: torch.Tensor, pair_ids: Sequence[int], gallery_names: Sequence[str],
                          reference_rows, subsets, recall_path: str | Path, subset_path: str | Path
                          ) -> tuple[Path, Path]:
    """Write the recall file (top-50, the reference removed) and the subset file (top-3 among the img_set
    members minus the reference) for ``scores`` [Q, N]; each atomically; returns both paths."""
    recall, subset = cirr_predictions(scores, pair_ids, gallery_names, reference_rows, subsets)
    out = []
    for path, metric, entries in ((recall_path, "recall", recall), (subset_path, "recall_subset", subset)):
        payload = {"version": CIRR_VERSION, "metric": metric, **entries}
        out.append(write_text_atomic(path, json.dumps(payload)))
    return out[0], out[1]


def write_cirr_submission_for(dataset, scores: torch.Tensor, out_dir: str | Path, name: str = "qshift"
                              ) -> tuple[Path, Path]:
    """:func:`write_cirr_submission` for a loaded CIRR split (:class:`qshift.data.cir_datasets.CIRDataset`):
    ``<out_dir>/recall_submission_<name>.json`` and ``<out_dir>/recall_subset_submission_<name>.json``."""
    if getattr(dataset, "name", None) != "cirr" or dataset.subsets is None:
        raise ValueError("CIRR submission files are written for a loaded CIRR split (load_cirr)")
    out = Path(out_dir)
    return write_cirr_submission(scores, dataset.pair_ids.tolist(), dataset.gallery_names, dataset.reference_rows,
                                 dataset.subsets, out / f"recall_submission_{name}.json",
                                 out / f"recall_subset_submission_{name}.json")
