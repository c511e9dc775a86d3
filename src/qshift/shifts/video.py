"""Video query shifts: ImageNet-C on every frame (READ's Kinetics-C / VGGSound-C) and temporal shifts.

A clip is a uint8 array [T, H, W, 3]; a batch of clips is [B, T, H, W, 3].

* per-frame corruptions (:data:`VIDEO_CORRUPTIONS`, the 15 ImageNet-C corruptions READ applies, severities
  1–5): :func:`corrupt_clip` / :func:`corrupt_clips` run :func:`qshift.shifts.image.corrupt_image` on every
  frame.  Frame ``t`` of item ``i`` is corrupted as the image with id :func:`frame_ids` ``= i·T + t``, so
  each frame gets its own random draw (noise, blur angle, frost crop, fog map), as in READ, which corrupts
  each of a clip's frames in a separate pass; and a clip's frames are bit-identical to rows ``i·T + t`` of
  an image set corrupted by image index — a cache of corrupted frames serves clips as well;
* temporal shifts (:data:`TEMPORAL_SHIFTS`), where what a frame shows changes along the clip:
  ``clean-noise-blur``, ``severity-ramp``, ``flicker``, ``frame-drop``, ``freeze`` (:func:`temporal_plan`).

Every shift is deterministic by (item id, shift, severity, seed) and the clip length; whatever the batch,
its order or the worker count.  The frames a temporal shift corrupts are exactly those of the per-frame
corruption at the same (item, frame, corruption, severity, seed).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from qshift.errors import UserError
from qshift.shifts.image import CORRUPTIONS, SEVERITIES, available_corruptions, corrupt_batch, corrupt_image, \
    corruption_seed

#: the 15 ImageNet-C corruptions READ applies to every frame (COCO-C's ``speckle_noise`` is not among them)
VIDEO_CORRUPTIONS: tuple[str, ...] = tuple(c for c in CORRUPTIONS if c != "speckle_noise")
#: shifts in which a frame's corruption, severity or content changes along the clip
TEMPORAL_SHIFTS: tuple[str, ...] = ("clean-noise-blur", "severity-ramp", "flicker", "frame-drop", "freeze")
#: every video query shift a benchmark family enumerates: the per-frame corruptions, then the temporal ones
VIDEO_SHIFT_NAMES: tuple[str, ...] = VIDEO_CORRUPTIONS + TEMPORAL_SHIFTS
#: ``clean-noise-blur``: what the first, middle and last third of the frames get (None: clean)
CLEAN_NOISE_BLUR: tuple[str | None, ...] = (None, "gaussian_noise", "defocus_blur")
#: the temporal shifts that take a corruption, and the one they use when none is given
DEFAULT_CORRUPTION: dict[str, str] = {"severity-ramp": "gaussian_noise", "flicker": "brightness"}
#: ``frame-drop`` / ``freeze``: the fraction of a clip's frames replaced at severity 1..5 (1..5 of 8 frames)
FRAME_FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625)
#: the shortest clip a temporal shift accepts (clean-noise-blur needs a frame per third)
MIN_TEMPORAL_FRAMES = 3


class FramePlan(NamedTuple):
    """What output frame ``t`` of a temporal shift shows: input frame ``source``, under ``corruption``
    (None: as is) at ``severity``."""

    source: int
    corruption: str | None
    severity: int


# ----------------------------------------------------------------------------------------- checks

def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise UserError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return int(severity)


def _check_corruption(corruption: str) -> str:
    if corruption not in available_corruptions():
        raise UserError(f"unknown corruption {corruption!r}; known: {', '.join(available_corruptions())}")
    return corruption


#: the layout of each kind of array this module takes
_LAYOUTS: dict[str, str] = {"a clip": "[T, H, W, 3]", "clips": "[B, T, H, W, 3]", "frames": "[N, H, W, 3]"}


def _check_array(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` must be uint8 in ``what``'s layout (RGB last); only a batch of clips may be empty."""
    shape = _LAYOUTS[what]
    rank = shape.count(",") + 1
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != rank or x.shape[-1] != 3
            or 0 in x.shape[-4:]):
        raise UserError(f"expected {what} as a uint8 array {shape}, got {getattr(x, 'dtype', type(x).__name__)} "
                        f"{getattr(x, 'shape', '')}")
    return x


def _item_id(item_id) -> int:
    try:
        return operator.index(item_id)
    except TypeError:
        raise UserError(f"an item id must be a whole number, got {item_id!r}") from None


def _item_ids(item_ids, n: int) -> list[int]:
    ids = [_item_id(i) for i in item_ids]
    if len(ids) != n:
        raise UserError(f"{n} clips but {len(ids)} item ids")
    return ids


def _n_frames(n_frames: int) -> int:
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise UserError(f"the number of frames must be a positive whole number, got {n_frames!r}")
    return int(n_frames)


def _workers(workers: int | None) -> int:
    if workers is None:
        from qshift.data.pipeline import default_workers  # deferred: the data pipeline loads torch
        return default_workers()
    return int(workers)


def _parallel(fn: Callable, tasks: list, workers: int | None) -> list:
    workers = _workers(workers)
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as ex:
        return list(ex.map(fn, tasks))


def _chunks(n: int, workers: int | None) -> list[range]:
    """At most ~4 contiguous index ranges per worker (one range when running in this process)."""
    w = max(1, _workers(workers))
    size = max(1, -(-n // (4 * w))) if w > 1 else max(1, n)
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


# ------------------------------------------------------------------------------------ frames ↔ clips

def frame_ids(item_ids: Sequence[int], n_frames: int) -> np.ndarray:
    """The stable id of every frame of clips ``item_ids`` with ``n_frames`` frames: ``i·T + t``, int64 [B·T]
    in :func:`as_frames` order.  Distinct for distinct (item, frame) at a fixed T; with item ids
    ``0..B-1`` it is the frame's row in the flattened set."""
    n_frames = _n_frames(n_frames)
    ids = np.asarray([_item_id(i) for i in item_ids], dtype=np.int64)
    return (ids[:, None] * n_frames + np.arange(n_frames, dtype=np.int64)).reshape(-1)


def as_frames(clips: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 3] clips as [B·T, H, W, 3] frames (clip-major: a view when ``clips`` is contiguous)."""
    _check_array(clips, "clips")
    b, t, h, w, c = clips.shape
    return clips.reshape(b * t, h, w, c)


def as_clips(frames: np.ndarray, n_frames: int) -> np.ndarray:
    """[B·T, H, W, 3] frames (clip-major, as :func:`as_frames` gives them) back as [B, T, H, W, 3] clips."""
    _check_array(frames, "frames")
    n_frames = _n_frames(n_frames)
    if len(frames) % n_frames:
        raise UserError(f"{len(frames)} frames are not a whole number of {n_frames}-frame clips")
    return frames.reshape(len(frames) // n_frames, n_frames, *frames.shape[1:])


def map_frames(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], clips: np.ndarray,
               item_ids: Sequence[int]) -> np.ndarray:
    """Apply a frame-level ``fn(frames [N, H, W, 3], frame_ids [N]) -> frames`` to every frame of ``clips``
    ([B, T, H, W, 3], clip ``k`` identified by ``item_ids[k]``); returns [B, T, H', W', 3]."""
    _check_array(clips, "clips")
    ids = _item_ids(item_ids, len(clips))
    t = clips.shape[1]
    out = np.asarray(fn(as_frames(clips), frame_ids(ids, t)))
    if out.ndim != 4 or len(out) != len(clips) * t:
        raise ValueError(f"the frame function returned shape {out.shape} for {len(clips) * t} frames")
    return out.reshape(len(clips), t, *out.shape[1:])


# --------------------------------------------------------------------------------- per-frame corruption

def corrupt_clip(clip: np.ndarray, corruption: str, severity: int, item_id: int, seed: int = 0) -> np.ndarray:
    """Every frame of a uint8 [T, H, W, 3] clip under one corruption at one severity; frame ``t`` seeded by
    (frame id ``item_id·T + t``, corruption, severity, seed)."""
    _check_array(clip, "a clip")
    _check_corruption(corruption)
    severity = _check_severity(severity)
    return corrupt_batch(clip, corruption, severity, frame_ids([item_id], len(clip)), seed)


def _corrupt_frames(args: tuple) -> np.ndarray:
    frames, ids, corruption, severity, seed = args
    return corrupt_batch(frames, corruption, severity, ids, seed)


def corrupt_clips(clips: np.ndarray, corruption: str, severity: int, item_ids: Sequence[int], seed: int = 0,
                  workers: int | None = None) -> np.ndarray:
    """:func:`corrupt_clip` on a [B, T, H, W, 3] batch, clip ``k`` identified by ``item_ids[k]``; the frames are
    shared over ``workers`` processes (None: ``QSHIFT_WORKERS`` or up to 4; 0 or 1: this process)."""
    _check_array(clips, "clips")
    _check_corruption(corruption)
    severity = _check_severity(severity)

    def fn(frames: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if len(frames) == 0:
            return frames.copy()
        tasks = [(frames[r], ids[r].tolist(), corruption, severity, seed) for r in _chunks(len(frames), workers)]
        return np.concatenate(_parallel(_corrupt_frames, tasks, workers))

    return map_frames(fn, clips, item_ids)


# ---------------------------------------------------------------------------------------- temporal shifts

def _n_affected(n_frames: int, severity: int) -> int:
    """Frames replaced by ``frame-drop`` / ``freeze``: FRAME_FRACTIONS[severity]·T rounded, 1 to T − 1."""
    return min(n_frames - 1, max(1, int(np.floor(FRAME_FRACTIONS[severity - 1] * n_frames + 0.5))))


def _check_temporal(shift: str, severity: int, n_frames: int, corruption: str | None) -> tuple[int, str | None]:
    if shift not in TEMPORAL_SHIFTS:
        raise UserError(f"unknown temporal shift {shift!r}; known: {', '.join(TEMPORAL_SHIFTS)}")
    severity = _check_severity(severity)
    if n_frames < MIN_TEMPORAL_FRAMES:
        raise UserError(f"temporal shift {shift} needs clips of at least {MIN_TEMPORAL_FRAMES} frames, "
                        f"got {n_frames}")
    if shift in DEFAULT_CORRUPTION:
        corruption = _check_corruption(DEFAULT_CORRUPTION[shift] if corruption is None else corruption)
    elif corruption is not None:
        raise UserError(f"temporal shift {shift} takes no corruption (only {', '.join(DEFAULT_CORRUPTION)} do), "
                        f"got {corruption!r}")
    return severity, corruption


def temporal_plan(shift: str, severity: int, n_frames: int, item_id: int = 0, seed: int = 0,
                  corruption: str | None = None) -> list[FramePlan]:
    """What each of the ``n_frames`` output frames of ``shift`` shows (a :class:`FramePlan` per frame).

    * ``clean-noise-blur``: the first third clean, the middle third gaussian_noise, the last third
      defocus_blur, both at ``severity`` (thirds as ``np.array_split``: 3 / 3 / 2 of 8 frames);
    * ``severity-ramp``: ``corruption`` (default gaussian_noise) at a severity rising linearly, rounded,
      from 1 on the first frame to ``severity`` on the last;
    * ``flicker``: the odd frames under ``corruption`` (default brightness) at ``severity``, the even ones clean;
    * ``frame-drop``: FRAME_FRACTIONS[severity]·T frames (never the first) dropped, each shown as the last
      kept frame before it; the dropped sets grow with severity (one random order per item and seed);
    * ``freeze``: one contiguous run of FRAME_FRACTIONS[severity]·T frames shows the frame just before it.
    """
    t = _n_frames(n_frames)
    severity, corruption = _check_temporal(shift, severity, t, corruption)
    item_id = _item_id(item_id)
    if shift == "clean-noise-blur":
        third = np.repeat(np.arange(3), [len(p) for p in np.array_split(np.arange(t), 3)])
        return [FramePlan(f, CLEAN_NOISE_BLUR[third[f]], severity if third[f] else 0) for f in range(t)]
    if shift == "severity-ramp":
        return [FramePlan(f, corruption, 1 + int(np.floor((severity - 1) * f / (t - 1) + 0.5))) for f in range(t)]
    if shift == "flicker":
        return [FramePlan(f, corruption if f % 2 else None, severity if f % 2 else 0) for f in range(t)]
    n = _n_affected(t, severity)
    source = np.arange(t)
    if shift == "frame-drop":
        # one order per (item, seed), not per severity: a higher severity drops a superset of the frames
        order = np.random.default_rng(corruption_seed(item_id, shift, 0, seed)).permutation(np.arange(1, t))
        dropped = set(order[:n].tolist())
        for f in range(1, t):
            source[f] = source[f - 1] if f in dropped else f
    else:  # freeze: frames start+1 .. start+n show frame `start`
        start = int(np.random.default_rng(corruption_seed(item_id, shift, severity, seed)).integers(0, t - n))
        source[start + 1:start + n + 1] = start
    return [FramePlan(int(s), None, 0) for s in source]


def _apply_plan(clip: np.ndarray, plan: list[FramePlan], item_id: int, seed: int) -> np.ndarray:
    ids = frame_ids([item_id], len(clip))
    out = clip[[p.source for p in plan]]  # a copy
    for f, p in enumerate(plan):
        if p.corruption is not None:  # a corrupted frame is its own frame: p.source == f
            out[f] = corrupt_image(clip[p.source], p.corruption, p.severity, int(ids[f]), seed)
    return out


def corrupt_temporal(clip: np.ndarray, shift: str, severity: int, item_id: int, seed: int = 0,
                     corruption: str | None = None) -> np.ndarray:
    """A uint8 [T, H, W, 3] clip under temporal ``shift`` (one of :data:`TEMPORAL_SHIFTS`) at ``severity``;
    ``corruption`` only for ``severity-ramp`` and ``flicker`` (see :func:`temporal_plan`)."""
    _check_array(clip, "a clip")
    plan = temporal_plan(shift, severity, len(clip), item_id, seed, corruption)
    return _apply_plan(clip, plan, _item_id(item_id), seed)


def _temporal_chunk(args: tuple) -> np.ndarray:
    clips, ids, shift, severity, seed, corruption = args
    return np.stack([corrupt_temporal(c, shift, severity, i, seed, corruption) for c, i in zip(clips, ids)])


def corrupt_temporal_clips(clips: np.ndarray, shift: str, severity: int, item_ids: Sequence[int], seed: int = 0,
                           corruption: str | None = None, workers: int | None = None) -> np.ndarray:
    """:func:`corrupt_temporal` on a [B, T, H, W, 3] batch, clip ``k`` identified by ``item_ids[k]``."""
    _check_array(clips, "clips")
    ids = _item_ids(item_ids, len(clips))
    _check_temporal(shift, severity, clips.shape[1], corruption)
    if len(clips) == 0:
        return clips.copy()
    tasks = [(clips[r], ids[r.start:r.stop], shift, severity, seed, corruption)
             for r in _chunks(len(clips), workers)]
    return np.concatenate(_parallel(_temporal_chunk, tasks, workers))


def shift_clips(clips: np.ndarray, shift: str, severity: int, item_ids: Sequence[int], seed: int = 0,
                corruption: str | None = None, workers: int | None = None) -> np.ndarray:
    """Any video shift by name: a per-frame corruption (:data:`VIDEO_CORRUPTIONS` or another of
    ``available_corruptions()``) or a temporal shift (:data:`TEMPORAL_SHIFTS`)."""
    if shift in TEMPORAL_SHIFTS:
        return corrupt_temporal_clips(clips, shift, severity, item_ids, seed, corruption, workers)
    if shift not in available_corruptions():
        raise UserError(f"unknown video shift {shift!r}; known: {', '.join(VIDEO_SHIFT_NAMES)}")
    if corruption is not None:
        raise UserError(f"a per-frame corruption takes no further corruption, got {corruption!r}")
    return corrupt_clips(clips, shift, severity, item_ids, seed, workers)
