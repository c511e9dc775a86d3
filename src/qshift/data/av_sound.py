"""Synthesising an audio–video clip's soundtrack from its latent scene: one voice per object, mixed.

Each object's voice is a tone whose every property is one of the object's:

* **shape → timbre**: a harmonic profile per shape (:data:`TIMBRES`: pure, odd, saw-like, inharmonic …);
* **colour → pitch class**: one fundamental per colour, 1.5 semitones apart within one octave, in hue
  order (:data:`COLOUR_STEP`), so no two colours share a pitch in any octave;
* **size → octave and loudness**: large objects sound an octave lower and louder (:data:`SIZE_BASE`,
  :data:`SIZE_GAIN`);
* **position → loudness and pitch bend**: loudness rises from the left edge to the right, pitch bends up
  by at most :data:`GLIDE_SEMITONES` towards the top, so a trajectory is heard as it is seen;
* **speed → tremolo**: a moving object's loudness wavers at :data:`TREMOLO_RATE` by speed class;
* **bounces → onsets**: each bounce adds a short noise burst (a click) at the bounce's time, inside its
  bounce frame's interval.

Voices are summed with a fixed gain (:data:`MIX_GAIN`), not normalised per track, so loudness keeps its
meaning; two voices peak below 0.9.  Everything is deterministic by scene (the bursts' noise comes from
the scene's noise seed).
"""
from __future__ import annotations

import math

import numpy as np

from qshift.data.av_scenes import DURATION, AVObject, AVScene
from qshift.data.world_scenes import COLOURS, IMAGE_SIZE

SAMPLE_RATE = 16_000
AUDIO_SAMPLES = int(round(SAMPLE_RATE * DURATION))

#: shape → partials as (frequency ratio to the fundamental, amplitude); all ratios are at most 8 so the
#: highest partial of the highest note stays below the Nyquist frequency
TIMBRES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": ((1, 1.0),),                                        # pure sine
    "heart": ((1, 1.0), (2, 0.45)),                               # soft octave
    "triangle": ((1, 1.0), (3, 0.45)),                            # twelfth
    "crescent": ((1, 1.0), (2, 0.35), (4, 0.3)),                  # even octaves
    "diamond": ((1, 1.0), (4, 0.35), (5, 0.35)),                  # a high pair
    "square": ((1, 1.0), (3, 1 / 3), (5, 1 / 5), (7, 1 / 7)),     # odd harmonics, square-wave-like
    "star": tuple((n, 1.0 / n) for n in range(1, 9)),             # all harmonics, sawtooth-like
    "cross": ((1, 1.0), (2.756, 0.5), (5.404, 0.3)),              # inharmonic, free-bar-like
}
#: the colours' pitch classes: colour ``i`` (in :data:`COLOURS` order) is ``i · COLOUR_STEP`` semitones
#: above its size's base note
COLOUR_STEP = 1.5
#: base note (Hz) per size: the red's fundamental; large objects sound an octave lower
SIZE_BASE: dict[str, float] = {"small": 440.0, "large": 220.0}
SIZE_GAIN: dict[str, float] = {"small": 0.55, "large": 1.0}
#: the most an object's height bends its pitch (semitones; up at the top, down at the bottom)
GLIDE_SEMITONES = 0.4
#: tremolo rate (Hz) per speed class, and its depth (fraction of the loudness)
TREMOLO_RATE: dict[str, float] = {"slow": 4.0, "fast": 8.0}
TREMOLO_DEPTH = 0.6
#: a voice's tone and bounce click peak at these (so a voice peaks at 1 or below) and the mix's gain
TONE_GAIN = 0.65
BOUNCE_GAIN = 0.35
MIX_GAIN = 0.45
_BURST_S = 0.05
_BURST_DECAY_S = 0.012
_FADE_S = 0.01

#: the control rate's hop (1 ms), the control times and each hop's interpolation weights
_HOP = SAMPLE_RATE // 1000
_CONTROL = np.arange(AUDIO_SAMPLES // _HOP + 1) * _HOP / SAMPLE_RATE
_HOP_FRAC = np.arange(_HOP) / _HOP


def fundamental(colour: str, size: str) -> float:
    """The fundamental (Hz) of an object of this colour and size at mid height."""
    return SIZE_BASE[size] * 2.0 ** (COLOUR_STEP * list(COLOURS).index(colour) / 12.0)


def _burst(seed: tuple[int, ...]) -> np.ndarray:
    """A bright, fast-decaying noise click with peak 1."""
    n = int(_BURST_S * SAMPLE_RATE)
    noise = np.random.default_rng(seed).standard_normal(n + 1)
    click = np.diff(noise) * np.exp(-np.arange(n) / (_BURST_DECAY_S * SAMPLE_RATE))
    return click / np.abs(click).max()


def _upsample(control: np.ndarray) -> np.ndarray:
    """Values at the control times, linearly interpolated to every sample: float64 [AUDIO_SAMPLES]."""
    return (control[:-1, None] + np.diff(control)[:, None] * _HOP_FRAC).reshape(-1)


def _sines(cycles: np.ndarray, ratio: float) -> np.ndarray:
    """sin(2π · ratio · cycles) in float32, its argument wrapped first to keep float32's precision."""
    c = ratio * cycles
    return np.sin((2 * math.pi) * (c - np.floor(c)).astype(np.float32))


def _partials(cycles: np.ndarray, partials: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The sum of ``amplitude · sin(2π · ratio · cycles)`` over the partials over the amplitudes' sum,
    float32.  Integer harmonics come from the Chebyshev recurrence
    sin((n+1)φ) = 2 cos φ · sin(nφ) − sin((n−1)φ): three array operations each instead of a sine."""
    s1 = _sines(cycles, 1.0)
    c2 = 2.0 * _sines(cycles + 0.25, 1.0)  # 2 cos φ
    harmonic = {round(r): a for r, a in partials if float(r).is_integer()}
    out = np.zeros_like(s1)
    prev, cur = np.zeros_like(s1), s1
    for n in range(1, max(harmonic, default=0) + 1):
        if n in harmonic:
            out += np.float32(harmonic[n]) * cur
        prev, cur = cur, c2 * cur - prev
    for r, a in partials:
        if not float(r).is_integer():
            out += np.float32(a) * _sines(cycles, r)
    return out / np.float32(sum(a for _, a in partials))


def _voice(o: AVObject, seed: tuple[int, ...]) -> np.ndarray:
    """One object's voice over the clip, float32 [AUDIO_SAMPLES], peak at most 1."""
    # pitch and loudness follow the trajectory at a 1 kHz control rate, interpolated to the samples
    pos = o.positions(_CONTROL)
    bend = GLIDE_SEMITONES * (1.0 - 2.0 * pos[:, 1] / IMAGE_SIZE)
    freq = fundamental(o.colour, o.size) * 2.0 ** (bend / 12.0)
    loud = SIZE_GAIN[o.size] * (0.35 + 0.65 * pos[:, 0] / IMAGE_SIZE)
    if o.motion != "static":
        loud = loud * (1.0 - TREMOLO_DEPTH * 0.5 * (1.0 - np.cos(2 * math.pi * TREMOLO_RATE[o.speed] * _CONTROL)))
    cycles = np.cumsum(_upsample(freq)) / SAMPLE_RATE
    out = (TONE_GAIN * _upsample(loud)).astype(np.float32) * _partials(cycles, TIMBRES[o.shape])
    if o.bounces:
        click = (BOUNCE_GAIN * SIZE_GAIN[o.size] * _burst(seed)).astype(np.float32)
        for b in o.bounces:
            at = int(round(b * SAMPLE_RATE))
            end = min(AUDIO_SAMPLES, at + click.size)
            out[at:end] += click[:end - at]
    return out


def synthesise(scene: AVScene) -> np.ndarray:
    """A clip's soundtrack: float32 [AUDIO_SAMPLES] at :data:`SAMPLE_RATE`, in [-1, 1]."""
    mix = sum(_voice(o, (scene.noise_seed, i)) for i, o in enumerate(scene.objects)) * MIX_GAIN
    fade = int(_FADE_S * SAMPLE_RATE)
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
    mix[:fade] *= ramp
    mix[-fade:] *= ramp[::-1]
    return np.clip(mix, -1.0, 1.0).astype(np.float32)
