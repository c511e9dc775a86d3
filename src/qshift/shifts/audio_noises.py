"""Procedural environmental noises standing in for READ's five noise recordings (traffic, crowd, rain, thunder,
wind), which cannot be downloaded here.

Each is synthesised from its physical character, with numpy only (shaped spectra by FFT, event templates
scattered by ``np.bincount``), and returned at the level of a recording — an RMS of :data:`NOISE_RMS`
(-20 dBFS) unless that would put its peak above :data:`NOISE_PEAK` (-1 dBFS) — to which READ's gain schedule
is applied (see :mod:`qshift.shifts.audio`):

* ``traffic`` — a steady low-frequency rumble (brown noise below ~400 Hz) with passing vehicles: bell-shaped
  swells of low-passed tyre noise and an engine hum whose pitch drops as it passes (Doppler);
* ``crowd`` — babble of :data:`CROWD_VOICES` pseudo-voices: glottal pulse trains (male and female pitch, slow
  intonation) through vowel formant filters (Peterson & Barney's averages), in syllables of ~4 Hz, over a faint
  pink murmur;
* ``rain`` — thousands of droplets a second (short decaying resonances of 1.5–9 kHz with heavy-tailed sizes)
  over a hiss of high-passed noise;
* ``thunder`` — a strike every 5–10 s: an impulsive crack (a 5–15 ms burst and a few claps within 0.15 s, up
  to ~2 kHz), then a long low-frequency rumble (below ~150 Hz) that rolls and decays over seconds, over a faint
  background;
* ``wind`` — band-passed noise (two bands, the upper one rising with the gusts) under a slow gusting
  amplitude modulation (below ~0.4 Hz).

Every noise is a pure function of ``(kind, n_samples, sample_rate)`` and the random generator's state.
"""
from __future__ import annotations

import numpy as np

from qshift.errors import UserError

#: the five environmental noises of READ's audio benchmark, in its order (``make_corruptions/make_c_audio.py``)
NOISE_KINDS: tuple[str, ...] = ("traffic", "crowd", "rain", "thunder", "wind")
#: the level of a synthesised noise, i.e. of "the recording" at 0 dB gain: an RMS of -20 dBFS, or less where
#: its peak would pass :data:`NOISE_PEAK` (-1 dBFS) — a recording stays below full scale, so impulsive noises
#: (rain, thunder) come out quieter on average, as real recordings of them do
NOISE_RMS = 0.1
NOISE_PEAK = 10 ** (-1 / 20)
#: the procedural noises' version, to record with results (bump when a synthesis changes)
SYNTHESIS_VERSION = "qshift-procedural-noise-1"
CROWD_VOICES = 20
_FORMANT_BW = np.array([80.0, 110.0, 160.0])    # formant bandwidths, Hz
_FORMANT_GAINS = np.array([1.0, 0.5, 0.25])
#: vowel formants F1–F3 in Hz (Peterson & Barney 1952, adult averages) for the crowd's pseudo-voices
VOWEL_FORMANTS: tuple[tuple[float, float, float], ...] = (
    (730.0, 1090.0, 2440.0),  # a
    (530.0, 1840.0, 2480.0),  # e
    (270.0, 2290.0, 3010.0),  # i
    (570.0, 840.0, 2410.0),   # o
    (300.0, 870.0, 2240.0),   # u
    (660.0, 1720.0, 2410.0),  # ae
    (490.0, 1350.0, 1690.0),  # er
)


def _shaped(rng: np.random.Generator, n: int, sr: int, gain) -> np.ndarray:
    """Gaussian noise of length ``n`` with amplitude response ``gain(freqs_hz)`` (applied by FFT), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    out = np.fft.irfft(spec * gain(f), n)
    return out / (np.sqrt(np.mean(out ** 2)) + 1e-12)


def _band(lo: float, hi: float, order: float = 2.0):
    """A smooth band-pass amplitude response (Butterworth-like magnitude, ``hi=inf`` for a high-pass)."""
    def gain(f):
        f = np.maximum(f, 1e-3)
        g = 1.0 / np.sqrt(1.0 + (lo / f) ** (2 * order)) if lo > 0 else np.ones_like(f)
        return g / np.sqrt(1.0 + (f / hi) ** (2 * order)) if np.isfinite(hi) else g
    return gain


def _smooth(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """A slow random curve (Gaussian-shaped spectrum up to ~``rate_hz``), zero mean, unit std."""
    return _shaped(rng, n, sr, lambda f: np.exp(-0.5 * (f / rate_hz) ** 2))


def _scatter(n: int, at: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Sum ``templates[k]`` (``[events, length]``) into a length-``n`` loop, starting at sample ``at[k]``."""
    idx = (at[:, None] + np.arange(templates.shape[1])[None, :]) % n  # circular: the noise loops seamlessly
    return np.bincount(idx.ravel(), weights=templates.ravel(), minlength=n)


def _traffic(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    dur = n / sr
    rumble = _shaped(rng, n, sr, lambda f: _band(25.0, 400.0)(f) / np.maximum(f, 25.0))  # brown, band-limited
    out = 0.8 * rumble * (1.0 + 0.15 * _smooth(rng, n, sr, 0.2))
    n_cars = max(1, rng.poisson(dur / 2.5))
    tyres = _shaped(rng, n, sr, lambda f: _band(60.0, 900.0)(f) / np.sqrt(np.maximum(f, 60.0)))
    for _ in range(n_cars):
        t0 = rng.uniform(-0.1, 1.1) * dur
        tau = rng.uniform(0.6, 2.0)                                   # pass-by time scale, s
        swell = 1.0 / (1.0 + ((t - t0) / tau) ** 2)
        f0 = rng.uniform(30.0, 90.0)                                  # engine firing frequency, Hz
        doppler = 1.0 + rng.uniform(0.03, 0.08) * np.tanh((t0 - t) / (0.4 * tau))
        phase = 2 * np.pi * np.cumsum(f0 * doppler) / sr
        hum = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3, 4))
        out += rng.uniform(0.5, 1.1) * swell * (tyres + 0.35 * hum)
        tyres = np.roll(tyres, int(rng.integers(n)))                  # a different stretch per vehicle
    return out


def _crowd(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    dur = n / sr
    ir_len = int(0.025 * sr)                 # formants have decayed by e^-6
    ti = np.arange(ir_len) / sr
    out = 0.08 * _shaped(rng, n, sr, lambda f: _band(150.0, 3000.0)(f) / np.sqrt(np.maximum(f, 150.0)))
    for _ in range(CROWD_VOICES):
        female = rng.random() < 0.5
        f0_mean = rng.uniform(165.0, 255.0) if female else rng.uniform(85.0, 155.0)
        contour = f0_mean * np.exp(0.08 * _smooth(rng, n, sr, 1.5))  # intonation
        # glottal pulses: one per pitch period, with 1 % jitter
        period_phase = np.cumsum(contour * (1.0 + 0.01 * rng.standard_normal(n))) / sr
        pulses = np.flatnonzero(np.diff(np.floor(period_phase), prepend=0.0) > 0)
        if len(pulses) == 0:
            continue
        # syllables of ~4 Hz with pauses; each syllable one vowel
        bounds = np.cumsum(rng.uniform(0.12, 0.35, size=int(dur / 0.12) + 2)) - rng.uniform(0, 0.3)
        syl = np.searchsorted(bounds, pulses / sr)
        n_syl = len(bounds) + 1
        voiced = rng.random(n_syl) > 0.25
        vowel = rng.integers(len(VOWEL_FORMANTS), size=n_syl)
        start = np.concatenate([[-1.0], bounds])[syl]
        end = np.concatenate([bounds, [dur + 1.0]])[syl]
        pos = np.clip((pulses / sr - start) / np.maximum(end - start, 1e-3), 0.0, 1.0)
        amp = voiced[syl] * np.sin(np.pi * pos) ** 0.7
        keep = amp > 0
        pulses, syl, amp = pulses[keep], syl[keep], amp[keep]
        if len(pulses) == 0:
            continue
        shift = 1.0 + (0.15 if female else 0.0) + 0.05 * rng.standard_normal()  # vocal-tract length
        irs = (_FORMANT_GAINS[None, :, None] * np.exp(-np.pi * _FORMANT_BW[None, :, None] * ti[None, None, :])
               * np.sin(2 * np.pi * (np.asarray(VOWEL_FORMANTS) * shift)[:, :, None] * ti[None, None, :])).sum(1)
        voice = _scatter(n, pulses, amp[:, None] * irs[vowel[syl]])
        out += rng.uniform(0.3, 1.0) * voice / (np.sqrt(np.mean(voice ** 2)) + 1e-12)
    return out


def _rain(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    dur = n / sr
    hiss = _shaped(rng, n, sr, _band(1500.0, np.inf, order=2.0)) * (1.0 + 0.1 * _smooth(rng, n, sr, 0.3))
    n_drops = rng.poisson(rng.uniform(400.0, 900.0) * dur)
    out = 0.15 * hiss
    if n_drops:
        length = int(0.006 * sr)
        td = np.arange(length) / sr
        f = np.minimum(np.exp(rng.uniform(np.log(1500.0), np.log(9000.0), n_drops)), 0.45 * sr)
        chirp = 1.0 + rng.uniform(0.0, 0.4, n_drops)                   # a bubble's rising pitch
        decay = rng.uniform(0.0006, 0.0025, n_drops)
        size = np.minimum(rng.lognormal(0.0, 1.2, n_drops), 12.0)  # a few big drops, many small
        phase = 2 * np.pi * f[:, None] * td[None, :] * (1.0 + (chirp[:, None] - 1.0) * td[None, :] / td[-1] / 2)
        drops = size[:, None] * np.exp(-td[None, :] / decay[:, None]) * np.sin(phase)
        pops = _scatter(n, rng.integers(0, n, n_drops), drops)
        out = out + pops / (np.sqrt(np.mean(pops ** 2)) + 1e-12)
    return out


def _thunder(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    dur = n / sr
    out = 0.01 * _shaped(rng, n, sr, lambda f: _band(20.0, 300.0)(f) / np.maximum(f, 20.0))
    rumble_src = _shaped(rng, n, sr, lambda f: _band(20.0, 150.0, order=3.0)(f) / np.maximum(f, 20.0) ** 0.5)
    crack_src = _shaped(rng, n, sr, lambda f: _band(80.0, 2000.0)(f) / np.sqrt(np.maximum(f, 80.0)))
    # a strike every 5–10 s (at least one, in the first 40 % of a short clip)
    strikes = [rng.uniform(0.02, 0.4) * min(dur, 10.0)]
    while strikes[-1] + 10.0 < dur:
        strikes.append(strikes[-1] + rng.uniform(5.0, 10.0))
    for t0 in strikes:
        after = (t - t0) % dur                                        # circular: the noise loops seamlessly
        crack = np.exp(-after / rng.uniform(0.005, 0.015))
        for _ in range(int(rng.integers(1, 4))):                      # secondary claps
            tk = rng.uniform(0.02, 0.15)
            crack = crack + 0.5 * (after >= tk) * np.exp(-np.maximum(after - tk, 0.0) / 0.01)
        decay = rng.uniform(1.5, 3.5) * min(1.0, dur / 6.0)
        rolls = np.exp(0.4 * np.clip(_smooth(rng, n, sr, 1.2), -2, 2))  # the rumble rolls
        rumble = (1.0 - np.exp(-after / 0.25)) * np.exp(-after / decay) * rolls
        out += rng.uniform(0.7, 1.0) * (5.0 * crack * crack_src + rumble * rumble_src)
        rumble_src = np.roll(rumble_src, int(rng.integers(n)))
        crack_src = np.roll(crack_src, int(rng.integers(n)))
    return out


def _wind(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    gust = _smooth(rng, n, sr, 0.25)
    strength = np.exp(0.35 * gust)                                     # slow gusting, always positive
    low = _shaped(rng, n, sr, lambda f: _band(40.0, 350.0)(f) / np.sqrt(np.maximum(f, 40.0)))
    high = _shaped(rng, n, sr, _band(250.0, 1100.0, order=3.0))
    lift = np.clip(0.5 + 0.5 * np.tanh(gust), 0.0, 1.0)                # gusts raise the pitch
    return strength * (low + 0.45 * lift * high)


_SYNTHS = {"traffic": _traffic, "crowd": _crowd, "rain": _rain, "thunder": _thunder, "wind": _wind}


def synthesise_noise(kind: str, n_samples: int, sample_rate: int, rng: np.random.Generator | int) -> np.ndarray:
    """``n_samples`` of procedural ``kind`` noise at ``sample_rate``: float32, zero mean, scaled to an RMS of
    :data:`NOISE_RMS` — or less, so that its peak stays at most :data:`NOISE_PEAK`.

    ``rng`` is a ``numpy.random.Generator`` (advanced) or an int seed."""
    if kind not in _SYNTHS:
        raise UserError(f"unknown environmental noise {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if int(sample_rate) < 8000:
        raise UserError(f"noise synthesis needs a sample rate of at least 8000 Hz, got {sample_rate}")
    n = int(n_samples)
    if n < 0:
        raise UserError(f"n_samples must be >= 0, got {n_samples}")
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    # synthesise at least 1 s so event-based noises keep their character in very short clips
    m = max(n, int(sample_rate))
    x = _SYNTHS[kind](gen, m, int(sample_rate))[:n]
    x = x - x.mean()
    rms, peak = float(np.sqrt(np.mean(x ** 2))), float(np.abs(x).max())
    if not np.isfinite(rms) or rms == 0.0:  # pragma: no cover - a synthesis bug
        raise RuntimeError(f"{kind} synthesis produced a silent or non-finite signal")
    return (x * min(NOISE_RMS / rms, NOISE_PEAK / peak)).astype(np.float32)
