"""Audio input features of CAV-MAE: 128-bin Kaldi log-mel filterbanks, padded / cropped and normalised.

CAV-MAE (``YuanGongND/cav-mae``, ``src/dataloader.py``, ``AudiosetDataset._wav2fbank``) reads a 16 kHz mono
WAV with ``torchaudio.load`` (float32 in [-1, 1], *not* the int16 scale Kaldi itself uses), subtracts the
waveform's mean, and calls::

    torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                                      window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)

then zero-pads at the end or crops the end to ``target_length`` frames (1024 = 10.24 s) and normalises with
``(fbank - mean) / std``.  READ (``XLearning-SCU/2024-ICLR-READ``, ``dataloader.py``) copies this unchanged.

:func:`fbank` is a numpy transcription of that computation (torchaudio cannot be installed against qshift's
torch): torchaudio's remaining defaults are Kaldi's — 25 ms frames of 400 samples, only whole frames
(``snip_edges``), per-frame DC removal, pre-emphasis 0.97 (the first sample against itself), a symmetric Hann
window, zero-padding to a 512-point FFT, the power spectrum's 256 lowest bins (Nyquist dropped) through
triangular mel filters (``1127 ln(1 + f/700)``) from 20 Hz to Nyquist, and ``log(max(e, FLT_EPSILON))``.
``htk_compat`` only moves the energy column, which ``use_energy=False`` leaves out.

Kaldi itself and ``kaldi-native-fbank`` refuse this configuration: at 16 kHz with a 512-point FFT the 4th of
128 mel filters (index 3) covers no FFT bin, so they abort with "You may have set num_mel_bins too large";
torchaudio does not check, and that filter's output is the constant ``log(FLT_EPSILON) = -15.942385``
(:data:`EMPTY_BIN_LOG`) in every CAV-MAE input.  Kept here, as the pretrained models saw it.  docs/audio.md
records the checks against torchaudio's own ``kaldi.py`` and against ``kaldi-native-fbank`` (where it accepts
the bin count).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from qshift.errors import UserError

#: CAV-MAE's audio sample rate: every clip is resampled to 16 kHz mono (``src/preprocess/extract_audio.py``)
SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0
#: Kaldi / torchaudio defaults CAV-MAE keeps
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
N_FFT = 512                                  # 400-sample frames rounded up to a power of two
FLT_EPSILON = np.float32(np.finfo(np.float32).eps)
#: what an empty mel filter (see :func:`empty_mel_bins`) always gives: ``log(FLT_EPSILON)``
EMPTY_BIN_LOG = float(np.log(FLT_EPSILON))
#: CAV-MAE's input length in frames (``--target_length 1024`` in every ``egs/*/run_cavmae_*.sh``): 10.24 s
TARGET_LENGTH = 1024

#: CAV-MAE's filterbank normalisation constants, ``dataset_mean=-5.081`` / ``dataset_std=4.4849``: the same
#: pair in ``egs/audioset/run_cavmae_ft_full.sh`` and ``egs/vggsound/run_cavmae_ft.sh`` (cav-mae) and as the
#: ``--dataset_mean`` / ``--dataset_std`` defaults of READ's ``run_read.py``, which READ uses for both its
#: VGGSound and Kinetics-Sounds (KS-50) benchmarks.  (AST's different AudioSet pair, -4.2677393 / 4.5689974
#: with ``/ (2 * std)``, is not CAV-MAE's.)
CAVMAE_MEAN, CAVMAE_STD = -5.081, 4.4849
NORM_STATS: dict[str, tuple[float, float]] = {
    "audioset": (CAVMAE_MEAN, CAVMAE_STD),
    "vggsound": (CAVMAE_MEAN, CAVMAE_STD),
    "kinetics_sounds": (CAVMAE_MEAN, CAVMAE_STD),
}


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


@lru_cache(maxsize=16)
def mel_filters(num_mel_bins: int = NUM_MEL_BINS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                low_freq: float = LOW_FREQ, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters, float32 ``[num_mel_bins, n_fft // 2 + 1]`` (the Nyquist column zero).

    ``high_freq <= 0`` is an offset from Nyquist.  Filters that cover no FFT bin are kept as zero rows, as
    torchaudio keeps them (Kaldi refuses them)."""
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0 else high_freq
    if not (0.0 <= low_freq < high <= nyquist) or num_mel_bins < 4:
        raise UserError(f"bad mel filter settings: {num_mel_bins} bins from {low_freq} to {high} Hz "
                        f"at {sample_rate} Hz (need >= 4 bins, 0 <= low < high <= Nyquist)")
    lo, hi = float(_mel(low_freq)), float(_mel(high))
    delta = (hi - lo) / (num_mel_bins + 1)
    b = np.arange(num_mel_bins, dtype=np.float64)[:, None]
    # float32 like torchaudio's get_mel_banks (and Kaldi's C++): the same filters to the last bit that matters
    left = (lo + b * delta).astype(np.float32)
    centre = (lo + (b + 1.0) * delta).astype(np.float32)
    right = (lo + (b + 2.0) * delta).astype(np.float32)
    mel = _mel(np.arange(n_fft // 2, dtype=np.float32) * np.float32(sample_rate / n_fft)).astype(np.float32)[None]
    up = (mel - left) / (centre - left)
    down = (right - mel) / (right - centre)
    filters = np.maximum(np.float32(0), np.minimum(up, down))
    out = np.zeros((num_mel_bins, n_fft // 2 + 1), dtype=np.float32)
    out[:, : n_fft // 2] = filters
    out.setflags(write=False)
    return out


def empty_mel_bins(num_mel_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE,
                   frame_length_ms: float = FRAME_LENGTH_MS) -> tuple[int, ...]:
    """The mel filters that cover no FFT bin (their log energy is always ``log(FLT_EPSILON)``): ``(3,)`` for
    CAV-MAE's 128 bins at 16 kHz."""
    n_fft = _n_fft(int(sample_rate * frame_length_ms / 1000))
    return tuple(int(i) for i in np.flatnonzero((mel_filters(num_mel_bins, n_fft, sample_rate) > 0).sum(1) == 0))


def _n_fft(window: int) -> int:
    return 1 << max(int(window) - 1, 1).bit_length()


def num_frames(n_samples: int, sample_rate: int = SAMPLE_RATE, frame_shift_ms: float = FRAME_SHIFT_MS,
               frame_length_ms: float = FRAME_LENGTH_MS) -> int:
    """Kaldi's frame count with ``snip_edges``: ``1 + (n - window) // shift`` (0 if shorter than a window)."""
    window = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    return 0 if n_samples < window else 1 + (n_samples - window) // shift


def as_waveform(waveform, what: str = "waveform") -> np.ndarray:
    """A mono float waveform as a 1-D array ([1, N] and [N, 1] are squeezed); a UserError for anything else."""
    w = np.asarray(waveform)
    if w.ndim == 2 and 1 in w.shape:
        w = w.reshape(-1)
    if w.ndim != 1:
        raise UserError(f"{what} must be mono, 1-D [samples]; got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise UserError(f"{what} must be float samples in [-1, 1] (as torchaudio.load returns), got {w.dtype}")
    if not np.isfinite(w).all():
        raise UserError(f"{what} has NaN or infinite samples")
    return w


def fbank(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS,
          frame_shift_ms: float = FRAME_SHIFT_MS, frame_length_ms: float = FRAME_LENGTH_MS) -> np.ndarray:
    """CAV-MAE's log-mel filterbank of a mono float waveform in [-1, 1]: float32 ``[frames, num_mel_bins]``.

    The waveform's mean is subtracted first, as CAV-MAE does before ``torchaudio.compliance.kaldi.fbank``;
    the rest is that function with CAV-MAE's options, in float32 as torchaudio computes it."""
    w = as_waveform(waveform).astype(np.float32)
    window = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    if window < 2 or shift < 1:
        raise UserError(f"frames of {frame_length_ms:g} ms every {frame_shift_ms:g} ms at {sample_rate} Hz are "
                        "too short")
    n = num_frames(len(w), sample_rate, frame_shift_ms, frame_length_ms)
    if n == 0:
        raise UserError(f"waveform of {len(w)} samples is shorter than one {frame_length_ms:g} ms frame "
                        f"at {sample_rate} Hz")
    w = w - w.mean(dtype=np.float32)
    frames = np.lib.stride_tricks.as_strided(w, (n, window), (shift * w.strides[0], w.strides[0])).copy()
    frames -= frames.mean(axis=1, keepdims=True, dtype=np.float32)              # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)          # x[-1] := x[0], as Kaldi
    frames -= np.float32(PREEMPHASIS) * previous
    frames *= _hann(window)
    n_fft = _n_fft(window)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)).astype(np.float32) ** 2  # zero-padded to n_fft
    energies = power @ mel_filters(int(num_mel_bins), n_fft, int(sample_rate)).T
    return np.log(np.maximum(energies, FLT_EPSILON)).astype(np.float32, copy=False)


@lru_cache(maxsize=8)
def _hann(window: int) -> np.ndarray:
    """The symmetric Hann window Kaldi calls ``hanning`` (``torch.hann_window(periodic=False)``)."""
    i = np.arange(window, dtype=np.float64)
    out = (0.5 - 0.5 * np.cos(2.0 * np.pi * i / (window - 1))).astype(np.float32)
    out.setflags(write=False)
    return out


def pad_or_crop(fb: np.ndarray, target_length: int = TARGET_LENGTH) -> np.ndarray:
    """Zero-pad at the end or crop the end to ``target_length`` frames (CAV-MAE's ``ZeroPad2d`` / slice)."""
    fb = np.asarray(fb)
    if fb.ndim != 2:
        raise UserError(f"filterbank must be [frames, bins], got shape {fb.shape}")
    if int(target_length) < 1:
        raise UserError(f"target_length must be a positive number of frames, got {target_length}")
    p = int(target_length) - fb.shape[0]
    if p > 0:
        return np.concatenate([fb, np.zeros((p, fb.shape[1]), dtype=fb.dtype)])
    return fb[:target_length]


def normalise(fb: np.ndarray, mean: float = CAVMAE_MEAN, std: float = CAVMAE_STD) -> np.ndarray:
    """CAV-MAE's input normalisation ``(fbank - mean) / std`` (``src/dataloader.py``; no factor 2, unlike AST)."""
    if not std > 0:
        raise UserError(f"normalisation std must be positive, got {std}")
    return ((np.asarray(fb, dtype=np.float32) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def features(waveforms: np.ndarray | Sequence[np.ndarray], target_length: int = TARGET_LENGTH,
             mean: float = CAVMAE_MEAN, std: float = CAVMAE_STD, sample_rate: int = SAMPLE_RATE,
             num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
    """CAV-MAE's audio input for a batch: float32 ``[B, target_length, num_mel_bins]``.

    ``waveforms`` is a float ``[B, N]`` array or a sequence of 1-D waveforms (lengths may differ); each is
    filterbanked, padded / cropped, then normalised — CAV-MAE's order, so padded frames become ``-mean/std``."""
    if isinstance(waveforms, np.ndarray):
        if waveforms.ndim != 2:
            raise UserError(f"waveforms must be a batch [B, samples], got shape {waveforms.shape}")
        items = list(waveforms)
    else:
        items = list(waveforms)
    out = np.empty((len(items), int(target_length), int(num_mel_bins)), dtype=np.float32)
    for k, w in enumerate(items):
        fb = fbank(as_waveform(w, f"waveform {k}"), sample_rate, num_mel_bins)
        out[k] = normalise(pad_or_crop(fb, target_length), mean, std)
    return out


def norm_stats(dataset: str) -> tuple[float, float]:
    """The ``(mean, std)`` CAV-MAE / READ normalise ``dataset``'s filterbanks with."""
    try:
        return NORM_STATS[dataset]
    except KeyError:
        raise UserError(f"no audio normalisation constants for {dataset!r}; known: {', '.join(NORM_STATS)}") from None
