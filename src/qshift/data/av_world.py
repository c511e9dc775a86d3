"""The embedded audio–video world: short procedurally generated clips whose pictures and soundtracks come
from one latent scene, for video→audio (v2a) and audio→video (a2v) retrieval.

A clip's latent :class:`AVScene` is the image world's scene of 1–2 objects (its background, shapes,
colours, sizes, start positions and looks, drawn by :func:`qshift.data.world.sample_scene`) with a
motion per object: ``static``, ``left-right``, ``up-down``, ``diagonal`` or ``circle``, at a ``slow`` or
``fast`` speed.  Straight-line movers bounce off the frame's edges; the bounce times are part of the
latent (:mod:`qshift.data.av_scenes`).  From it:

* the **video** is :data:`FRAMES` (8) frames of :data:`VIDEO_SIZE` (32) px RGB, each frame the image
  world's rendering of the scene at that frame's time, in any of its render domains
  (:mod:`qshift.data.av_video`);
* the **audio** is :data:`DURATION` (1 s) of 16 kHz mono, one voice per object: shape → timbre, colour →
  pitch class, size → octave and loudness, position → loudness (x) and pitch bend (y), speed → tremolo,
  bounce → a click (:mod:`qshift.data.av_sound`).  A Kaldi fbank with a 10 ms shift gives ~100 frames.

Each clip's :attr:`AVScene.av_key` (per object: shape, colour, size, motion, speed, bounce frames) is
unique within ``val`` and ``test``, and within each 2,000-clip block of ``train`` (:data:`AV_SPLITS`),
by rejecting draws whose key was already taken.  Splits are drawn clip by clip from the split's seed with
the world's per-index generator, so the first k clips of a split are ``generate_av_world(seed, k)``'s.
Nothing is rendered at generation time; :meth:`AVSplit.videos` and :meth:`AVSplit.audios` render on
demand.

Why 8 frames of 32 px (measured on one shared core; per clip of 8 frames, source / outline / clutter /
lowlight / sketch): 32 px renders in 2.6 / 2.9 / 6.2 / 4.1 / 7.9 ms, 48 px in 6.7 / 7.2 / 9.9 / 7.8 / 14.9 ms
and 64 px in 10.9 / 11.9 / 14.4 / 13.0 / 26.7 ms, so the 2,000 test clips render in ~5 s at 32 px (their
soundtracks synthesise in ~2.5 s, 1.2 ms each, whatever the frame size).  A linear probe on a
colour-free crop around each object (3,000 training frames, 1,000 test) reads shape / colour / size at
32 px with 99.5 / 99.9 / 100 % accuracy in the source domain (outline 99.6 / 98.6 / 100, sketch 99.6 / 100 /
100, lowlight 99.4 / 99.9 / 99.9, clutter 79 / 98 / 92) against 100 / 100 / 100 % at 48 and 64 px in
source and lowlight (clutter 84–85 / 98 / 94): 32 px loses next to nothing, and a clip is 24 KiB.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np

from qshift.data.av_scenes import (DURATION, FRAMES, LINEAR_SPEED, MOTIONS, OBJECT_COUNT_P,  # noqa: F401
                                   ORBIT_RADIUS, ORBIT_SPEED, SPEEDS, AVObject, AVScene, frame_time,
                                   make_av_object, sample_av_scene)
from qshift.data.av_sound import (AUDIO_SAMPLES, COLOUR_STEP, GLIDE_SEMITONES, MIX_GAIN,  # noqa: F401
                                  SAMPLE_RATE, SIZE_BASE, SIZE_GAIN, TIMBRES, TREMOLO_DEPTH, TREMOLO_RATE,
                                  fundamental, synthesise)
from qshift.data.av_video import VIDEO_SIZE, check_domain, render_clip  # noqa: F401
from qshift.data.world import BG_GREY, _rng
from qshift.data.world_render import DOMAINS, SUPERSAMPLE  # noqa: F401
from qshift.errors import UserError

#: bump when a change to the world's generation, rendering or synthesis changes its content
AV_WORLD_VERSION = 2

#: the fixed splits: seed, clips, and the block over which keys are unique (train is six test-sized
#: blocks, so its mix of clips is the test's)
AV_SPLITS: dict[str, dict[str, int]] = {
    "train": {"seed": 201, "n_clips": 12_000, "unique_block": 2_000},
    "val": {"seed": 202, "n_clips": 2_000, "unique_block": 2_000},
    "test": {"seed": 203, "n_clips": 2_000, "unique_block": 2_000},
}

#: progress bars from this many clips up, when asked for
_PROGRESS_MIN = 200


@dataclass
class AVSplit:
    """A set of clips: clip ``i`` is ``scenes[i]``, its video ``videos([i])[0]`` and its soundtrack
    ``audios([i])[0]``; in v2a / a2v retrieval a clip's match is the other modality's row ``i``."""

    name: str
    seed: int
    scenes: list[AVScene]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def ids(self) -> np.ndarray:
        """Clip ids, int64 [n]: a clip's row in both modalities."""
        return np.arange(len(self.scenes), dtype=np.int64)

    def _rows(self, rows) -> list[int]:
        if rows is None:
            return list(range(len(self.scenes)))
        out = [int(r) for r in np.asarray(rows).reshape(-1)]
        bad = [r for r in out if not 0 <= r < len(self.scenes)]
        if bad:
            raise UserError(f"clip rows out of range for {self.name} ({len(self.scenes)} clips): {bad[:5]}")
        return out

    def videos(self, rows=None, domain: str = "source", progress: bool = False, size: int = VIDEO_SIZE) -> np.ndarray:
        """Render clips (all, or ``rows``) to uint8 [n, FRAMES, size, size, 3] in ``domain``."""
        check_domain(domain)
        idx = self._rows(rows)
        out = np.empty((len(idx), FRAMES, size, size, 3), np.uint8)
        for j, i in enumerate(_progress(idx, progress, f"{self.name} videos ({domain})")):
            out[j] = render_clip(self.scenes[i], size, domain)
        return out

    def audios(self, rows=None, progress: bool = False) -> np.ndarray:
        """Synthesise soundtracks (all, or ``rows``): float32 [n, AUDIO_SAMPLES] at SAMPLE_RATE, in [-1, 1]."""
        idx = self._rows(rows)
        out = np.empty((len(idx), AUDIO_SAMPLES), np.float32)
        for j, i in enumerate(_progress(idx, progress, f"{self.name} audios")):
            out[j] = synthesise(self.scenes[i])
        return out

    def subset(self, n_clips: int, name: str | None = None) -> "AVSplit":
        """The first ``n_clips`` clips."""
        if not 0 < n_clips <= len(self.scenes):
            raise UserError(f"n_clips must be in 1..{len(self.scenes)} for {self.name}, got {n_clips}")
        return AVSplit(name=name or f"{self.name}[:{n_clips}]", seed=self.seed, scenes=self.scenes[:n_clips],
                       meta=dict(self.meta))

    def fingerprint(self) -> str:
        """SHA-256 over the scenes and the world's constants (no rendering): keys disk caches of this set."""
        h = hashlib.sha256()
        h.update(repr(world_constants()).encode())
        h.update(repr(self.scenes).encode())
        return h.hexdigest()


def world_constants() -> dict:
    """The constants that shape the world's clips (with the code version), for cache keys."""
    return {"version": AV_WORLD_VERSION, "frames": FRAMES, "video_size": VIDEO_SIZE, "supersample": SUPERSAMPLE,
            "duration": DURATION, "sample_rate": SAMPLE_RATE, "linear_speed": LINEAR_SPEED,
            "orbit_speed": ORBIT_SPEED, "orbit_radius": ORBIT_RADIUS, "timbres": TIMBRES,
            "colour_step": COLOUR_STEP, "size_base": SIZE_BASE, "size_gain": SIZE_GAIN,
            "glide": GLIDE_SEMITONES, "tremolo": (TREMOLO_RATE, TREMOLO_DEPTH), "mix_gain": MIX_GAIN,
            "bg_grey": BG_GREY, "domains": DOMAINS}


def _progress(items: list[int], enabled: bool, desc: str):
    if not enabled or len(items) < _PROGRESS_MIN:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="clip")


def generate_av_world(seed: int, n_clips: int, name: str | None = None,
                      unique_block: int | None = None) -> AVSplit:
    """``n_clips`` clips from ``seed``, every :attr:`AVScene.av_key` unique within each block of
    ``unique_block`` consecutive clips (default: all of them)."""
    if isinstance(n_clips, bool) or not isinstance(n_clips, (int, np.integer)) or n_clips <= 0:
        raise UserError(f"n_clips must be a positive integer, got {n_clips!r}")
    block = n_clips if unique_block is None else unique_block
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise UserError(f"unique_block must be a positive integer, got {unique_block!r}")
    scenes: list[AVScene] = []
    taken: set = set()
    draw = 0
    while len(scenes) < n_clips:
        if draw > 50 * n_clips + 1000:
            raise RuntimeError(f"could not draw {n_clips} clips with unique keys from seed {seed}")
        scene = sample_av_scene(_rng(seed, draw))
        draw += 1
        if scene.av_key in taken:
            continue
        scenes.append(scene)
        if len(scenes) % block == 0:
            taken = set()
        else:
            taken.add(scene.av_key)
    return AVSplit(name=name or f"av_world(seed={seed})", seed=seed, scenes=scenes,
                   meta={"draws": draw, "unique_block": block})


def load_av_split(name: str) -> AVSplit:
    """A fixed split of :data:`AV_SPLITS` (``train``, ``val``, ``test``), generated once per process."""
    if name not in AV_SPLITS:
        raise UserError(f"unknown AV world split {name!r}; known: {', '.join(AV_SPLITS)}")
    return _load(name)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> AVSplit:
    spec = AV_SPLITS[name]
    return generate_av_world(spec["seed"], spec["n_clips"], name=name, unique_block=spec["unique_block"])
