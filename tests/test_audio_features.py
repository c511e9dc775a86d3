import numpy as np
import pytest

from qshift.data import audio_features as af
from qshift.errors import UserError

SR = af.SAMPLE_RATE


def _pinned_signal() -> np.ndarray:
    """1 s of 40 fixed sinusoids (50 + 193k Hz) under a 2 Hz tremolo: broadband, no random generator."""
    t = np.arange(SR) / SR
    k = np.arange(1, 41)[:, None]
    x = (0.02 * np.sin(2 * np.pi * (50 + 193 * k) * t + 0.7 * k ** 2) / np.sqrt(k)).sum(0)
    return (x * (0.6 + 0.4 * np.cos(2 * np.pi * 2 * t))).astype(np.float32)


#: torchaudio 2.9.1's ``compliance.kaldi.fbank`` with CAV-MAE's options on :func:`_pinned_signal` (computed once
#: with torchaudio's kaldi.py under torch 2.14, see docs/audio.md), frames x bins below
PINNED_FRAMES, PINNED_BINS = [0, 25, 50, 97], [0, 10, 30, 45, 64, 90, 110, 127]
PINNED_TORCHAUDIO = np.array([
    [-13.42608, -6.34693, -3.16773, -2.97176, -2.31419, -1.29511, -0.40042, -0.79936],
    [-15.85608, -9.52491, -6.31936, -6.12740, -5.47422, -4.45210, -3.55721, -3.95538],
    [-13.36378, -6.34916, -3.16238, -2.96618, -2.31346, -1.29458, -0.40167, -0.79929],
    [-14.02190, -6.36447, -3.17516, -2.98030, -2.32657, -1.30564, -0.41095, -0.80898],
])
PINNED_TORCHAUDIO_MEAN = -5.1568956


def test_pinned_values_match_torchaudio():
    fb = af.fbank(_pinned_signal())
    assert fb.shape == (98, 128) and fb.dtype == np.float32
    np.testing.assert_allclose(fb[np.ix_(PINNED_FRAMES, PINNED_BINS)], PINNED_TORCHAUDIO, atol=1e-3)
    assert abs(float(fb.mean()) - PINNED_TORCHAUDIO_MEAN) < 1e-3


@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 160000, 163840])
def test_frame_count_is_kaldis_snip_edges_formula(n):
    x = 0.1 * np.sin(np.arange(n) * 0.3).astype(np.float32)
    assert af.fbank(x).shape == (1 + (n - 400) // 160, 128)
    assert af.num_frames(n) == 1 + (n - 400) // 160


def test_too_short_waveform_is_a_user_error():
    assert af.num_frames(399) == 0
    with pytest.raises(UserError, match="shorter than one"):
        af.fbank(np.zeros(399, np.float32))


def _centre_hz(num_bins=128, low=20.0, high=SR / 2):
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(high)
    c = lo + (np.arange(num_bins) + 1.0) * (hi - lo) / (num_bins + 1)
    return 700.0 * (np.exp(c / 1127.0) - 1.0)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0, 6000.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    t = np.arange(SR) / SR
    fb = af.fbank((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
    peak = int(np.bincount(fb.argmax(axis=1)).argmax())
    assert abs(peak - int(np.abs(_centre_hz() - freq).argmin())) <= 1


def test_silence_and_the_empty_mel_bin_sit_at_the_log_floor():
    assert af.empty_mel_bins() == (3,)  # 128 bins, 16 kHz, 512-point FFT: the 4th filter covers no FFT bin
    silent = af.fbank(np.zeros(SR, np.float32))
    np.testing.assert_array_equal(silent, np.float32(af.EMPTY_BIN_LOG))
    dc = af.fbank(np.full(SR, 0.3, np.float32))  # the mean is subtracted first: a constant is silence
    np.testing.assert_array_equal(dc, silent)
    noisy = af.fbank((0.1 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32))
    np.testing.assert_array_equal(noisy[:, 3], np.float32(af.EMPTY_BIN_LOG))
    assert (noisy[:, 4:] > af.EMPTY_BIN_LOG + 1).all()  # (bins 0–2 hold one FFT bin each, near DC)
    assert af.empty_mel_bins(80) == ()


def test_fbank_is_deterministic_and_scale_is_minus_one_to_one():
    x = (0.1 * np.random.default_rng(1).standard_normal(SR)).astype(np.float32)
    np.testing.assert_array_equal(af.fbank(x), af.fbank(x.copy()))
    np.testing.assert_array_equal(af.fbank(x), af.fbank(x.astype(np.float64)))
    # twice the amplitude is +log(4) in every (non-empty) bin: power, natural log, no int16 rescaling
    diff = np.delete(af.fbank(2 * x) - af.fbank(x), 3, axis=1)
    np.testing.assert_allclose(diff, np.log(4.0), atol=1e-3)
    # CAV-MAE's normalisation constants assume [-1, 1] input: white noise at -20 dBFS lands near the mean
    assert -9.0 < float(af.fbank(x).mean()) < 0.0


def test_matches_kaldi_native_fbank_where_it_accepts_the_bin_count():
    knf = pytest.importorskip("kaldi_native_fbank")
    x = (0.1 * np.random.default_rng(2).standard_normal(2 * SR)).astype(np.float32)

    def reference(num_bins):
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        opts.mel_opts.num_bins = num_bins
        opts.use_energy = False
        opts.htk_compat = True
        e = knf.OnlineFbank(opts)
        e.accept_waveform(float(SR), x - x.mean())
        e.input_finished()
        return np.stack([e.get_frame(i) for i in range(e.num_frames_ready)])

    for bins in (64, 80):
        ours, theirs = af.fbank(x, num_mel_bins=bins), reference(bins)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() < 2e-2 and np.abs(ours - theirs).mean() < 1e-4
    with pytest.raises(Exception, match="num_mel_bins too large"):  # why qshift does not use it for CAV-MAE
        reference(128)


def test_pad_or_crop_at_the_end():
    fb = np.arange(12, dtype=np.float32).reshape(4, 3)
    padded = af.pad_or_crop(fb, 6)
    np.testing.assert_array_equal(padded[:4], fb)
    np.testing.assert_array_equal(padded[4:], 0)
    np.testing.assert_array_equal(af.pad_or_crop(fb, 2), fb[:2])
    np.testing.assert_array_equal(af.pad_or_crop(fb, 4), fb)
    with pytest.raises(UserError):
        af.pad_or_crop(fb, 0)


def test_normalise_and_constants():
    fb = np.array([[af.CAVMAE_MEAN, af.CAVMAE_MEAN + af.CAVMAE_STD]], np.float32)
    np.testing.assert_allclose(af.normalise(fb), [[0.0, 1.0]], atol=1e-6)
    assert (af.CAVMAE_MEAN, af.CAVMAE_STD) == (-5.081, 4.4849)
    assert af.norm_stats("vggsound") == af.norm_stats("kinetics_sounds") == af.norm_stats("audioset")
    with pytest.raises(UserError, match="known"):
        af.norm_stats("esc50")
    with pytest.raises(UserError):
        af.normalise(fb, 0.0, 0.0)


def test_features_batch():
    rng = np.random.default_rng(3)
    batch = (0.1 * rng.standard_normal((2, 3 * SR))).astype(np.float32)
    out = af.features(batch, target_length=400)
    assert out.shape == (2, 400, 128) and out.dtype == np.float32
    n = af.num_frames(3 * SR)
    np.testing.assert_allclose(out[1, :n], af.normalise(af.fbank(batch[1])), atol=1e-6)
    np.testing.assert_allclose(out[:, n:], -af.CAVMAE_MEAN / af.CAVMAE_STD, atol=1e-6)  # padded, then normalised
    ragged = af.features([batch[0], batch[1, :SR]], target_length=50)
    assert ragged.shape == (2, 50, 128)
    np.testing.assert_array_equal(ragged[0], out[0, :50])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 2, SR), np.float32), "batch"),
    (np.zeros(SR, np.int16)[None].repeat(2, 0), "float"),
    (np.full((1, SR), np.nan, np.float32), "NaN"),
])
def test_features_rejects_bad_input(bad, match):
    with pytest.raises(UserError, match=match):
        af.features(bad)


def test_fbank_rejects_stereo():
    with pytest.raises(UserError, match="mono"):
        af.fbank(np.zeros((2, SR), np.float32))
