"""Named benchmarks of the embedded world: stable names → query stream + frozen gallery.

Names (``qshift shifts list`` prints them all):

* ``world-clean/<i2t|t2i>`` — the clean 2,000-image test set;
* ``world-c/i2t/<corruption>/<severity>`` — image queries under one of the 16 corruptions (1–5);
* ``world-c/t2i/<perturbation>/<level>`` — caption queries under a character / word perturbation (1–7);
* ``world-style/<style>/<i2t|t2i>`` — captions in a held-out style (t2i: as queries, i2t: as gallery);
* ``world-qgs/<domain>/<i2t|t2i>`` — query–gallery shift: every image rendered in a new domain;
* ``world-mixed/i2t/c16-s5/<interleaved|segments>``, ``world-mixed/t2i/char-l6/<…>`` — each query
  draws one shift of the family at random (multi-distribution shift);
* ``world-diverse/i2t/<c8-s5|c16-s5|mix8>/order<k>``, ``world-diverse/t2i/<char-l6|mix8>/order<k>`` —
  the domains one after the other (order0 as listed, order1 reversed, order<k ≥ 2> shuffled by k);
  ``mix8`` mixes corruptions with render domains (i2t) or perturbations with caption styles (t2i).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from qshift.bench import world_data
from qshift.data import streams, world
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, available_corruptions
from qshift.shifts.text import CHAR_PERTURBATIONS, LEVELS, TEXT_PERTURBATIONS

QGS_DOMAINS = tuple(d for d in world.DOMAINS if d != "source")
DIVERSE_C8 = ("gaussian_noise", "defocus_blur", "snow", "contrast", "impulse_noise", "zoom_blur", "frost",
              "jpeg_compression")
#: diverse streams mixing kinds of shift (test1k, 1,000 queries a domain)
DIVERSE_I2T_MIX8 = ("gaussian_noise-5", "outline", "defocus_blur-5", "clutter", "snow-5", "lowlight",
                    "jpeg_compression-5", "sketch")
DIVERSE_T2I_MIX8 = ("keyboard-6", "passive", "char_swap-6", "formal", "ocr-6", "terse", "word_swap-6",
                    "synonym_replace-6")
DIRECTIONS = ("i2t", "t2i")


@dataclass
class RetrievalTask:
    """What a benchmark resolves to: query sets (one per domain), a frozen gallery, how to stream."""

    name: str
    direction: str
    query_sets: list[streams.QuerySet]
    gallery: Any
    gallery_ids: np.ndarray
    stream_kind: str = "single"  # single | mixed-interleaved | mixed-segments | sequential
    domain_order: list[int] | None = None
    clean_queries: streams.QuerySet | None = None
    meta: dict = field(default_factory=dict)

    @property
    def query_modality(self) -> str:
        return "image" if self.direction == "i2t" else "text"

    @property
    def n_queries(self) -> int:
        return sum(len(q) for q in self.query_sets)

    def stream(self, batch_size: int = 64, seed: int = 0) -> streams.Stream:
        """The benchmark's query stream, deterministic for ``seed``."""
        if self.stream_kind == "single":
            if len(self.query_sets) != 1:
                raise ValueError(f"{self.name}: a single stream needs exactly one query set")
            return streams.single_stream(self.query_sets[0], batch_size, seed)
        if self.stream_kind.startswith("mixed-"):
            return streams.mixed_stream(self.query_sets, batch_size, seed, mode=self.stream_kind.split("-", 1)[1])
        if self.stream_kind == "sequential":
            return streams.sequential_stream(self.query_sets, batch_size, seed, self.domain_order)
        raise ValueError(f"unknown stream kind {self.stream_kind!r}")

    def subsample(self, max_queries: int, seed: int = 0) -> "RetrievalTask":
        """The same task with at most ``max_queries`` queries in all (split evenly over its query
        sets; the clean probe set gets the same budget); the gallery is unchanged."""
        if max_queries < len(self.query_sets):
            raise ValueError(f"{self.name}: max_queries={max_queries} is fewer than its {len(self.query_sets)} domains")
        per = max_queries // len(self.query_sets)
        sets = [q.subset(per, seed) for q in self.query_sets]
        clean = self.clean_queries.subset(max_queries, seed) if self.clean_queries is not None else None
        return replace(self, query_sets=sets, clean_queries=clean,
                       meta={**self.meta, "max_queries": max_queries})

    def all_queries(self) -> tuple[Any, np.ndarray]:
        """Every query of every set, concatenated (for offline evaluation of the source model)."""
        ids = np.concatenate([q.ids for q in self.query_sets])
        if all(isinstance(q.items, np.ndarray) for q in self.query_sets):
            return np.concatenate([q.items for q in self.query_sets]), ids
        return [x for q in self.query_sets for x in q.items], ids


def list_benchmarks() -> list[str]:
    """Every canonical benchmark name."""
    names = [f"world-clean/{d}" for d in DIRECTIONS]
    names += [f"world-c/i2t/{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES]
    names += [f"world-c/t2i/{p}/{lvl}" for p in TEXT_PERTURBATIONS for lvl in LEVELS]
    names += [f"world-style/{s}/{d}" for s in world.HELD_OUT_FAMILIES for d in DIRECTIONS]
    names += [f"world-qgs/{dom}/{d}" for dom in QGS_DOMAINS for d in DIRECTIONS]
    names += [f"world-mixed/{f}/{m}" for f in ("i2t/c16-s5", "t2i/char-l6") for m in ("interleaved", "segments")]
    names += [f"world-diverse/{f}/order{k}" for f in ("i2t/c8-s5", "i2t/c16-s5", "i2t/mix8", "t2i/char-l6", "t2i/mix8")
              for k in range(3)]
    return names


def _order(n: int, k: int) -> list[int]:
    if k == 0:
        return list(range(n))
    if k == 1:
        return list(range(n))[::-1]
    return [int(i) for i in np.random.default_rng(k).permutation(n)]


def _image_gallery_task(name, split, query_sets, stream_kind="single", domain_order=None, clean=None, meta=None):
    return RetrievalTask(name, "i2t", query_sets, split.captions, np.asarray(split.caption_image), stream_kind,
                         domain_order, clean, meta or {})


def _text_gallery_task(name, gallery_images, query_sets, stream_kind="single", domain_order=None, clean=None, meta=None):
    return RetrievalTask(name, "t2i", query_sets, gallery_images, np.arange(len(gallery_images)), stream_kind,
                         domain_order, clean, meta or {})


def build_benchmark(name: str, shift_seed: int = 0, workers: int | None = None, progress: bool = False,
                    split: str = "test") -> RetrievalTask:
    """Resolve a benchmark name into its task (query sets are built once and cached on disk).

    ``split`` builds a single-split world benchmark on another world split (``val``: for calibrating a
    setting away from the reported test images; ``test1k``); the diverse streams have their own split.
    """
    parts = name.strip("/").split("/")
    if split != "test" and parts and parts[0] == "world-diverse":
        raise ValueError(f"{name}: the diverse streams are built on their own split; split={split!r} is not allowed")
    test = world.load_split(split)
    imgs = lambda split=test: world_data.domain_images(split, "source", workers, progress)  # noqa: E731
    img_sets = lambda split=test: streams.QuerySet("clean", imgs(split), np.arange(len(split)))  # noqa: E731
    cap_set = lambda: streams.QuerySet("clean", list(test.captions), test.caption_image)  # noqa: E731
    fam = parts[0] if parts else ""

    if fam == "world-clean" and len(parts) == 2 and parts[1] in DIRECTIONS:
        if parts[1] == "i2t":
            return _image_gallery_task(name, test, [img_sets()], clean=img_sets())
        return _text_gallery_task(name, imgs(), [cap_set()], clean=cap_set())

    if fam == "world-c" and len(parts) == 4 and parts[1] == "i2t":
        corruption, sev = parts[2], _int(parts[3], name)
        if corruption not in available_corruptions() or sev not in SEVERITIES:
            raise _unknown(name)
        q = world_data.corrupted_images(test, corruption, sev, shift_seed, workers, progress)
        return _image_gallery_task(name, test, [streams.QuerySet(f"{corruption}-{sev}", q, np.arange(len(test)))],
                                   clean=img_sets())

    if fam == "world-c" and len(parts) == 4 and parts[1] == "t2i":
        pert, lvl = parts[2], _int(parts[3], name)
        if pert not in TEXT_PERTURBATIONS or lvl not in LEVELS:
            raise _unknown(name)
        q = world_data.perturbed_captions(test, pert, lvl, shift_seed)
        return _text_gallery_task(name, imgs(), [streams.QuerySet(f"{pert}-{lvl}", q, test.caption_image)],
                                  clean=cap_set())

    if fam == "world-style" and len(parts) == 3 and parts[1] in world.HELD_OUT_FAMILIES and parts[2] in DIRECTIONS:
        caps = world_data.style_captions(test, parts[1], shift_seed)
        if parts[2] == "t2i":
            return _text_gallery_task(name, imgs(), [streams.QuerySet(parts[1], caps, np.arange(len(test)))],
                                      clean=cap_set())
        return RetrievalTask(name, "i2t", [img_sets()], caps, np.arange(len(test)), clean_queries=img_sets(),
                             meta={"gallery_shift": parts[1]})

    if fam == "world-qgs" and len(parts) == 3 and parts[1] in QGS_DOMAINS and parts[2] in DIRECTIONS:
        dom_imgs = world_data.domain_images(test, parts[1], workers, progress)
        if parts[2] == "i2t":
            return _image_gallery_task(name, test, [streams.QuerySet(parts[1], dom_imgs, np.arange(len(test)))],
                                       clean=img_sets(), meta={"gallery_domain": parts[1]})
        return _text_gallery_task(name, dom_imgs, [cap_set()], clean=cap_set(), meta={"gallery_domain": parts[1]})

    if fam == "world-mixed" and len(parts) == 4 and parts[3] in ("interleaved", "segments"):
        rng = np.random.default_rng(shift_seed + 17)
        if parts[1:3] == ["i2t", "c16-s5"]:
            assign = rng.integers(len(CORRUPTIONS), size=len(test))
            sets = []
            for k, c in enumerate(CORRUPTIONS):
                rows = np.flatnonzero(assign == k)
                q = world_data.corrupted_images(test, c, 5, shift_seed, workers, progress)[rows]
                sets.append(streams.QuerySet(f"{c}-5", q, rows))
            return _image_gallery_task(name, test, sets, stream_kind=f"mixed-{parts[3]}", clean=img_sets())
        if parts[1:3] == ["t2i", "char-l6"]:
            assign = rng.integers(len(CHAR_PERTURBATIONS), size=len(test.captions))
            sets = []
            for k, p in enumerate(CHAR_PERTURBATIONS):
                rows = np.flatnonzero(assign == k)
                caps = world_data.perturbed_captions(test, p, 6, shift_seed)
                sets.append(streams.QuerySet(f"{p}-6", [caps[r] for r in rows], test.caption_image[rows]))
            return _text_gallery_task(name, imgs(), sets, stream_kind=f"mixed-{parts[3]}", clean=cap_set())

    if fam == "world-diverse" and len(parts) == 4 and re.fullmatch(r"order\d+", parts[3]):
        k = int(parts[3][5:])
        if parts[1:3] in (["i2t", "c8-s5"], ["i2t", "c16-s5"]):
            split = world.load_split("test1k") if parts[2] == "c8-s5" else test
            names = DIVERSE_C8 if parts[2] == "c8-s5" else CORRUPTIONS
            sets = [streams.QuerySet(f"{c}-5", world_data.corrupted_images(split, c, 5, shift_seed, workers, progress),
                                     np.arange(len(split))) for c in names]
            return _image_gallery_task(name, split, sets, "sequential", _order(len(sets), k), clean=img_sets(split))
        if parts[1:3] == ["i2t", "mix8"]:
            split = world.load_split("test1k")
            sets = []
            for dom in DIVERSE_I2T_MIX8:
                if dom in world.DOMAINS:
                    q = world_data.domain_images(split, dom, workers, progress)
                else:
                    c, sev = dom.rsplit("-", 1)
                    q = world_data.corrupted_images(split, c, int(sev), shift_seed, workers, progress)
                sets.append(streams.QuerySet(dom, q, np.arange(len(split))))
            return _image_gallery_task(name, split, sets, "sequential", _order(len(sets), k), clean=img_sets(split))
        if parts[1:3] == ["t2i", "mix8"]:
            split = world.load_split("test1k")
            first = np.arange(0, len(split.captions), world.CAPTIONS_PER_IMAGE)
            sets = []
            for dom in DIVERSE_T2I_MIX8:
                if dom in world.HELD_OUT_FAMILIES:
                    caps = world_data.style_captions(split, dom, shift_seed)
                    sets.append(streams.QuerySet(dom, caps, np.arange(len(split))))
                else:
                    p, lvl = dom.rsplit("-", 1)
                    caps = world_data.perturbed_captions(split, p, int(lvl), shift_seed)
                    sets.append(streams.QuerySet(dom, [caps[r] for r in first], split.caption_image[first]))
            clean = streams.QuerySet("clean", [split.captions[r] for r in first], split.caption_image[first])
            return _text_gallery_task(name, imgs(split), sets, "sequential", _order(len(sets), k), clean=clean)
        if parts[1:3] == ["t2i", "char-l6"]:
            first = np.arange(0, len(test.captions), world.CAPTIONS_PER_IMAGE)  # one caption per image
            sets = []
            for p in CHAR_PERTURBATIONS:
                caps = world_data.perturbed_captions(test, p, 6, shift_seed)
                sets.append(streams.QuerySet(f"{p}-6", [caps[r] for r in first], test.caption_image[first]))
            clean = streams.QuerySet("clean", [test.captions[r] for r in first], test.caption_image[first])
            return _text_gallery_task(name, imgs(), sets, "sequential", _order(len(sets), k), clean=clean)

    raise _unknown(name)


def _int(s: str, name: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise _unknown(name) from None


def _unknown(name: str) -> ValueError:
    import difflib

    close = difflib.get_close_matches(name, list_benchmarks(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown benchmark {name!r}{hint} (`qshift shifts list` prints every name)")
