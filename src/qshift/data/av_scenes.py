"""What a clip of the embedded audio–video world is: the latent :class:`AVScene` (the image world's scene
plus a motion per object), its trajectories and bounces, its discrete key, and the random draw of one.

A clip lasts :data:`DURATION` seconds.  Positions are in the image world's coordinate frame
(:data:`~qshift.data.world_scenes.IMAGE_SIZE` px, whatever the render size) as functions of time; video
frame ``k`` of ``T`` samples the scene at the centre of its interval, ``(k + 0.5) · DURATION / T``, and
audio sample ``n`` at ``n / SAMPLE_RATE``, so picture and sound follow one trajectory.

An object moving in a straight line is reflected by the walls (its bounding circle stays
``radius + 2`` px inside the frame, the world's placement margin); the times of those reflections are
worked out and stored in the latent when the scene is drawn, and the frame each falls in is part of the
object's key.
Circling objects orbit inside the walls and never bounce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qshift.data.world import (COLOURS, IMAGE_SIZE, SHAPES, SIZE_RADIUS, SIZES, Background, Scene, WorldObject,
                               sample_scene)
from qshift.errors import UserError

#: clip length in seconds, and the video frames it is cut into
DURATION = 1.0
FRAMES = 8

MOTIONS: tuple[str, ...] = ("static", "left-right", "up-down", "diagonal", "circle")
#: speed classes of a moving object; a static object's speed is ``"none"``
SPEEDS: tuple[str, ...] = ("slow", "fast")
#: straight-line speed in px (at IMAGE_SIZE) per second
LINEAR_SPEED: dict[str, float] = {"slow": 30.0, "fast": 70.0}
#: circling speed in revolutions per second, and the range of orbit radii in px
ORBIT_SPEED: dict[str, float] = {"slow": 0.5, "fast": 1.0}
ORBIT_RADIUS: tuple[float, float] = (10.0, 16.0)
#: probability of one and of two objects
OBJECT_COUNT_P: tuple[float, float] = (0.4, 0.6)
#: the gap kept between two objects' bounding circles at every frame and half-frame
_GAP = 2.0
_WALL = 2.0  # the world's placement margin beyond the radius
_ORBIT_ANGLES = 64
_LAYOUT_TRIES = 50


@dataclass(frozen=True)
class AVObject:
    """One object of a clip: the world's categorical attributes and look, its start position (``x``, ``y``
    at time 0, px) and its motion.  ``heading`` is the direction of travel (radians, image axes: +y is
    down) for straight-line motions and the start angle on the orbit for ``circle``; ``turn`` is the
    orbit's sense (+1 / -1, 0 otherwise); ``bounces`` are the reflection times in seconds."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    rotation: float
    tint: tuple[int, int, int]
    motion: str = "static"
    speed: str = "none"
    heading: float = 0.0
    turn: int = 0
    orbit: float = 0.0
    bounces: tuple[float, ...] = ()

    def walls(self) -> tuple[float, float]:
        """The range of the centre's coordinates (equal on both axes)."""
        return self.radius + _WALL, IMAGE_SIZE - self.radius - _WALL

    def positions(self, times: np.ndarray) -> np.ndarray:
        """Centre positions at ``times`` (seconds): float64 [len(times), 2] (x, y) in px."""
        t = np.asarray(times, dtype=np.float64)
        if self.motion == "static":
            return np.broadcast_to(np.array([self.x, self.y]), (t.size, 2)).copy()
        if self.motion == "circle":
            w = 2 * math.pi * ORBIT_SPEED[self.speed] * self.turn
            cx = self.x - self.orbit * math.cos(self.heading)
            cy = self.y - self.orbit * math.sin(self.heading)
            a = self.heading + w * t
            return np.stack([cx + self.orbit * np.cos(a), cy + self.orbit * np.sin(a)], axis=1)
        v = LINEAR_SPEED[self.speed]
        lo, hi = self.walls()
        return np.stack([_reflect(self.x + v * math.cos(self.heading) * t, lo, hi),
                         _reflect(self.y + v * math.sin(self.heading) * t, lo, hi)], axis=1)

    def at(self, time: float) -> WorldObject:
        """The image world's object at ``time`` seconds (for rendering)."""
        (x, y), = self.positions(np.array([time]))
        return WorldObject(self.shape, self.colour, self.size, float(x), float(y), self.radius,
                           self.rotation, self.tint)

    def bounce_frames(self, frames: int = FRAMES) -> tuple[int, ...]:
        """The frames (of ``frames`` over the clip) in whose interval a bounce falls, without repeats."""
        return tuple(sorted({min(frames - 1, int(b * frames / DURATION)) for b in self.bounces}))

    @property
    def key(self) -> tuple:
        """What both the picture and the sound of this object pin down."""
        return (self.shape, self.colour, self.size, self.motion, self.speed, self.bounce_frames())


@dataclass(frozen=True)
class AVScene:
    """A clip's latent scene: 1–2 moving objects on the image world's background, and its noise seed."""

    objects: tuple[AVObject, ...]
    background: Background
    noise_seed: int

    @property
    def av_key(self) -> tuple:
        """Everything visible and audible, discretely: the objects' keys, sorted."""
        return tuple(sorted(o.key for o in self.objects))

    def frame_scene(self, k: int, frames: int = FRAMES) -> Scene:
        """The image world's scene shown in frame ``k`` of ``frames``."""
        t = frame_time(k, frames)
        return Scene(objects=tuple(o.at(t) for o in self.objects), background=self.background,
                     noise_seed=self.noise_seed)


def frame_time(k: int, frames: int = FRAMES) -> float:
    """The time (seconds) frame ``k`` of ``frames`` shows: the centre of its interval."""
    return (k + 0.5) * DURATION / frames


def _reflect(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Unbounded coordinates folded into [lo, hi] as by mirror walls."""
    span = hi - lo
    w = np.mod(u - lo, 2 * span)
    return lo + np.where(w > span, 2 * span - w, w)


def _wall_hits(p0: float, v: float, lo: float, hi: float) -> list[float]:
    """Times in (0, DURATION) at which a coordinate starting at ``p0`` with velocity ``v`` meets a wall."""
    if abs(v) < 1e-9:
        return []
    first = (hi - p0) / v if v > 0 else (p0 - lo) / -v
    period = (hi - lo) / abs(v)
    out = []
    t = first
    while t < DURATION:
        if t > 1e-9:
            out.append(t)
        t += period
    return out


#: the headings a straight-line motion may take
_HEADINGS: dict[str, tuple[float, ...]] = {
    "left-right": (0.0, math.pi),
    "up-down": (math.pi / 2, -math.pi / 2),
    "diagonal": tuple(math.pi / 4 + k * math.pi / 2 for k in range(4)),
}


def _set_moving(rng: np.random.Generator, o: WorldObject, motion: str, speed: str) -> AVObject | None:
    """``o`` set in ``motion`` at ``speed`` (heading, orbit drawn); None when its orbit cannot fit."""
    base = dict(shape=o.shape, colour=o.colour, size=o.size, x=o.x, y=o.y, radius=o.radius,
                rotation=o.rotation, tint=o.tint)
    if motion == "static":
        return AVObject(**base)
    if motion == "circle":
        lo, hi = o.radius + _WALL, IMAGE_SIZE - o.radius - _WALL
        turn = 1 if rng.random() < 0.5 else -1
        orbit = float(rng.uniform(*ORBIT_RADIUS))
        # the start angles (of evenly spaced candidates) whose orbit stays inside the walls
        angles = rng.uniform(0, 2 * math.pi) + np.arange(_ORBIT_ANGLES) * (2 * math.pi / _ORBIT_ANGLES)
        cx, cy = o.x - orbit * np.cos(angles), o.y - orbit * np.sin(angles)
        fits = np.flatnonzero((np.minimum(cx, cy) - orbit >= lo) & (np.maximum(cx, cy) + orbit <= hi))
        if fits.size == 0:
            return None
        heading = float(angles[fits[int(rng.integers(fits.size))]] % (2 * math.pi))
        return AVObject(**base, motion=motion, speed=speed, heading=heading, turn=turn, orbit=orbit)
    options = _HEADINGS[motion]
    heading = options[int(rng.integers(len(options)))]
    return AVObject(**base, motion=motion, speed=speed, heading=heading,
                    bounces=_bounce_times(o.x, o.y, o.radius, speed, heading))


def _bounce_times(x: float, y: float, radius: float, speed: str, heading: float) -> tuple[float, ...]:
    """A straight-line mover's bounce times (seconds) within the clip, in order."""
    lo, hi = radius + _WALL, IMAGE_SIZE - radius - _WALL
    v = LINEAR_SPEED[speed]
    return tuple(sorted(_wall_hits(x, v * math.cos(heading), lo, hi) + _wall_hits(y, v * math.sin(heading), lo, hi)))


def make_av_object(shape: str, colour: str, size: str, x: float, y: float, motion: str = "static",
                   speed: str = "none", heading: float = 0.0, *, radius: float | None = None,
                   rotation: float = 0.0, tint: tuple[int, int, int] = (0, 0, 0), turn: int = 1,
                   orbit: float | None = None) -> AVObject:
    """An object built by hand (for probes and tests), its bounces derived as a drawn object's are.
    ``radius`` defaults to the middle of the size's range, ``orbit`` to the middle of :data:`ORBIT_RADIUS`;
    a straight-line ``heading`` need not be one the draw uses."""
    if shape not in SHAPES or colour not in COLOURS or size not in SIZES:
        raise UserError(f"unknown object {size!r} {colour!r} {shape!r}; known shapes {SHAPES}, colours "
                        f"{tuple(COLOURS)}, sizes {SIZES}")
    if motion not in MOTIONS:
        raise UserError(f"unknown motion {motion!r}; known: {', '.join(MOTIONS)}")
    if (motion == "static") != (speed == "none") or (motion != "static" and speed not in SPEEDS):
        raise UserError(f"a {motion} object's speed must be {'none' if motion == 'static' else SPEEDS}, got {speed!r}")
    r = float(np.mean(SIZE_RADIUS[size])) if radius is None else float(radius)
    lo, hi = r + _WALL, IMAGE_SIZE - r - _WALL
    if not (lo <= x <= hi and lo <= y <= hi):
        raise UserError(f"an object of radius {r:.1f} must start within [{lo:.1f}, {hi:.1f}] px, got ({x}, {y})")
    base = dict(shape=shape, colour=colour, size=size, x=float(x), y=float(y), radius=r, rotation=float(rotation),
                tint=tuple(int(t) for t in tint))
    if motion == "static":
        return AVObject(**base)
    if motion == "circle":
        rho = float(np.mean(ORBIT_RADIUS)) if orbit is None else float(orbit)
        cx, cy = x - rho * math.cos(heading), y - rho * math.sin(heading)
        if min(cx, cy) - rho < lo or max(cx, cy) + rho > hi or turn not in (1, -1):
            raise UserError(f"an orbit of {rho:.1f} px at start angle {heading:.2f} (turn {turn}) does not fit "
                            f"inside [{lo:.1f}, {hi:.1f}] px")
        return AVObject(**base, motion=motion, speed=speed, heading=float(heading), turn=turn, orbit=rho)
    return AVObject(**base, motion=motion, speed=speed, heading=float(heading),
                    bounces=_bounce_times(x, y, r, speed, heading))


def _apart(objects: list[AVObject]) -> bool:
    """Whether the objects' bounding circles stay apart at every frame and half-frame time."""
    t = np.linspace(0.0, DURATION, 2 * FRAMES + 1)
    tracks = [o.positions(t) for o in objects]
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            d = np.hypot(*(tracks[i] - tracks[j]).T)
            if d.min() <= objects[i].radius + objects[j].radius + _GAP:
                return False
    return True


def sample_av_scene(rng: np.random.Generator, n_objects: int | None = None) -> AVScene:
    """Draw a random clip: 1–2 objects, each with a motion and speed drawn uniformly, placed by the image
    world's scene draw (background, shapes, colours, sizes, start positions) until the motions fit: orbits
    inside the walls, objects never touching during the clip."""
    if n_objects not in (None, 1, 2):
        raise UserError(f"an AV scene has 1 or 2 objects, got n_objects={n_objects!r}")
    for _ in range(100):
        n = int(rng.choice([1, 2], p=OBJECT_COUNT_P)) if n_objects is None else n_objects
        plan = []
        for _ in range(n):
            motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
            plan.append((motion, "none" if motion == "static" else SPEEDS[int(rng.integers(len(SPEEDS)))]))
        # the motions are kept and the layout redrawn, so that the motions' mix is not skewed towards
        # those that fit most layouts (static ones)
        for _ in range(_LAYOUT_TRIES):
            scene = sample_scene(rng, n)
            objs = [_set_moving(rng, o, m, v) for o, (m, v) in zip(scene.objects, plan)]
            if all(o is not None for o in objs) and _apart(objs):
                return AVScene(objects=tuple(objs), background=scene.background, noise_seed=scene.noise_seed)
    raise RuntimeError("could not lay out a clip's moving objects")  # pragma: no cover - never seen
