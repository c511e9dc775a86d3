"""The embedded video–audio benchmark families, one registration each (the registry is
src/qshift/bench/registry.py; the world is src/qshift/data/av_world.py).

Retrieval is one-to-one: clip ``i``'s only positive is soundtrack ``i`` (query ids equal gallery ids).  The
gallery is always clean (audio tracks for ``v2a``, clips for ``a2v``); the queries drift:

* ``world-av/<direction>/clean`` — the clean 2,000-clip test set;
* ``world-av-c/v2a/<corruption>/<severity>`` — every frame of the query clip under one image corruption
  (READ's video protocol; :mod:`qshift.shifts.video`);
* ``world-av-temporal/v2a/<shift>/<severity>`` — temporal shifts: the corruption or its severity changes
  across the frames of one clip (clean → noisy → blurred, a severity ramp, flicker), frame drops, freezes;
* ``world-av-domain/v2a/<domain>`` — the query clips rendered in a new domain;
* ``world-av-c/a2v/<noise>/<severity>`` — the query soundtrack under Gaussian noise or an environmental
  noise (READ's audio protocol; :mod:`qshift.shifts.audio`);
* ``world-av-mixed/v2a/video-c15-s5/<interleaved|segments>`` and ``world-av-mixed/a2v/audio-n6-s5/…`` — each
  query draws one severity-5 shift;
* ``world-av-diverse/<direction>/mix8/order<k>`` — eight domains one after another (diverse shift).

Every shifted set is built once per (split, shift, seed, rows) and kept in qshift's disk cache
(:mod:`qshift.bench.cache`), keyed by the split's fingerprint.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qshift.bench import cache, world_data
from qshift.bench.families import _order, _Orders
from qshift.bench.registry import BuildContext, Family, register_family
from qshift.data import av_world, streams
from qshift.data.task import RetrievalTask, gallery_modality, query_modality
from qshift.shifts import audio as audio_shifts
from qshift.shifts import video as video_shifts
from qshift.data.av_video import BENCH_RENDER_SIZE
from qshift.data.world_render import DOMAINS as RENDER_DOMAINS

#: bump when a builder's output changes, so cached sets are not reused
AV_BENCH_VERSION = 2
#: the video corruptions of READ's protocol (the 15 ImageNet-C corruptions, applied to every frame)
VIDEO_CORRUPTIONS: tuple[str, ...] = tuple(video_shifts.VIDEO_CORRUPTIONS)
AUDIO_CORRUPTIONS: tuple[str, ...] = tuple(audio_shifts.AUDIO_CORRUPTIONS)
TEMPORAL_SHIFTS: tuple[str, ...] = tuple(video_shifts.TEMPORAL_SHIFTS)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
QUERY_DOMAINS: tuple[str, ...] = tuple(d for d in RENDER_DOMAINS if d != "source")
#: the diverse streams' domains, per direction: ``name-severity`` (a video corruption, a temporal shift or an
#: audio noise) or a render domain
DIVERSE_MIX8: dict[str, tuple[str, ...]] = {
    "v2a": ("gaussian_noise-5", "outline", "defocus_blur-5", f"{TEMPORAL_SHIFTS[0]}-5", "jpeg_compression-5",
            "lowlight", "fog-5", "contrast-5"),
    "a2v": ("gaussian_noise-5", "traffic-5", "rain-5", "crowd-5", "gaussian_noise-3", "thunder-5", "wind-5",
            "rain-3"),
}


# ------------------------------------------------------------------------------- cached inputs

def _split(ctx: BuildContext) -> av_world.AVSplit:
    return av_world.load_av_split(ctx.split)


def _cached(split: av_world.AVSplit, spec: dict, rows: np.ndarray, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``make(rows)`` through the disk cache: served from the full set's entry when that exists."""
    base = {"kind": "av", "av_bench_version": AV_BENCH_VERSION, "split": split.name,
            "fingerprint": split.fingerprint(), **spec}
    hit = cache.cache_load(base, rows) if len(rows) < len(split) else cache.cache_load(base)
    if hit is not None:
        return hit
    key = {**base, "rows": world_data._rows_spec(rows)} if len(rows) < len(split) else base
    hit = cache.cache_load(key)
    if hit is not None:
        return hit
    out = make(rows)
    cache.cache_store(key, out)
    return out


def clean_videos(split: av_world.AVSplit, rows: np.ndarray, domain: str = "source") -> np.ndarray:
    """The split's clips ``rows`` rendered in ``domain`` at the benchmark's render size (uint8 [n, T, S, S, 3],
    S = :data:`qshift.data.av_video.BENCH_RENDER_SIZE`; corruptions apply at that size); cached."""
    return _cached(split, {"what": "video", "domain": domain, "size": BENCH_RENDER_SIZE}, rows,
                   lambda r: split.videos(r, domain=domain, size=BENCH_RENDER_SIZE))


def clean_audios(split: av_world.AVSplit, rows: np.ndarray) -> np.ndarray:
    """The split's soundtracks ``rows`` (float32 [n, samples])."""
    return split.audios(rows)


def corrupted_videos(split: av_world.AVSplit, corruption: str, severity: int, seed: int,
                     rows: np.ndarray) -> np.ndarray:
    """Clips ``rows`` with every frame under ``corruption`` at ``severity``; cached."""
    return _cached(split, {"what": "video-c", "corruption": corruption, "severity": severity, "seed": seed}, rows,
                   lambda r: video_shifts.corrupt_clips(clean_videos(split, r), corruption, severity, r, seed))


def temporal_videos(split: av_world.AVSplit, shift: str, severity: int, seed: int, rows: np.ndarray) -> np.ndarray:
    """Clips ``rows`` under the temporal shift ``shift`` at ``severity``; cached."""
    return _cached(split, {"what": "video-t", "shift": shift, "severity": severity, "seed": seed}, rows,
                   lambda r: video_shifts.corrupt_temporal_clips(clean_videos(split, r), shift, severity, r, seed))


def noisy_audios(split: av_world.AVSplit, corruption: str, severity: int, seed: int, rows: np.ndarray) -> np.ndarray:
    """Soundtracks ``rows`` under the audio corruption at ``severity`` (float32); cached."""
    return _cached(split, {"what": "audio-c", "corruption": corruption, "severity": severity, "seed": seed}, rows,
                   lambda r: audio_shifts.corrupt_audio_batch(clean_audios(split, r), corruption, severity, r, seed))


def shifted_queries(split: av_world.AVSplit, direction: str, domain: str, seed: int, rows: np.ndarray) -> np.ndarray:
    """Queries ``rows`` of ``direction`` under ``domain``: ``clean``, a render domain, or ``name-severity``
    (a video corruption or temporal shift for v2a, an audio corruption for a2v)."""
    video = query_modality(direction) == "video"
    if domain == "clean":
        return clean_videos(split, rows) if video else clean_audios(split, rows)
    if domain in RENDER_DOMAINS and video:
        return clean_videos(split, rows, domain)
    name, _, sev = domain.rpartition("-")
    if not sev.isdigit():
        raise ValueError(f"unknown {direction} query domain {domain!r}")
    if video and name in VIDEO_CORRUPTIONS:
        return corrupted_videos(split, name, int(sev), seed, rows)
    if video and name in TEMPORAL_SHIFTS:
        return temporal_videos(split, name, int(sev), seed, rows)
    if not video and name in AUDIO_CORRUPTIONS:
        return noisy_audios(split, name, int(sev), seed, rows)
    raise ValueError(f"unknown {direction} query domain {domain!r}")


# ------------------------------------------------------------------------------- tasks

def _rows(ctx: BuildContext, n: int, n_sets: int = 1) -> np.ndarray:
    if ctx.max_queries is None or ctx.max_queries // n_sets < 1:
        return np.arange(n)
    sub = world_data.subsample_rows(n, ctx.max_queries // n_sets)
    return np.arange(n) if sub is None else sub


def _task(ctx: BuildContext, split: av_world.AVSplit, direction: str, sets: list[streams.QuerySet],
          stream_kind: str = "single", domain_order: list[int] | None = None, clean_rows=None) -> RetrievalTask:
    all_rows = np.arange(len(split))
    gallery = clean_videos(split, all_rows) if gallery_modality(direction) == "video" else clean_audios(split, all_rows)
    clean_rows = all_rows if clean_rows is None else clean_rows
    clean = streams.QuerySet("clean", shifted_queries(split, direction, "clean", ctx.shift_seed, clean_rows), clean_rows)
    return RetrievalTask("", direction, sets, gallery, all_rows.astype(np.int64), stream_kind, domain_order, clean)


def _single(domain_of: Callable[[dict], str]):
    def build(ctx, p):
        split, direction = _split(ctx), p["direction"]
        rows = _rows(ctx, len(split))
        dom = domain_of(p)
        q = shifted_queries(split, direction, dom, ctx.shift_seed, rows)
        return _task(ctx, split, direction, [streams.QuerySet(dom, q, rows)], clean_rows=rows)
    return build


def _mixed(ctx, p):
    split, direction = _split(ctx), p["direction"]
    names = VIDEO_CORRUPTIONS if query_modality(direction) == "video" else AUDIO_CORRUPTIONS
    assign = np.random.default_rng(ctx.shift_seed + 17).integers(len(names), size=len(split))
    keep = _rows(ctx, len(split))
    sets = []
    for k, name in enumerate(names):
        ids = keep[assign[keep] == k]
        if len(ids):
            sets.append(streams.QuerySet(f"{name}-5", shifted_queries(split, direction, f"{name}-5", ctx.shift_seed, ids), ids))
    return _task(ctx, split, direction, sets, stream_kind=f"mixed-{p['mode']}", clean_rows=keep)


def _diverse(ctx, p):
    split, direction = _split(ctx), p["direction"]
    domains = DIVERSE_MIX8[direction]
    rows = _rows(ctx, len(split), len(domains))
    sets = [streams.QuerySet(d, shifted_queries(split, direction, d, ctx.shift_seed, rows), rows) for d in domains]
    return _task(ctx, split, direction, sets, "sequential", _order(len(sets), p["order"]), clean_rows=rows)


# ------------------------------------------------------------------------------- registrations

def _values(*values):
    return lambda: values


_SPLITS = ("test", "val")
register_family(Family("world-av", "world-av/{direction}/clean", {"direction": _values("v2a", "a2v")},
                       _single(lambda p: "clean"), "direction", title="AV: clean (R@1)", column="{direction}",
                       summary="AV clean", splits=_SPLITS))


def _severity_family(name: str, pattern: str, direction: str, key: str, values: tuple[str, ...], what: str,
                     summary: str) -> Family:
    """A family of one shift kind (``key`` over ``values``) × severity in one direction."""
    return Family(name, pattern, {"direction": _values(direction), key: _values(*values),
                                  "severity": _values(*SEVERITIES)},
                  _single(lambda p: f"{p[key]}-{p['severity']}"), "direction",
                  title=f"AV: {what}, severity {{severity}} ({{direction}} R@1)", column=f"{{{key}}}",
                  summary=f"{summary} s{{severity}}", summary_rank=lambda p: (-p["severity"],), splits=_SPLITS)


register_family(_severity_family("world-av-c/video", "world-av-c/{direction}/{corruption}/{severity}", "v2a",
                                 "corruption", VIDEO_CORRUPTIONS, "video corruptions", "v2a video"))
register_family(_severity_family("world-av-temporal", "world-av-temporal/{direction}/{shift}/{severity}", "v2a",
                                 "shift", TEMPORAL_SHIFTS, "temporal shifts", "v2a temporal"))
register_family(Family("world-av-domain", "world-av-domain/{direction}/{domain}",
                       {"direction": _values("v2a"), "domain": _values(*QUERY_DOMAINS)},
                       _single(lambda p: p["domain"]), "direction", title="AV: query render domains ({direction} R@1)",
                       column="{domain}", summary="v2a domains", splits=_SPLITS))
register_family(_severity_family("world-av-c/audio", "world-av-c/{direction}/{corruption}/{severity}", "a2v",
                                 "corruption", AUDIO_CORRUPTIONS, "audio noises", "a2v audio"))
for _d, _mix in (("v2a", "video-c15-s5"), ("a2v", "audio-n6-s5")):
    register_family(Family(f"world-av-mixed/{_d}", f"world-av-mixed/{{direction}}/{_mix}/{{mode}}",
                           {"direction": _values(_d), "mode": _values("interleaved", "segments")}, _mixed,
                           "direction", title="AV: mixed shift ({direction} R@1)", column=f"{_mix}/{{mode}}",
                           summary=f"{_d} mixed", splits=_SPLITS))
for _d in ("v2a", "a2v"):
    register_family(Family(f"world-av-diverse/{_d}", "world-av-diverse/{direction}/mix8/order{order}",
                           {"direction": _values(_d), "order": _Orders}, _diverse, "direction",
                           stream=f"{_d}/mix8", splits=_SPLITS))
