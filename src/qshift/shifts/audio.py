"""Audio corruptions of READ's audio benchmarks (Kinetics-Sounds-C / VGGSound-C, audio side), severities 1–5.

READ (``XLearning-SCU/2024-ICLR-READ``, ICLR 2024) builds them in ``make_corruptions/make_c_audio.py``:

* ``gaussian_noise`` — white Gaussian noise added to the waveform read by soundfile (floats in [-1, 1]),
  standard deviation :data:`GAUSSIAN_NOISE_STD` by severity; written back as a 16-bit WAV;
* ``traffic``, ``crowd``, ``rain``, ``thunder``, ``wind`` — a recording ``<kind>.wav`` (READ's
  ``weather_audios/``) cropped or looped to the clip's length, amplified by :data:`NOISE_GAIN_DB` by severity
  (pydub ``apply_gain``, in dB, on the recording's own level) and overlaid on the clip (pydub ``overlay``: a
  saturating sample-wise sum), exported as a WAV.

Here, with the same numbers:

* the recordings are replaced by procedural ones (:mod:`qshift.shifts.audio_noises`): one "recording" of
  :data:`NOISE_BED_SECONDS` per (kind, seed), at an RMS of -20 dBFS with peaks capped at -1 dBFS
  (:data:`~qshift.shifts.audio_noises.NOISE_RMS`, :data:`~qshift.shifts.audio_noises.NOISE_PEAK`): the level 0 dB
  of gain leaves it at (READ's recordings and their levels are not published); with ``noise_dir`` a folder of
  real ``<kind>.wav`` files is used instead, at the files' own level, as READ does;
* every item takes its stretch of the recording from a random offset (looping past its end) that depends on
  (item id, corruption, seed) and not on the severity — so the severities of one item differ only by the gain,
  as in READ, where every severity mixes the same stretch (READ takes every clip's stretch from the start);
  Gaussian noise is drawn per (item id, corruption, severity, seed) (:func:`~qshift.shifts.image.corruption_seed`);
* the mix is clipped to [-1, 1], what READ's 16-bit WAVs do (soundfile clips on writing, pydub's overlay
  saturates); it is not quantised to 16 bits;
* a real noise file is read with soundfile, its first channel kept (CAV-MAE reads channel 0 of the stereo mix
  pydub makes of a stereo noise file) and resampled to the clip's rate (READ's pydub would resample the clip
  to the noise file's rate instead).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from qshift.data.audio_features import SAMPLE_RATE, as_waveform
from qshift.errors import UserError
from qshift.shifts.audio_noises import NOISE_KINDS, SYNTHESIS_VERSION, synthesise_noise
from qshift.shifts.image import corruption_seed

#: READ's audio corruptions in its order (``run_read.py``'s ``corruption_list`` for ``--corruption-modality audio``)
AUDIO_CORRUPTIONS: tuple[str, ...] = ("gaussian_noise",) + NOISE_KINDS
ENVIRONMENTAL_NOISES: tuple[str, ...] = NOISE_KINDS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: READ ``make_corruptions/make_c_audio.py``, ``gaussian_noise``: ``noise_std = [.08, .12, 0.18, 0.26, 0.38]``
GAUSSIAN_NOISE_STD: tuple[float, ...] = (0.08, 0.12, 0.18, 0.26, 0.38)
#: READ ``make_corruptions/make_c_audio.py``, ``add_external_noise``: ``scale = [1, 2, 4, 6, 8]`` passed to
#: pydub's ``apply_gain``, i.e. dB of gain on the noise recording
NOISE_GAIN_DB: tuple[float, ...] = (1.0, 2.0, 4.0, 6.0, 8.0)
#: the length of each procedural noise "recording" (longer than CAV-MAE's 10.24 s inputs)
NOISE_BED_SECONDS = 30.0
#: the file a noise kind is read from inside ``noise_dir`` (READ's ``weather_path/<corruption>.wav``)
NOISE_FILE = "{kind}.wav"


def _check(corruption: str, severity: int) -> None:
    if corruption not in AUDIO_CORRUPTIONS:
        raise UserError(f"unknown audio corruption {corruption!r}; known: {', '.join(AUDIO_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UserError(f"audio corruption severity must be one of {SEVERITIES}, got {severity!r}")


def _bed_seed(kind: str, seed: int) -> int:
    key = f"noise-bed|{kind}|{int(seed)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@lru_cache(maxsize=16)
def noise_bed(kind: str, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """The procedural "recording" of ``kind`` every item's noise is cut from: float32, :data:`NOISE_BED_SECONDS`
    long (read-only, cached)."""
    if kind not in NOISE_KINDS:
        raise UserError(f"unknown environmental noise {kind!r}; known: {', '.join(NOISE_KINDS)}")
    bed = synthesise_noise(kind, int(round(NOISE_BED_SECONDS * sample_rate)), int(sample_rate),
                           np.random.default_rng(_bed_seed(kind, seed)))
    bed.setflags(write=False)
    return bed


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling of a looped signal: exact for a periodic one, which a noise loop is."""
    if sr_in == sr_out:
        return x
    n_out = max(1, int(round(len(x) * sr_out / sr_in)))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=complex)
    out_spec[:keep] = spec[:keep]
    if n_out < len(x) and n_out % 2 == 0:
        out_spec[-1] = out_spec[-1].real  # the new Nyquist bin of a downsampled signal is real
    elif n_out > len(x) and len(x) % 2 == 0:
        out_spec[keep - 1] *= 0.5  # the old Nyquist bin is split between +- its frequency
    return np.fft.irfft(out_spec, n_out) * (n_out / len(x))


@lru_cache(maxsize=16)
def _noise_file(path: str, mtime_ns: int, size: int, sample_rate: int) -> np.ndarray:
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - a dependency of qshift
        raise ImportError("reading noise files needs the `soundfile` package: pip install soundfile") from e
    try:
        data, sr = soundfile.read(path, dtype="float64", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError / RuntimeError / TypeError for non-audio files
        raise UserError(f"cannot read noise file {path} as audio ({type(e).__name__}: {e}); "
                        "give a WAV file soundfile can read") from None
    if data.shape[0] == 0:
        raise UserError(f"noise file {path} has no samples")
    x = _resample(data[:, 0], int(sr), int(sample_rate))  # the first channel, as CAV-MAE reads the mix
    if not np.isfinite(x).all():
        raise UserError(f"noise file {path} has NaN or infinite samples")
    out = x.astype(np.float32)
    out.setflags(write=False)
    return out


def load_noise_file(noise_dir: str | os.PathLike, kind: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``noise_dir/<kind>.wav`` as float32 mono at ``sample_rate`` (its first channel, its own level; cached)."""
    if kind not in NOISE_KINDS:
        raise UserError(f"unknown environmental noise {kind!r}; known: {', '.join(NOISE_KINDS)}")
    folder = Path(noise_dir)
    if not folder.is_dir():
        raise UserError(f"noise_dir {folder} is not a folder (it should hold {', '.join(NOISE_FILE.format(kind=k) for k in NOISE_KINDS)})")
    path = folder / NOISE_FILE.format(kind=kind)
    if not path.is_file():
        raise UserError(f"noise_dir {folder} has no {path.name} (one WAV per noise: "
                        f"{', '.join(NOISE_FILE.format(kind=k) for k in NOISE_KINDS)})")
    st = path.stat()
    return _noise_file(str(path.resolve()), st.st_mtime_ns, st.st_size, int(sample_rate))


def noise_source(noise_dir: str | os.PathLike | None = None) -> str:
    """Where the environmental noises come from, to record with results."""
    return SYNTHESIS_VERSION if noise_dir is None else f"files:{Path(noise_dir).resolve()}"


def _noise_stretch(source: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of ``source`` from a random offset, looping past its end."""
    start = int(rng.integers(len(source)))
    return np.take(source, np.arange(start, start + n), mode="wrap")


def corrupt_audio(waveform: np.ndarray, corruption: str, severity: int, item_id: int, seed: int = 0,
                  noise_dir: str | os.PathLike | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Corrupt one mono float waveform in [-1, 1] deterministically; same length and dtype, clipped to [-1, 1].

    ``noise_dir``: a folder of real ``<kind>.wav`` noise files used instead of the procedural noises (ignored
    by ``gaussian_noise``)."""
    _check(corruption, severity)
    w = as_waveform(waveform)
    if len(w) == 0:
        return w.copy()
    x = w.astype(np.float64)
    if corruption == "gaussian_noise":
        rng = np.random.default_rng(corruption_seed(item_id, corruption, severity, seed))
        x = x + rng.normal(0.0, GAUSSIAN_NOISE_STD[severity - 1], len(x))
    else:
        source = (noise_bed(corruption, int(sample_rate), int(seed)) if noise_dir is None
                  else load_noise_file(noise_dir, corruption, int(sample_rate)))
        # the stretch depends on (item, corruption, seed) only: the severities of an item differ by the gain
        rng = np.random.default_rng(corruption_seed(item_id, corruption, 0, seed))
        gain = 10.0 ** (NOISE_GAIN_DB[severity - 1] / 20.0)
        x = x + gain * _noise_stretch(source, len(x), rng)
    return np.clip(x, -1.0, 1.0).astype(w.dtype)


def corrupt_audio_batch(waveforms: np.ndarray | Sequence[np.ndarray], corruption: str, severity: int, item_ids,
                        seed: int = 0, noise_dir: str | os.PathLike | None = None,
                        sample_rate: int = SAMPLE_RATE) -> np.ndarray | list[np.ndarray]:
    """Corrupt a float ``[B, N]`` batch (an array back) or a sequence of 1-D waveforms (a list back); item ``k``
    is seeded by ``item_ids[k]``, whatever batch it is in."""
    _check(corruption, severity)
    ids = list(item_ids)
    if isinstance(waveforms, np.ndarray) and waveforms.ndim != 2:
        raise UserError(f"waveforms must be a batch [B, samples], got shape {waveforms.shape}")
    if len(ids) != len(waveforms):
        raise UserError(f"{len(waveforms)} waveforms but {len(ids)} item ids")
    out = [corrupt_audio(w, corruption, severity, i, seed, noise_dir, sample_rate) for w, i in zip(waveforms, ids)]
    if isinstance(waveforms, np.ndarray):
        return np.stack(out) if out else np.zeros_like(waveforms)
    return out
