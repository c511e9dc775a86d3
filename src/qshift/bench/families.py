"""Every built-in benchmark family, one registration each (the registry is src/qshift/bench/registry.py).

Embedded world (``qshift shifts list`` prints every name):

* ``world-clean/<i2t|t2i>`` — the clean 2,000-image test set;
* ``world-c/i2t/<corruption>/<severity>`` — image queries under one of the 16 corruptions (1–5);
* ``world-c/t2i/<perturbation>/<level>`` — caption queries under a character / word perturbation (1–7);
* ``world-qgs/<domain>/<i2t|t2i>`` — query–gallery shift: every image rendered in a new domain;
* ``world-style/<style>/<i2t|t2i>`` — captions in a held-out style (t2i: as queries, i2t: as gallery);
* ``world-mixed/i2t/c16-s5/<interleaved|segments>``, ``world-mixed/t2i/char-l6/<…>`` — each query
  draws one shift of the family at random (multi-distribution shift);
* ``world-diverse/i2t/<c8-s5|c16-s5|mix8>/order<k>``, ``world-diverse/t2i/<char-l6|mix8>/order<k>`` —
  the domains one after the other (order0 as listed, order1 reversed, order<k ≥ 2> shuffled by k);
  ``mix8`` mixes corruptions with render domains (i2t) or perturbations with caption styles (t2i).

Real datasets (``--dataset NAME --data-root DIR``; ``qshift shifts list --dataset NAME``):
``<dataset>/<i2t|t2i>``, ``<dataset>-c/i2t/<corruption>/<severity>`` (COCO-C, Flickr-C, …: the queries a run
keeps, corrupted once by src/qshift/data/pipeline.py's data-loader workers and cached) and
``<dataset>-c/t2i/<perturbation>/<level>`` (perturbed captions, cached).

A new family is one :func:`register_family` call here: its pattern, parameters, builder, direction and
how reports show it.
"""
from __future__ import annotations

import hashlib
from importlib import metadata

import numpy as np

from qshift.bench import cache, world_data
from qshift.bench.registry import BuildContext, Family, register_family
from qshift.data import pipeline, streams, world
from qshift.data.retrieval_datasets import DATASET_NAMES
from qshift.data.task import RetrievalTask, directions_of, query_modality
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, available_corruptions
from qshift.shifts.text import CHAR_PERTURBATIONS, LEVELS, TEXT_PERTURBATIONS, perturb_real_texts, real_lexicon_key

QGS_DOMAINS = tuple(d for d in world.DOMAINS if d != "source")
DIVERSE_C8 = ("gaussian_noise", "defocus_blur", "snow", "contrast", "impulse_noise", "zoom_blur", "frost",
              "jpeg_compression")
#: diverse streams mixing kinds of shift (test1k, 1,000 queries a domain)
DIVERSE_I2T_MIX8 = ("gaussian_noise-5", "outline", "defocus_blur-5", "clutter", "snow-5", "lowlight",
                    "jpeg_compression-5", "sketch")
DIVERSE_T2I_MIX8 = ("keyboard-6", "passive", "char_swap-6", "formal", "ocr-6", "terse", "word_swap-6",
                    "synonym_replace-6")
DIRECTIONS = directions_of("image-text")  # the world and real datasets serve the image-text task
ORDERS = (0, 1, 2)  # the listed domain orders; any order<k> builds


def _order(n: int, k: int) -> list[int]:
    if k == 0:
        return list(range(n))
    if k == 1:
        return list(range(n))[::-1]
    return [int(i) for i in np.random.default_rng(k).permutation(n)]


class _Orders:
    """Values of the ``order`` placeholder: lists 0–2, accepts every k ≥ 0."""

    def __iter__(self):
        return iter(ORDERS)

    def match(self, text: str):
        return int(text) if text.isdigit() else None


def _orders() -> _Orders:
    return _Orders()


# ------------------------------------------------------------------------------- helpers

def _rows(ctx: BuildContext, n: int, n_sets: int = 1) -> np.ndarray | None:
    """The rows of a set of ``n`` queries that the task's ``max_queries`` subsample will keep (None: all),
    so that only those are rendered or corrupted; the pixels of row i are the same either way."""
    if ctx.max_queries is None or ctx.max_queries // n_sets < 1:
        return None
    return world_data.subsample_rows(n, ctx.max_queries // n_sets)


def _ids(rows: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if rows is None else rows


def _split(ctx: BuildContext, name: str | None = None) -> world.WorldSplit:
    return world.load_split(name or ctx.split)


def _images(ctx: BuildContext, split: world.WorldSplit, domain: str = "source"):
    return world_data.domain_images(split, domain, ctx.workers, ctx.progress)


def _image_set(ctx: BuildContext, split: world.WorldSplit) -> streams.QuerySet:
    return streams.QuerySet("clean", _images(ctx, split), np.arange(len(split)))


def _caption_set(split: world.WorldSplit, rows: np.ndarray | None = None) -> streams.QuerySet:
    if rows is None:
        return streams.QuerySet("clean", list(split.captions), split.caption_image)
    return streams.QuerySet("clean", [split.captions[r] for r in rows], split.caption_image[rows])


def _i2t(split, query_sets, stream_kind="single", domain_order=None, clean=None, meta=None) -> RetrievalTask:
    """Image queries against the split's captions."""
    return RetrievalTask("", "i2t", query_sets, split.captions, np.asarray(split.caption_image), stream_kind,
                         domain_order, clean, meta or {})


def _t2i(gallery_images, query_sets, stream_kind="single", domain_order=None, clean=None, meta=None) -> RetrievalTask:
    """Caption queries against the images."""
    return RetrievalTask("", "t2i", query_sets, gallery_images, np.arange(len(gallery_images)), stream_kind,
                         domain_order, clean, meta or {})


def _image_queries(p: dict) -> bool:
    """Whether the direction in a family's parameters queries with images (i2t) rather than captions."""
    return query_modality(p["direction"]) == "image"


def _first_captions(split: world.WorldSplit) -> np.ndarray:
    return np.arange(0, len(split.captions), world.CAPTIONS_PER_IMAGE)  # one caption per image


# ------------------------------------------------------------------------------- builders

def _clean(ctx, p):
    test = _split(ctx)
    if _image_queries(p):
        return _i2t(test, [_image_set(ctx, test)], clean=_image_set(ctx, test))
    return _t2i(_images(ctx, test), [_caption_set(test)], clean=_caption_set(test))


def _corrupted(ctx, p):
    test, c, sev = _split(ctx), p["corruption"], p["severity"]
    rows = _rows(ctx, len(test))
    q = world_data.corrupted_images(test, c, sev, ctx.shift_seed, ctx.workers, ctx.progress, rows=rows)
    return _i2t(test, [streams.QuerySet(f"{c}-{sev}", q, _ids(rows, len(test)))], clean=_image_set(ctx, test))


def _perturbed(ctx, p):
    test, pert, lvl = _split(ctx), p["perturbation"], p["level"]
    q = world_data.perturbed_captions(test, pert, lvl, ctx.shift_seed)
    return _t2i(_images(ctx, test), [streams.QuerySet(f"{pert}-{lvl}", q, test.caption_image)],
                clean=_caption_set(test))


def _style(ctx, p):
    test, style = _split(ctx), p["style"]
    caps = world_data.style_captions(test, style, ctx.shift_seed)
    if not _image_queries(p):
        return _t2i(_images(ctx, test), [streams.QuerySet(style, caps, np.arange(len(test)))],
                    clean=_caption_set(test))
    return RetrievalTask("", "i2t", [_image_set(ctx, test)], caps, np.arange(len(test)),
                         clean_queries=_image_set(ctx, test), meta={"gallery_shift": style})


def _qgs(ctx, p):
    test, dom = _split(ctx), p["domain"]
    dom_imgs = _images(ctx, test, dom)
    if _image_queries(p):
        return _i2t(test, [streams.QuerySet(dom, dom_imgs, np.arange(len(test)))], clean=_image_set(ctx, test),
                    meta={"gallery_domain": dom})
    return _t2i(dom_imgs, [_caption_set(test)], clean=_caption_set(test), meta={"gallery_domain": dom})


def _mixed_i2t(ctx, p):
    test = _split(ctx)
    assign = np.random.default_rng(ctx.shift_seed + 17).integers(len(CORRUPTIONS), size=len(test))
    sets = []
    for k, c in enumerate(CORRUPTIONS):
        rows = np.flatnonzero(assign == k)
        q = world_data.corrupted_images(test, c, 5, ctx.shift_seed, ctx.workers, ctx.progress)[rows]
        sets.append(streams.QuerySet(f"{c}-5", q, rows))
    return _i2t(test, sets, stream_kind=f"mixed-{p['mode']}", clean=_image_set(ctx, test))


def _mixed_t2i(ctx, p):
    test = _split(ctx)
    assign = np.random.default_rng(ctx.shift_seed + 17).integers(len(CHAR_PERTURBATIONS), size=len(test.captions))
    sets = []
    for k, pert in enumerate(CHAR_PERTURBATIONS):
        rows = np.flatnonzero(assign == k)
        caps = world_data.perturbed_captions(test, pert, 6, ctx.shift_seed)
        sets.append(streams.QuerySet(f"{pert}-6", [caps[r] for r in rows], test.caption_image[rows]))
    return _t2i(_images(ctx, test), sets, stream_kind=f"mixed-{p['mode']}", clean=_caption_set(test))


def _diverse_corruptions(names: tuple[str, ...], split_name: str | None):
    def build(ctx, p):
        split = _split(ctx, split_name)
        rows = _rows(ctx, len(split), len(names))
        sets = [streams.QuerySet(f"{c}-5", world_data.corrupted_images(split, c, 5, ctx.shift_seed, ctx.workers,
                                                                       ctx.progress, rows=rows),
                                 _ids(rows, len(split))) for c in names]
        return _i2t(split, sets, "sequential", _order(len(sets), p["order"]), clean=_image_set(ctx, split))
    return build


def _diverse_i2t_mix8(ctx, p):
    split = _split(ctx, "test1k")
    rows = _rows(ctx, len(split), len(DIVERSE_I2T_MIX8))
    sets = []
    for dom in DIVERSE_I2T_MIX8:
        if dom in world.DOMAINS:
            q = world_data.domain_images(split, dom, ctx.workers, ctx.progress, rows=rows)
        else:
            c, sev = dom.rsplit("-", 1)
            q = world_data.corrupted_images(split, c, int(sev), ctx.shift_seed, ctx.workers, ctx.progress, rows=rows)
        sets.append(streams.QuerySet(dom, q, _ids(rows, len(split))))
    return _i2t(split, sets, "sequential", _order(len(sets), p["order"]), clean=_image_set(ctx, split))


def _diverse_t2i_mix8(ctx, p):
    split = _split(ctx, "test1k")
    first = _first_captions(split)
    sets = []
    for dom in DIVERSE_T2I_MIX8:
        if dom in world.HELD_OUT_FAMILIES:
            sets.append(streams.QuerySet(dom, world_data.style_captions(split, dom, ctx.shift_seed),
                                         np.arange(len(split))))
        else:
            pert, lvl = dom.rsplit("-", 1)
            caps = world_data.perturbed_captions(split, pert, int(lvl), ctx.shift_seed)
            sets.append(streams.QuerySet(dom, [caps[r] for r in first], split.caption_image[first]))
    return _t2i(_images(ctx, split), sets, "sequential", _order(len(sets), p["order"]),
                clean=_caption_set(split, first))


def _diverse_t2i_char(ctx, p):
    test = _split(ctx)
    first = _first_captions(test)
    sets = []
    for pert in CHAR_PERTURBATIONS:
        caps = world_data.perturbed_captions(test, pert, 6, ctx.shift_seed)
        sets.append(streams.QuerySet(f"{pert}-6", [caps[r] for r in first], test.caption_image[first]))
    return _t2i(_images(ctx, test), sets, "sequential", _order(len(sets), p["order"]),
                clean=_caption_set(test, first))


def _image_size(ctx: BuildContext) -> int | None:
    """The square size real images are resized to after corruption (None: their own size); read from the
    context when it carries one (``image_size``)."""
    return getattr(ctx, "image_size", None)


def _real_gallery_images(ctx: BuildContext) -> pipeline.LazyImages:
    return pipeline.LazyImages(ctx.dataset, size=_image_size(ctx))


def _real_clean_images(ctx: BuildContext, rows: np.ndarray | None) -> streams.QuerySet:
    """The clean image queries of ``rows`` (None: all), decoded on access (not cached: decoding costs about
    what a cache read does)."""
    ds = ctx.dataset
    return streams.QuerySet("clean", pipeline.LazyImages(ds, rows, size=_image_size(ctx)),
                            ds.image_ids[_ids(rows, len(ds))])


def _real_clean(ctx, p):
    ds = ctx.dataset
    if _image_queries(p):
        imgs = _real_clean_images(ctx, _rows(ctx, len(ds)))
        return RetrievalTask("", "i2t", [imgs], ds.captions, ds.caption_ids, clean_queries=imgs)
    caps = streams.QuerySet("clean", list(ds.captions), ds.caption_ids)
    return RetrievalTask("", "t2i", [caps], _real_gallery_images(ctx), ds.image_ids, clean_queries=caps)


def _real_corrupted(ctx, p):
    """COCO-C and co.: only the queries the run keeps, corrupted once in data-loader workers and cached
    (src/qshift/data/pipeline.py); bit-identical to corrupting them one by one."""
    ds, c, sev = ctx.dataset, p["corruption"], p["severity"]
    rows = _rows(ctx, len(ds))
    q = pipeline.query_images(ds, c, sev, ctx.shift_seed, rows=rows, workers=ctx.workers, size=_image_size(ctx),
                              progress=ctx.progress)
    return RetrievalTask("", "i2t", [streams.QuerySet(f"{c}-{sev}", q, ds.image_ids[_ids(rows, len(ds))])],
                         ds.captions, ds.caption_ids, clean_queries=_real_clean_images(ctx, rows))


def _real_perturbed_captions(ds, pert: str, lvl: int, seed: int, rows: np.ndarray | None) -> list[str]:
    """Captions ``rows`` (None: all) under ``pert`` at ``lvl``, caption ``k`` seeded by ``k``, word-level
    synonyms from WordNet (:func:`qshift.shifts.text.perturb_real_texts`); cached."""
    idx = np.arange(len(ds.captions)) if rows is None else rows
    spec = {"kind": "realperturb", "pipeline_version": pipeline.PIPELINE_VERSION, "dataset": ds.name,
            "format": ds.format, "annotation_sha256": ds.annotation_digest(),
            "captions": hashlib.sha256("\n".join(ds.captions).encode()).hexdigest()[:32],
            "perturbation": pert, "level": lvl, "shift_seed": seed, "nlpaug": metadata.version("nlpaug"),
            "lexicon": real_lexicon_key(pert),
            **({} if rows is None else {"rows": hashlib.sha256(rows.tobytes()).hexdigest()[:24], "n_rows": len(rows)})}
    return cache.cached_texts(spec, lambda: perturb_real_texts([ds.captions[i] for i in idx.tolist()], pert, lvl,
                                                               idx.tolist(), seed=seed))


def _real_perturbed(ctx, p):
    ds, pert, lvl = ctx.dataset, p["perturbation"], p["level"]
    rows = _rows(ctx, len(ds.captions))
    idx = _ids(rows, len(ds.captions))
    caps = _real_perturbed_captions(ds, pert, lvl, ctx.shift_seed, rows)
    ids = ds.caption_ids[idx]
    return RetrievalTask("", "t2i", [streams.QuerySet(f"{pert}-{lvl}", caps, ids)], _real_gallery_images(ctx),
                         ds.image_ids,
                         clean_queries=streams.QuerySet("clean", [ds.captions[i] for i in idx.tolist()], ids))


# ------------------------------------------------------------------------------- registrations

def _values(*values):
    return lambda: values


_DIRS = _values(*DIRECTIONS)

register_family(Family("world-clean", "world-clean/{direction}", {"direction": _DIRS}, _clean, "direction",
                       title="Clean", column="{direction}", summary="clean {direction}"))
register_family(Family("world-c/i2t", "world-c/i2t/{corruption}/{severity}",
                       {"corruption": available_corruptions, "severity": _values(*SEVERITIES)}, _corrupted, "i2t",
                       title="Image corruptions, severity {severity} (i2t R@1)", column="{corruption}",
                       summary="corruptions s{severity}", summary_rank=lambda p: (-p["severity"],),
                       list_params={"corruption": _values(*CORRUPTIONS)}))
register_family(Family("world-c/t2i", "world-c/t2i/{perturbation}/{level}",
                       {"perturbation": _values(*TEXT_PERTURBATIONS), "level": _values(*LEVELS)}, _perturbed, "t2i",
                       title="Text perturbations, level {level} (t2i R@1)", column="{perturbation}",
                       summary="text L{level}", summary_rank=lambda p: (-p["level"],)))
register_family(Family("world-qgs", "world-qgs/{domain}/{direction}",
                       {"domain": _values(*QGS_DOMAINS), "direction": _DIRS}, _qgs, "direction",
                       title="Query–gallery shift ({direction} R@1)", column="{domain}", summary="QGS {direction}"))
register_family(Family("world-style", "world-style/{style}/{direction}",
                       {"style": _values(*world.HELD_OUT_FAMILIES), "direction": _DIRS}, _style, "direction",
                       title="Held-out caption styles ({direction} R@1)", column="{style}",
                       summary="styles {direction}"))
_MODES = _values("interleaved", "segments")
register_family(Family("world-mixed/i2t", "world-mixed/i2t/c16-s5/{mode}", {"mode": _MODES}, _mixed_i2t, "i2t",
                       title="Mixed shift (i2t R@1)", column="c16-s5/{mode}", summary="mixed i2t"))
register_family(Family("world-mixed/t2i", "world-mixed/t2i/char-l6/{mode}", {"mode": _MODES}, _mixed_t2i, "t2i",
                       title="Mixed shift (t2i R@1)", column="char-l6/{mode}", summary="mixed t2i"))
for _stream, _builder, _direction in (("i2t/c8-s5", _diverse_corruptions(DIVERSE_C8, "test1k"), "i2t"),
                                      ("i2t/c16-s5", _diverse_corruptions(CORRUPTIONS, None), "i2t"),
                                      ("i2t/mix8", _diverse_i2t_mix8, "i2t"),
                                      ("t2i/char-l6", _diverse_t2i_char, "t2i"),
                                      ("t2i/mix8", _diverse_t2i_mix8, "t2i")):
    register_family(Family(f"world-diverse/{_stream}", f"world-diverse/{_stream}/order{{order}}",
                           {"order": _orders}, _builder, _direction, stream=_stream, splits=("test",)))

_DATASETS = _values(*DATASET_NAMES)
register_family(Family("real-clean", "{dataset}/{direction}", {"dataset": _DATASETS, "direction": _DIRS},
                       _real_clean, "direction", title="{dataset}: clean", column="{direction}",
                       summary="{dataset} clean {direction}", needs_dataset=True))
register_family(Family("real-c/i2t", "{dataset}-c/i2t/{corruption}/{severity}",
                       {"dataset": _DATASETS, "corruption": available_corruptions, "severity": _values(*SEVERITIES)},
                       _real_corrupted, "i2t", title="{dataset}-C image corruptions, severity {severity} (i2t R@1)",
                       column="{corruption}", summary="{dataset}-C s{severity}",
                       summary_rank=lambda p: (-p["severity"],), needs_dataset=True,
                       list_params={"corruption": _values(*CORRUPTIONS)}))
register_family(Family("real-c/t2i", "{dataset}-c/t2i/{perturbation}/{level}",
                       {"dataset": _DATASETS, "perturbation": _values(*TEXT_PERTURBATIONS), "level": _values(*LEVELS)},
                       _real_perturbed, "t2i", title="{dataset}-C text perturbations, level {level} (t2i R@1)",
                       column="{perturbation}", summary="{dataset}-C text L{level}",
                       summary_rank=lambda p: (-p["level"],), needs_dataset=True))
