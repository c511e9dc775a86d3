"""The real video–audio benchmark families: VGGSound-C and Kinetics-Sounds-C (KS50-C), READ's benchmarks, as
retrieval (``--dataset vggsound|ks50 --data-root DIR``; the loader is src/qshift/data/av_datasets.py).

* ``<dataset>/<v2a|a2v>/clean`` — the clean set: clean clips against their clean audio tracks (or back);
* ``<dataset>-c/v2a/<corruption>/<severity>`` — video queries under one of READ's 15 frame corruptions
  (:data:`qshift.shifts.video.VIDEO_CORRUPTIONS`, severities 1–5) against the clean audio gallery;
* ``<dataset>-c/a2v/<corruption>/<severity>`` — audio queries under one of READ's 6 audio corruptions
  (:data:`qshift.shifts.audio.AUDIO_CORRUPTIONS`: gaussian_noise, traffic, crowd, rain, thunder, wind)
  against the clean video gallery.

The corrupted queries are READ's own files when the dataset finds them (``<json root>/<video|audio>/
<corruption>/severity_<s>.json`` or the ``-C`` sibling folder; :meth:`AVDataset.corrupted_source`), else
corrupted on the fly, seeded by (the clip's row, corruption, severity, shift seed); ``task.meta["shift_source"]``
records which (``read-c`` or ``on-the-fly``).  Relevance is one-to-one: a query's id is its clip's row in the
clean JSON, the gallery's ids are 0..N-1, so a clip's only positive is its own track (no
:class:`~qshift.data.task.QueryRelevance`).  The clean probe set is the same queries unshifted.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qshift.bench.families import _ids, _rows
from qshift.bench.registry import BuildContext, Family, register_family
from qshift.data import streams
from qshift.data.av_datasets import AV_DATASETS, AVDataset, LazyAudios, LazyClips
from qshift.data.task import RetrievalTask, gallery_modality, query_modality
from qshift.errors import UserError
from qshift.shifts.image import SEVERITIES


def _dataset(ctx: BuildContext, p: dict[str, Any]) -> AVDataset:
    ds = ctx.dataset
    if not isinstance(ds, AVDataset):
        raise UserError(f"the {p.get('dataset')} benchmarks read a dataset loaded by qshift.data.av_datasets "
                        f"(got {type(ds).__name__})")
    return ds


def _lazy(ds: AVDataset, modality: str, rows, **kw):
    return (LazyClips if modality == "video" else LazyAudios)(ds, rows, **kw)


def _task(ds: AVDataset, direction: str, domain: str, queries, idx: np.ndarray, meta: dict) -> RetrievalTask:
    q, g = query_modality(direction), gallery_modality(direction)
    clean = streams.QuerySet("clean", _lazy(ds, q, idx), idx)
    gallery = _lazy(ds, g, None)
    return RetrievalTask("", direction, [streams.QuerySet(domain, queries, idx)], gallery,
                         np.arange(len(ds), dtype=np.int64), clean_queries=clean,
                         meta={"dataset": ds.label, "protocol": "cavmae-retrieval", "frames": list(ds.frames),
                               "annotation_sha256": ds.fingerprint(), **meta})


def _clean(ctx, p):
    ds, direction = _dataset(ctx, p), p["direction"]
    idx = _ids(_rows(ctx, len(ds)), len(ds)).astype(np.int64)
    return _task(ds, direction, "clean", _lazy(ds, query_modality(direction), idx), idx, {"shift_source": "clean"})


def _corrupted(direction: str):
    def build(ctx, p):
        ds, c, sev = _dataset(ctx, p), p["corruption"], p["severity"]
        modality = query_modality(direction)
        idx = _ids(_rows(ctx, len(ds)), len(ds)).astype(np.int64)
        source = ds.corrupted_source(modality, c, sev)
        if source is not None:
            queries = _lazy(ds, modality, idx, source=source)
            meta = {"shift_source": "read-c", "shift_files": str(source.annotation)}
        else:
            queries = _lazy(ds, modality, idx, corruption=c, severity=sev, seed=ctx.shift_seed)
            meta = {"shift_source": "on-the-fly", "shift_seed": ctx.shift_seed}
        return _task(ds, direction, f"{c}-{sev}", queries, idx, {**meta, "corruption": c, "severity": sev})
    return build


# ------------------------------------------------------------------------------- registrations

def _values(*values):
    return lambda: values


def _video_corruptions():
    from qshift.shifts.video import VIDEO_CORRUPTIONS

    return VIDEO_CORRUPTIONS


def _audio_corruptions():
    from qshift.shifts.audio import AUDIO_CORRUPTIONS  # deferred: the audio shifts load their noise only when used

    return AUDIO_CORRUPTIONS


_AV = _values(*AV_DATASETS)
_SEV = _values(*SEVERITIES)

register_family(Family("av-clean", "{dataset}/{direction}/{view}",
                       {"dataset": _AV, "direction": _values("v2a", "a2v"), "view": _values("clean")}, _clean,
                       "direction", title="{dataset}: clean ({direction} R@1)", column="{direction}",
                       summary="{dataset} clean {direction}", needs_dataset=True))
register_family(Family("av-c/v2a", "{dataset}-c/v2a/{corruption}/{severity}",
                       {"dataset": _AV, "corruption": _video_corruptions, "severity": _SEV}, _corrupted("v2a"), "v2a",
                       title="{dataset}-C video corruptions, severity {severity} (v2a R@1)", column="{corruption}",
                       summary="{dataset}-C video s{severity}", summary_rank=lambda p: (-p["severity"],),
                       needs_dataset=True))
register_family(Family("av-c/a2v", "{dataset}-c/a2v/{corruption}/{severity}",
                       {"dataset": _AV, "corruption": _audio_corruptions, "severity": _SEV}, _corrupted("a2v"), "a2v",
                       title="{dataset}-C audio corruptions, severity {severity} (a2v R@1)", column="{corruption}",
                       summary="{dataset}-C audio s{severity}", summary_rank=lambda p: (-p["severity"],),
                       needs_dataset=True))
