"""The embedded composed-image-retrieval (CIR) benchmark families, one registration each (the registry is
src/qshift/bench/registry.py; the world is src/qshift/data/cir_world.py).

A query is a (reference image, modification text) pair; the gallery is the split's images (every target,
its near-duplicate group, every reference); the reference is removed from each query's ranking and the
group gives CIRR's subset recall (:class:`qshift.data.task.QueryRelevance`).  Either half of the query
can drift — REST's *multi-modal query shift*:

* ``world-cir/clean`` — the clean 2,000-query test set;
* ``world-cir-c/image/<corruption>/<severity>`` — the reference image under one of the image corruptions;
* ``world-cir-c/text/<perturbation>/<level>`` — the modification text under a text corruption (listed:
  :data:`CIR_TEXT_PERTURBATIONS`; any of :mod:`qshift.shifts.text`'s is accepted);
* ``world-cir-c/both/<corruption>/<severity>`` — both halves: the corruption on the reference and, on the
  text, a character perturbation drawn per query at level ``severity + 1``;
* ``world-cir-style/<style>`` — modification texts in a held-out template family;
* ``world-cir-domain/<domain>`` — the reference rendered in a new domain (the gallery stays);
* ``world-cir-qgs/<domain>`` — reference and gallery rendered in the domain (query–gallery shift);
* ``world-cir-mixed/image-c16-s5/<interleaved|segments>`` — each query draws one severity-5 corruption;
* ``world-cir-diverse/mix8/order<k>`` — eight domains mixing image corruptions, text perturbations, render
  domains and a held-out text style, one after the other.
"""
from __future__ import annotations

import numpy as np

from qshift.bench import world_data
from qshift.bench.families import _order, _Orders
from qshift.bench.registry import BuildContext, Family, register_family
from qshift.data import cir_world, streams, world
from qshift.data.task import QueryRelevance, RetrievalTask
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, available_corruptions
from qshift.shifts.text import ALL_TEXT_PERTURBATIONS, CHAR_PERTURBATIONS, LEVELS

DOMAINS = tuple(d for d in world.DOMAINS if d != "source")
#: the modification-text corruptions the CIR benchmarks list, those used to benchmark CIR robustness:
#: character (substitution), keyboard, deletion, space removal, misspelling, repetition, homophone
#: (:mod:`qshift.shifts.text`; any of its perturbations is accepted by name)
CIR_TEXT_PERTURBATIONS = ("char_substitute", "keyboard", "char_delete", "space_remove", "misspell", "repeat",
                          "homophone")
#: the diverse CIR stream's domains: image corruptions (``name-severity``), text perturbations
#: (``name-level``), render domains of the reference and a held-out text style
DIVERSE_MIX8 = ("gaussian_noise-5", "keyboard-6", "outline", "defocus_blur-5", "char_swap-6", "lowlight",
                "jpeg_compression-5", "question")
def _split(ctx: BuildContext) -> cir_world.CIRSplit:
    return cir_world.load_cir_split(ctx.split)


def _as_world(cir: cir_world.CIRSplit, part: str) -> world.WorldSplit:
    """The references (with their modification texts as captions) or the gallery of ``cir`` as a world
    split, so that rendering, corruption and text perturbation go through the world's cached builders; the
    name carries the CIR split's fingerprint, so a changed CIR world never reads a stale cache entry."""
    name = f"cir-{cir.name}-{cir.fingerprint()[:16]}-{part}"
    if part == "references":
        return world.WorldSplit(name, cir.seed, list(cir.references), list(cir.texts), np.arange(len(cir)))
    return world.WorldSplit(name, cir.seed, list(cir.gallery), [], np.zeros(0, np.int64))


def _rows(ctx: BuildContext, n: int, n_sets: int = 1) -> np.ndarray | None:
    if ctx.max_queries is None or ctx.max_queries // n_sets < 1:
        return None
    return world_data.subsample_rows(n, ctx.max_queries // n_sets)


def _ids(rows: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if rows is None else rows


def _pairs(images: np.ndarray, texts: list[str]) -> list[tuple[np.ndarray, str]]:
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} reference images for {len(texts)} modification texts")
    return list(zip(images, texts))


def _texts(cir: cir_world.CIRSplit, ids: np.ndarray) -> list[str]:
    return [cir.texts[i] for i in ids.tolist()]


def _ref_images(ctx: BuildContext, cir: cir_world.CIRSplit, rows, domain: str = "source") -> np.ndarray:
    return world_data.domain_images(_as_world(cir, "references"), domain, ctx.workers, ctx.progress, rows=rows)


def _corrupted_refs(ctx: BuildContext, cir: cir_world.CIRSplit, c: str, sev: int, rows) -> np.ndarray:
    return world_data.corrupted_images(_as_world(cir, "references"), c, sev, ctx.shift_seed, ctx.workers,
                                       ctx.progress, rows=rows)


def _perturbed_texts(ctx: BuildContext, cir: cir_world.CIRSplit, pert: str, lvl: int, ids: np.ndarray) -> list[str]:
    out = world_data.perturbed_captions(_as_world(cir, "references"), pert, lvl, ctx.shift_seed)
    return [out[i] for i in ids.tolist()]


def _clean_set(ctx: BuildContext, cir: cir_world.CIRSplit, rows) -> streams.QuerySet:
    ids = _ids(rows, len(cir))
    return streams.QuerySet("clean", _pairs(_ref_images(ctx, cir, rows), _texts(cir, ids)), ids)


def _task(ctx: BuildContext, cir: cir_world.CIRSplit, sets: list[streams.QuerySet], stream_kind: str = "single",
          domain_order: list[int] | None = None, gallery_domain: str = "source", clean_rows=None,
          meta: dict | None = None) -> RetrievalTask:
    """Composed queries against the split's gallery, the reference removed, the groups as subsets."""
    gallery = world_data.domain_images(_as_world(cir, "gallery"), gallery_domain, ctx.workers, ctx.progress)
    gallery_ids = np.full(len(cir.gallery), -1, np.int64)
    gallery_ids[cir.target] = np.arange(len(cir))
    meta = {**(meta or {}), **({"gallery_domain": gallery_domain} if gallery_domain != "source" else {})}
    return RetrievalTask("", "cir", sets, gallery, gallery_ids, stream_kind, domain_order,
                         _clean_set(ctx, cir, clean_rows), meta,
                         QueryRelevance(exclude=cir.reference_row, subsets=cir.groups))


# ------------------------------------------------------------------------------- builders

def _clean(ctx, p):
    cir = _split(ctx)
    rows = _rows(ctx, len(cir))
    return _task(ctx, cir, [_clean_set(ctx, cir, rows)], clean_rows=rows)


def _image_side(ctx, p):
    cir, c, sev = _split(ctx), p["corruption"], p["severity"]
    rows = _rows(ctx, len(cir))
    ids = _ids(rows, len(cir))
    q = _pairs(_corrupted_refs(ctx, cir, c, sev, rows), _texts(cir, ids))
    return _task(ctx, cir, [streams.QuerySet(f"{c}-{sev}", q, ids)], clean_rows=rows)


def _text_side(ctx, p):
    cir, pert, lvl = _split(ctx), p["perturbation"], p["level"]
    rows = _rows(ctx, len(cir))
    ids = _ids(rows, len(cir))
    q = _pairs(_ref_images(ctx, cir, rows), _perturbed_texts(ctx, cir, pert, lvl, ids))
    return _task(ctx, cir, [streams.QuerySet(f"{pert}-{lvl}", q, ids)], clean_rows=rows)


def _both_sides(ctx, p):
    cir, c, sev = _split(ctx), p["corruption"], p["severity"]
    rows = _rows(ctx, len(cir))
    ids = _ids(rows, len(cir))
    lvl = sev + 1
    pick = np.random.default_rng(ctx.shift_seed + 29).integers(len(CHAR_PERTURBATIONS), size=len(cir))[ids]
    per = {k: _perturbed_texts(ctx, cir, k, lvl, ids) for k in {CHAR_PERTURBATIONS[i] for i in pick.tolist()}}
    texts = [per[CHAR_PERTURBATIONS[k]][j] for j, k in enumerate(pick.tolist())]
    q = _pairs(_corrupted_refs(ctx, cir, c, sev, rows), texts)
    return _task(ctx, cir, [streams.QuerySet(f"{c}-{sev}+char-{lvl}", q, ids)], clean_rows=rows)


def _style(ctx, p):
    cir, style = _split(ctx), p["style"]
    rows = _rows(ctx, len(cir))
    ids = _ids(rows, len(cir))
    texts = cir.family_texts(style, ctx.shift_seed)
    q = _pairs(_ref_images(ctx, cir, rows), [texts[i] for i in ids.tolist()])
    return _task(ctx, cir, [streams.QuerySet(style, q, ids)], clean_rows=rows)


def _domain(gallery_too: bool):
    def build(ctx, p):
        cir, dom = _split(ctx), p["domain"]
        rows = _rows(ctx, len(cir))
        ids = _ids(rows, len(cir))
        q = _pairs(_ref_images(ctx, cir, rows, dom), _texts(cir, ids))
        return _task(ctx, cir, [streams.QuerySet(dom, q, ids)], gallery_domain=dom if gallery_too else "source",
                     clean_rows=rows)
    return build


def _mixed(ctx, p):
    cir = _split(ctx)
    assign = np.random.default_rng(ctx.shift_seed + 17).integers(len(CORRUPTIONS), size=len(cir))
    keep = _ids(_rows(ctx, len(cir)), len(cir))
    sets = []
    for k, c in enumerate(CORRUPTIONS):
        ids = keep[assign[keep] == k]
        if len(ids) == 0:
            continue
        q = _pairs(_corrupted_refs(ctx, cir, c, 5, ids), _texts(cir, ids))
        sets.append(streams.QuerySet(f"{c}-5", q, ids))
    return _task(ctx, cir, sets, stream_kind=f"mixed-{p['mode']}", clean_rows=_rows(ctx, len(cir)))


def _diverse(ctx, p):
    cir = _split(ctx)
    rows = _rows(ctx, len(cir), len(DIVERSE_MIX8))
    ids = _ids(rows, len(cir))
    sets = []
    for dom in DIVERSE_MIX8:
        if dom in world.DOMAINS:
            q = _pairs(_ref_images(ctx, cir, rows, dom), _texts(cir, ids))
        elif dom in cir_world.HELD_OUT_TEXT_FAMILIES:
            texts = cir.family_texts(dom, ctx.shift_seed)
            q = _pairs(_ref_images(ctx, cir, rows), [texts[i] for i in ids.tolist()])
        else:
            name, level = dom.rsplit("-", 1)
            if name in ALL_TEXT_PERTURBATIONS:
                q = _pairs(_ref_images(ctx, cir, rows), _perturbed_texts(ctx, cir, name, int(level), ids))
            else:
                q = _pairs(_corrupted_refs(ctx, cir, name, int(level), rows), _texts(cir, ids))
        sets.append(streams.QuerySet(dom, q, ids))
    return _task(ctx, cir, sets, "sequential", _order(len(sets), p["order"]), clean_rows=rows)


# ------------------------------------------------------------------------------- registrations

def _values(*values):
    return lambda: values


_SPLITS = ("test", "val")
register_family(Family("world-cir", "world-cir/{view}", {"view": _values("clean")}, _clean, "cir",
                       title="CIR: clean (R@1)", column="{view}", summary="CIR clean", splits=_SPLITS))
register_family(Family("world-cir-c/image", "world-cir-c/image/{corruption}/{severity}",
                       {"corruption": available_corruptions, "severity": _values(*SEVERITIES)}, _image_side, "cir",
                       title="CIR: reference-image corruptions, severity {severity} (R@1)", column="{corruption}",
                       summary="CIR image s{severity}", summary_rank=lambda p: (-p["severity"],),
                       list_params={"corruption": _values(*CORRUPTIONS)}, splits=_SPLITS))
register_family(Family("world-cir-c/text", "world-cir-c/text/{perturbation}/{level}",
                       {"perturbation": _values(*ALL_TEXT_PERTURBATIONS), "level": _values(*LEVELS)}, _text_side, "cir",
                       title="CIR: modification-text perturbations, level {level} (R@1)", column="{perturbation}",
                       summary="CIR text L{level}", summary_rank=lambda p: (-p["level"],),
                       list_params={"perturbation": _values(*CIR_TEXT_PERTURBATIONS)}, splits=_SPLITS))
register_family(Family("world-cir-c/both", "world-cir-c/both/{corruption}/{severity}",
                       {"corruption": available_corruptions, "severity": _values(*SEVERITIES)}, _both_sides, "cir",
                       title="CIR: both halves, severity {severity} + text level {severity}+1 (R@1)",
                       column="{corruption}", summary="CIR both s{severity}",
                       summary_rank=lambda p: (-p["severity"],), list_params={"corruption": _values(*CORRUPTIONS)},
                       splits=_SPLITS))
register_family(Family("world-cir-style", "world-cir-style/{style}",
                       {"style": _values(*cir_world.HELD_OUT_TEXT_FAMILIES)}, _style, "cir",
                       title="CIR: held-out modification styles (R@1)", column="{style}", summary="CIR styles",
                       splits=_SPLITS))
register_family(Family("world-cir-domain", "world-cir-domain/{domain}", {"domain": _values(*DOMAINS)},
                       _domain(False), "cir", title="CIR: reference render domains (R@1)", column="{domain}",
                       summary="CIR domains", splits=_SPLITS))
register_family(Family("world-cir-qgs", "world-cir-qgs/{domain}", {"domain": _values(*DOMAINS)}, _domain(True),
                       "cir", title="CIR: query–gallery shift (R@1)", column="{domain}", summary="CIR QGS",
                       splits=_SPLITS))
register_family(Family("world-cir-mixed", "world-cir-mixed/image-c16-s5/{mode}",
                       {"mode": _values("interleaved", "segments")}, _mixed, "cir", title="CIR: mixed shift (R@1)",
                       column="image-c16-s5/{mode}", summary="CIR mixed", splits=_SPLITS))
register_family(Family("world-cir-diverse/mix8", "world-cir-diverse/mix8/order{order}", {"order": _Orders},
                       _diverse, "cir", stream="cir/mix8", splits=_SPLITS))
