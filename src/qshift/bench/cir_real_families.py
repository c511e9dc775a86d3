"""The real composed-image-retrieval benchmark families: FashionIQ-C and CIRR-C (``--dataset fashioniq|cirr
--data-root DIR``; the loaders are src/qshift/data/cir_datasets.py), direction ``cir``.

* ``fashioniq/<category>``, ``cirr/clean`` — the clean val split;
* ``fashioniq-c/<category>/<corruption>/<severity>``, ``cirr-c/<corruption>/<severity>`` — the reference image
  under an image corruption, corrupted on the fly (data-loader workers and the on-disk cache of
  src/qshift/data/pipeline.py), seeded by (the reference's gallery row, corruption, severity, shift seed):
  the same pixels whatever query, batch or worker it lands in, and what ``qshift shifts materialize`` writes;
* ``fashioniq-c/<category>/text/<perturbation>/<level>``, ``cirr-c/text/<perturbation>/<level>`` — each
  relative caption under a text perturbation (:func:`qshift.data.cir_datasets.perturb_queries`), cached.

Relevance: FashionIQ keeps the reference in the ranking, and a query's id is its target's gallery row
(``gallery_ids`` = 0..N-1, no :class:`QueryRelevance`), so queries sharing a target are all scored against it.
CIRR removes the reference and ranks the subset within the img_set, both per query: a query's id is its index
in the split and ``QueryRelevance(exclude, subsets, positive)`` holds, per query, its reference row, its
img_set rows and its target row — so queries that share a target but not a reference or img_set each remove
their own reference (as :func:`qshift.retrieval.cir_metrics.cirr_metrics` does offline).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from qshift.bench import cache
from qshift.bench.families import _ids, _image_size, _rows
from qshift.bench.registry import BuildContext, Family, register_family
from qshift.data import pipeline, streams
from qshift.data.cir_datasets import FASHIONIQ_CATEGORIES, CIRDataset, perturb_queries, reference_paths_by_row
from qshift.data.karpathy import ImageTextDataset
from qshift.data.task import QueryRelevance, RetrievalTask
from qshift.errors import UserError
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, available_corruptions
from qshift.bench.cir_families import CIR_TEXT_PERTURBATIONS
from qshift.shifts.text import ALL_TEXT_PERTURBATIONS, LEVELS, real_lexicon_key


class _Pairs(Sequence):
    """Composed queries read on access: item ``k`` is ``(images[at[k]], texts[k])``."""

    def __init__(self, images: Sequence, at: np.ndarray, texts: list[str]) -> None:
        if len(at) != len(texts):
            raise ValueError(f"{len(at)} reference images for {len(texts)} texts")
        self.images, self.at, self.texts = images, np.asarray(at, dtype=np.int64), list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.images[int(self.at[k])], self.texts[k]


def _split(ctx: BuildContext, p: dict[str, Any]) -> CIRDataset:
    """The loaded split a benchmark reads (FashionIQ: its category), checked to have targets."""
    ds = ctx.dataset
    split = ds.category(p["category"]) if "category" in p else ds
    if not isinstance(split, CIRDataset):
        raise UserError(f"the {p.get('dataset')} benchmarks read a dataset loaded by qshift.data.cir_datasets")
    if not split.has_targets:
        raise UserError(f"{split.label}: its targets are not public (a test split); evaluate on val, or write the "
                        "CIRR test-server files with qshift.retrieval.cirr_submission")
    return split


def _images(ds: CIRDataset, paths: list, part: str) -> ImageTextDataset:
    """Images as the pipeline reads them (a dataset of images only), keyed by the split's annotation digest."""
    return ImageTextDataset(f"{ds.label}-{part}", list(paths), [], np.zeros(0, np.int64), format=ds.name,
                            annotation_sha256=ds.fingerprint())


def relevance(ds: CIRDataset) -> tuple[np.ndarray, QueryRelevance | None]:
    """(each query's id, the task's relevance): FashionIQ — ids = target gallery rows, no relevance; CIRR —
    ids = query indices, ``QueryRelevance`` of each query's reference (``exclude``), img_set (``subsets``) and
    target (``positive``) rows."""
    if ds.subsets is None and bool((ds.exclude < 0).all()):
        return ds.targets.copy(), None
    subsets = None if ds.subsets is None else ds.subsets.copy()
    return (np.arange(len(ds), dtype=np.int64),
            QueryRelevance(exclude=ds.exclude.copy(), subsets=subsets, positive=ds.targets.copy()))


def _reference_images(ctx: BuildContext, ds: CIRDataset, idx: np.ndarray, corruption: str | None,
                      severity: int = 0) -> tuple[Sequence, np.ndarray]:
    """(the distinct reference images of queries ``idx`` — corrupted and cached, or clean and decoded on
    access —, each query's position in them)."""
    rows, at = np.unique(ds.reference_rows[idx], return_inverse=True)
    refs = _images(ds, reference_paths_by_row(ds), "references")
    if corruption is None:
        return pipeline.LazyImages(refs, rows, size=_image_size(ctx)), at
    images = pipeline.query_images(refs, corruption, severity, ctx.shift_seed, rows=rows, workers=ctx.workers,
                                   size=_image_size(ctx), progress=ctx.progress)
    return images, at


def _texts(ds: CIRDataset, idx: np.ndarray) -> list[str]:
    return [ds.texts[i] for i in idx.tolist()]


def _perturbed_texts(ctx: BuildContext, ds: CIRDataset, pert: str, lvl: int, idx: np.ndarray) -> list[str]:
    """The texts of queries ``idx`` under ``pert`` at ``lvl``, cached (key: the annotation files' digest)."""
    spec = {"kind": "cirperturb", "pipeline_version": pipeline.PIPELINE_VERSION, "dataset": ds.label,
            "annotation_sha256": ds.fingerprint(), "perturbation": pert, "level": lvl, "shift_seed": ctx.shift_seed,
            "nlpaug": metadata.version("nlpaug"), "lexicon": real_lexicon_key(pert),
            "rows": hashlib.sha256(np.ascontiguousarray(idx).tobytes()).hexdigest()[:24], "n_rows": len(idx)}
    return cache.cached_texts(spec, lambda: perturb_queries(ds, pert, lvl, ctx.shift_seed, idx.tolist())[0])


def _task(ctx: BuildContext, ds: CIRDataset, query_set: streams.QuerySet, idx: np.ndarray) -> RetrievalTask:
    ids, rel = relevance(ds)
    clean_images, at = _reference_images(ctx, ds, idx, None)
    clean = streams.QuerySet("clean", _Pairs(clean_images, at, _texts(ds, idx)), ids[idx])
    gallery = pipeline.LazyImages(_images(ds, ds.gallery_paths, "gallery"), size=_image_size(ctx))
    return RetrievalTask("", "cir", [query_set], gallery, np.arange(len(ds.gallery_names)), clean_queries=clean,
                         meta={"dataset": ds.label, "protocol": ds.name}, relevance=rel)


def _clean(ctx, p):
    ds = _split(ctx, p)
    idx = _ids(_rows(ctx, len(ds)), len(ds))
    ids, _ = relevance(ds)
    images, at = _reference_images(ctx, ds, idx, None)
    return _task(ctx, ds, streams.QuerySet("clean", _Pairs(images, at, _texts(ds, idx)), ids[idx]), idx)


def _image_side(ctx, p):
    ds, c, sev = _split(ctx, p), p["corruption"], p["severity"]
    idx = _ids(_rows(ctx, len(ds)), len(ds))
    ids, _ = relevance(ds)
    images, at = _reference_images(ctx, ds, idx, c, sev)
    return _task(ctx, ds, streams.QuerySet(f"{c}-{sev}", _Pairs(images, at, _texts(ds, idx)), ids[idx]), idx)


def _text_side(ctx, p):
    ds, pert, lvl = _split(ctx, p), p["perturbation"], p["level"]
    idx = _ids(_rows(ctx, len(ds)), len(ds))
    ids, _ = relevance(ds)
    images, at = _reference_images(ctx, ds, idx, None)
    texts = _perturbed_texts(ctx, ds, pert, lvl, idx)
    return _task(ctx, ds, streams.QuerySet(f"{pert}-{lvl}", _Pairs(images, at, texts), ids[idx]), idx)


# ------------------------------------------------------------------------------- registrations

def _values(*values):
    return lambda: values


_FIQ, _CIRR, _CATS = _values("fashioniq"), _values("cirr"), _values(*FASHIONIQ_CATEGORIES)
_CORR = {"corruption": available_corruptions, "severity": _values(*SEVERITIES)}
_TEXT = {"perturbation": _values(*ALL_TEXT_PERTURBATIONS), "level": _values(*LEVELS)}
_LISTED = {"corruption": _values(*CORRUPTIONS)}
#: the text families list the composed task's corruptions, as the embedded CIR families do
_LISTED_TEXT = {"perturbation": _values(*CIR_TEXT_PERTURBATIONS)}

register_family(Family("fashioniq", "{dataset}/{category}", {"dataset": _FIQ, "category": _CATS}, _clean, "cir",
                       title="FashionIQ: clean (R@10)", column="{category}", summary="FashionIQ clean",
                       needs_dataset=True))
register_family(Family("fashioniq-c/image", "{dataset}-c/{category}/{corruption}/{severity}",
                       {"dataset": _FIQ, "category": _CATS, **_CORR}, _image_side, "cir",
                       title="FashionIQ-C {category}: reference-image corruptions, severity {severity} (R@10)",
                       column="{corruption}", summary="FashionIQ-C {category} s{severity}",
                       summary_rank=lambda p: (-p["severity"],), needs_dataset=True, list_params=_LISTED))
register_family(Family("fashioniq-c/text", "{dataset}-c/{category}/text/{perturbation}/{level}",
                       {"dataset": _FIQ, "category": _CATS, **_TEXT}, _text_side, "cir",
                       title="FashionIQ-C {category}: caption perturbations, level {level} (R@10)",
                       column="{perturbation}", summary="FashionIQ-C {category} text L{level}",
                       summary_rank=lambda p: (-p["level"],), needs_dataset=True, list_params=_LISTED_TEXT))
register_family(Family("cirr", "{dataset}/{view}", {"dataset": _CIRR, "view": _values("clean")}, _clean, "cir",
                       title="CIRR: clean (R@1)", column="{view}", summary="CIRR clean", needs_dataset=True))
register_family(Family("cirr-c/image", "{dataset}-c/{corruption}/{severity}", {"dataset": _CIRR, **_CORR},
                       _image_side, "cir", title="CIRR-C: reference-image corruptions, severity {severity} (R@1)",
                       column="{corruption}", summary="CIRR-C s{severity}", summary_rank=lambda p: (-p["severity"],),
                       needs_dataset=True, list_params=_LISTED))
register_family(Family("cirr-c/text", "{dataset}-c/text/{perturbation}/{level}", {"dataset": _CIRR, **_TEXT},
                       _text_side, "cir", title="CIRR-C: caption perturbations, level {level} (R@1)",
                       column="{perturbation}", summary="CIRR-C text L{level}", summary_rank=lambda p: (-p["level"],),
                       needs_dataset=True, list_params=_LISTED_TEXT))
