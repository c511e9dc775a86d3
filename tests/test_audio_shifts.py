import numpy as np
import pytest

from qshift.errors import UserError
from qshift.shifts import audio as A
from qshift.shifts.audio_noises import NOISE_PEAK, NOISE_RMS, synthesise_noise

SR = 16000


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """4 s of a quiet two-tone signal, float32 in [-1, 1]."""
    t = np.arange(4 * SR) / SR
    return (0.1 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)


def _centroid(x: np.ndarray) -> float:
    p = np.abs(np.fft.rfft(x)) ** 2
    return float((p * np.fft.rfftfreq(len(x), 1 / SR)).sum() / p.sum())


def _kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    return float(np.mean(x ** 4) / np.mean(x ** 2) ** 2)


def _envelope_cv(x: np.ndarray) -> float:
    """How much the 50 ms RMS varies (std / mean)."""
    r = np.sqrt((x[: len(x) // 800 * 800].reshape(-1, 800) ** 2).mean(1))
    return float(r.std() / r.mean())


def _band_fraction(x: np.ndarray, lo: float, hi: float) -> float:
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(p[(f >= lo) & (f < hi)].sum() / p.sum())


def test_read_schedules():
    assert A.AUDIO_CORRUPTIONS == ("gaussian_noise", "traffic", "crowd", "rain", "thunder", "wind")
    assert A.SEVERITIES == (1, 2, 3, 4, 5)
    assert A.GAUSSIAN_NOISE_STD == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert A.NOISE_GAIN_DB == (1, 2, 4, 6, 8)


@pytest.mark.parametrize("name", A.AUDIO_CORRUPTIONS)
def test_every_corruption_keeps_length_dtype_and_is_deterministic(clip, name):
    a = A.corrupt_audio(clip, name, 3, item_id=7)
    b = A.corrupt_audio(clip.copy(), name, 3, item_id=7)
    assert a.shape == clip.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and np.abs(a).max() <= 1.0
    assert np.sqrt(np.mean((a - clip) ** 2)) > 0.01
    d = A.corrupt_audio(clip.astype(np.float64), name, 3, item_id=7)
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, a, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian_noise", "rain"])
def test_seed_and_item_change_the_noise_but_not_the_batch_position(clip, name):
    base = A.corrupt_audio(clip, name, 2, item_id=11)
    assert not np.array_equal(base, A.corrupt_audio(clip, name, 2, item_id=12))
    assert not np.array_equal(base, A.corrupt_audio(clip, name, 2, item_id=11, seed=1))
    batch = A.corrupt_audio_batch(np.stack([clip, clip, clip]), name, 2, item_ids=[10, 11, 12])
    assert batch.shape == (3, len(clip)) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], base)
    listed = A.corrupt_audio_batch([clip, clip[: SR]], name, 2, item_ids=[11, 3])
    assert isinstance(listed, list) and len(listed[1]) == SR
    np.testing.assert_array_equal(listed[0], base)


def test_numpy_global_random_state_is_untouched(clip):
    state = np.random.get_state()
    A.corrupt_audio(clip, "gaussian_noise", 5, item_id=1)
    A.corrupt_audio(clip, "wind", 5, item_id=1)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


@pytest.mark.parametrize("name", A.AUDIO_CORRUPTIONS)
def test_severity_makes_it_worse(clip, name):
    """The added noise's energy grows, and the SNR falls, with every severity step."""
    noise = [np.mean((A.corrupt_audio(clip, name, s, item_id=5) - clip) ** 2) for s in A.SEVERITIES]
    assert all(b > a for a, b in zip(noise, noise[1:])), noise
    snr = [10 * np.log10(np.mean(clip ** 2) / n) for n in noise]
    assert snr[0] > snr[-1] + 4.0


def test_gaussian_noise_has_reads_std():
    silence = np.zeros(8 * SR, np.float32)
    for s in (1, 2, 3):  # little clipping below std 0.26
        std = A.corrupt_audio(silence, "gaussian_noise", s, item_id=0).std()
        assert abs(std / A.GAUSSIAN_NOISE_STD[s - 1] - 1) < 0.02


def test_environmental_noise_follows_the_gain_in_db_on_the_same_stretch():
    silence = np.zeros(4 * SR, np.float32)
    one, five = (A.corrupt_audio(silence, "wind", s, item_id=3) for s in (1, 5))
    # the same stretch of the same noise, louder by 8 - 1 dB (wind never reaches the clipping level here)
    assert np.abs(five).max() < 1.0
    np.testing.assert_allclose(five, one * 10 ** (7 / 20), rtol=1e-4, atol=1e-6)
    rms = np.sqrt(np.mean(one.astype(np.float64) ** 2))
    assert 0.5 * NOISE_RMS < rms / 10 ** (1 / 20) < 1.5 * NOISE_RMS


def test_mix_is_clipped():
    loud = np.full(SR, 0.95, np.float32)
    out = A.corrupt_audio(loud, "gaussian_noise", 5, item_id=0)
    assert out.max() == 1.0 and out.min() >= -1.0


@pytest.mark.parametrize("kind", A.ENVIRONMENTAL_NOISES)
def test_synthesise_noise_level_determinism_and_lengths(kind):
    x = synthesise_noise(kind, 2 * SR, SR, np.random.default_rng(4))
    assert x.shape == (2 * SR,) and x.dtype == np.float32 and np.isfinite(x).all()
    rms, peak = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), float(np.abs(x).max())
    assert rms < NOISE_RMS + 1e-4 and peak < NOISE_PEAK + 1e-4  # -20 dBFS RMS unless the peak passes -1 dBFS
    assert abs(rms - NOISE_RMS) < 1e-4 or abs(peak - NOISE_PEAK) < 1e-4
    assert abs(float(x.mean())) < 1e-4
    np.testing.assert_array_equal(x, synthesise_noise(kind, 2 * SR, SR, 4))
    assert not np.array_equal(x, synthesise_noise(kind, 2 * SR, SR, 5))
    assert synthesise_noise(kind, 0, SR, 0).shape == (0,)
    assert np.isfinite(synthesise_noise(kind, 100, SR, 0)).all()


@pytest.fixture(scope="module")
def noises() -> dict[str, list[np.ndarray]]:
    return {k: [synthesise_noise(k, 10 * SR, SR, s) for s in (0, 1)] for k in A.ENVIRONMENTAL_NOISES}


def test_each_noise_has_its_character(noises):
    for x in noises["traffic"]:  # low rumble, stationary-ish, swelling as vehicles pass
        assert _centroid(x) < 400 and _kurtosis(x) < 7 and _envelope_cv(x) > 0.15
    for x in noises["crowd"]:  # voices: energy in the speech band, many of them: near-Gaussian
        assert 500 < _centroid(x) < 1500 and _band_fraction(x, 150, 4000) > 0.85 and _kurtosis(x) < 5
    for x in noises["rain"]:  # high-frequency, impulsive droplets
        assert _centroid(x) > 3000 and _band_fraction(x, 1000, SR / 2) > 0.85 and _kurtosis(x) > 9
    for x in noises["thunder"]:  # low, impulsive (crack) and far from stationary (decaying rumble)
        assert _centroid(x) < 450 and _kurtosis(x) > 9 and _envelope_cv(x) > 0.6
    for x in noises["wind"]:  # band-passed, stationary-ish, gusting
        assert _centroid(x) < 400 and _band_fraction(x, 30, 1500) > 0.95 and _kurtosis(x) < 7
        assert _envelope_cv(x) > 0.2
    for impulsive in ("rain", "thunder"):
        for steady in ("traffic", "crowd", "wind"):
            assert min(map(_kurtosis, noises[impulsive])) > max(map(_kurtosis, noises[steady]))


def test_thunder_cracks_then_rumbles(noises):
    for x in noises["thunder"]:
        x = x.astype(np.float64)
        r = np.sqrt((x[: len(x) // 160 * 160].reshape(-1, 160) ** 2).mean(1))  # 10 ms frames
        onset = int(np.flatnonzero(r > 0.3 * r.max())[0])
        crack = x[onset * 160:(onset + 3) * 160]
        tail = x[onset * 160 + SR // 2:onset * 160 + 3 * SR // 2]  # 0.5–1.5 s later
        assert _centroid(crack) > 4 * _centroid(tail)  # a bright crack, then a low rumble ...
        assert np.sqrt(np.mean(tail ** 2)) > 10 * np.percentile(r, 5)  # ... that lasts well above the floor


def _write_wav(path, data, sr):
    sf = pytest.importorskip("soundfile")
    sf.write(str(path), data, sr)


def test_noise_dir_replaces_the_procedural_noise(tmp_path):
    sr_file = 8000
    t = np.arange(sr_file // 2) / sr_file  # 0.5 s, shorter than the clip: looped
    left = 0.2 * np.sin(2 * np.pi * 500 * t)
    right = 0.2 * np.sin(2 * np.pi * 1500 * t)
    _write_wav(tmp_path / "traffic.wav", np.stack([left, right], axis=1), sr_file)
    silence = np.zeros(2 * SR, np.float32)
    out = A.corrupt_audio(silence, "traffic", 1, item_id=0, noise_dir=tmp_path)
    assert out.shape == silence.shape and out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(len(out), 1 / SR)
    assert abs(freqs[spectrum.argmax()] - 500) < 2  # the first channel, resampled to 16 kHz
    assert spectrum[np.abs(freqs - 1500) < 5].max() < 1e-2 * spectrum.max()
    assert abs(np.abs(out).max() - 0.2 * 10 ** (1 / 20)) < 5e-3  # the file's own level, +1 dB
    # a random offset per item, the same stretch for every severity of that item
    other = A.corrupt_audio(silence, "traffic", 1, item_id=1, noise_dir=tmp_path)
    assert not np.allclose(out, other)
    np.testing.assert_allclose(A.corrupt_audio(silence, "traffic", 3, item_id=0, noise_dir=tmp_path),
                               out * 10 ** (3 / 20), rtol=1e-4, atol=1e-6)
    assert A.noise_source(tmp_path).startswith("files:") and A.noise_source() == A.SYNTHESIS_VERSION
    # gaussian noise never reads the folder
    np.testing.assert_array_equal(A.corrupt_audio(silence, "gaussian_noise", 1, 0, noise_dir=tmp_path),
                                  A.corrupt_audio(silence, "gaussian_noise", 1, 0))


def test_noise_dir_errors(tmp_path, clip):
    with pytest.raises(UserError, match="no rain.wav"):
        A.corrupt_audio(clip, "rain", 1, 0, noise_dir=tmp_path)
    (tmp_path / "rain.wav").write_text("not audio")
    with pytest.raises(UserError, match="cannot read noise file"):
        A.corrupt_audio(clip, "rain", 1, 0, noise_dir=tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        A.corrupt_audio(clip, "rain", 1, 0, noise_dir=tmp_path / "missing")
    _write_wav(tmp_path / "wind.wav", np.zeros((0, 1)), SR)
    with pytest.raises(UserError, match="no samples"):
        A.corrupt_audio(clip, "wind", 1, 0, noise_dir=tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"corruption": "snow"}, "unknown audio corruption"),
    ({"severity": 0}, "severity"),
    ({"severity": 6}, "severity"),
    ({"waveform": np.zeros(SR, np.int16)}, "float"),
    ({"waveform": np.zeros((2, SR), np.float32)}, "mono"),
    ({"waveform": np.full(SR, np.nan, np.float32)}, "NaN"),
])
def test_user_errors(clip, kwargs, match):
    args = {"waveform": clip, "corruption": "gaussian_noise", "severity": 1, "item_id": 0} | kwargs
    with pytest.raises(UserError, match=match):
        A.corrupt_audio(**args)


def test_batch_errors_and_empty_waveform(clip):
    with pytest.raises(UserError, match="item ids"):
        A.corrupt_audio_batch(np.stack([clip, clip]), "wind", 1, item_ids=[0])
    with pytest.raises(UserError, match="batch"):
        A.corrupt_audio_batch(clip, "wind", 1, item_ids=[0])
    with pytest.raises(UserError, match="unknown environmental noise"):
        synthesise_noise("hail", SR, SR, 0)
    empty = A.corrupt_audio(np.zeros(0, np.float32), "rain", 1, 0)
    assert empty.shape == (0,) and empty.dtype == np.float32
