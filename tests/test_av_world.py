"""The embedded audio–video world (qshift.data.av_world)."""
from dataclasses import replace

import numpy as np
import pytest

from qshift.data import av_world as aw
from qshift.data.world import COLOURS, SHAPES, Background
from qshift.data.world_render import DOMAINS, render_scene_at
from qshift.errors import UserError

BG = Background(base=(150, 150, 150), gradient_angle=0.0, gradient_strength=0.0, grain=1.0)


def scene(*objects, noise_seed=5):
    return aw.AVScene(objects=tuple(objects), background=BG, noise_seed=noise_seed)


def spectrum(audio):
    """Magnitude spectrum (1 Hz bins over a 1 s track) of the track's steady middle."""
    x = audio[2000:-2000].astype(np.float64)
    mag = np.abs(np.fft.rfft(x * np.hanning(x.size), n=aw.SAMPLE_RATE))
    return mag


def peak_near(mag, f, tol=0.03):
    lo, hi = int(f * (1 - tol)), int(f * (1 + tol)) + 1
    return mag[lo:hi].max()


@pytest.fixture(scope="module")
def small():
    return aw.generate_av_world(7, 40)


def test_deterministic_by_seed(small):
    again = aw.generate_av_world(7, 40)
    assert again.scenes == small.scenes and again.fingerprint() == small.fingerprint()
    rows = [0, 3, 11]
    assert np.array_equal(again.videos(rows), small.videos(rows))
    assert np.array_equal(again.audios(rows), small.audios(rows))
    other = aw.generate_av_world(8, 40)
    assert other.scenes != small.scenes and other.fingerprint() != small.fingerprint()
    assert not np.array_equal(other.videos(rows), small.videos(rows))
    assert not np.array_equal(other.audios(rows), small.audios(rows))


def test_prefix_and_blocks():
    assert aw.generate_av_world(7, 10).scenes == aw.generate_av_world(7, 60).scenes[:10]
    blocked = aw.generate_av_world(9, 300, unique_block=100)
    assert blocked.scenes[:100] == aw.generate_av_world(9, 100).scenes
    for b in range(3):
        keys = [s.av_key for s in blocked.scenes[100 * b:100 * (b + 1)]]
        assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", ["val", "test"])
def test_keys_unique_in_fixed_splits(name):
    split = aw.load_av_split(name)
    assert len(split) == aw.AV_SPLITS[name]["n_clips"] and split.seed == aw.AV_SPLITS[name]["seed"]
    keys = [s.av_key for s in split.scenes]
    assert len(set(keys)) == len(keys)
    assert aw.load_av_split(name) is split  # cached per process
    assert np.array_equal(split.ids, np.arange(len(split)))
    counts = np.bincount([len(s.objects) for s in split.scenes])
    assert counts[1] > 0 and counts[2] > 0
    motions = {o.motion for s in split.scenes for o in s.objects}
    assert motions == set(aw.MOTIONS)


def test_shapes_dtypes_ranges(small):
    for domain in DOMAINS:
        v = small.videos([1, 2], domain=domain)
        assert v.shape == (2, aw.FRAMES, aw.VIDEO_SIZE, aw.VIDEO_SIZE, 3) and v.dtype == np.uint8
    a = small.audios()
    assert a.shape == (len(small), aw.AUDIO_SAMPLES) and a.dtype == np.float32
    assert aw.AUDIO_SAMPLES == int(aw.SAMPLE_RATE * aw.DURATION) == 16_000
    assert np.abs(a).max() <= 1.0 and np.isfinite(a).all()
    assert (np.sqrt((a ** 2).mean(1)) > 0.01).all()  # never silent
    assert small.videos([]).shape == (0, aw.FRAMES, aw.VIDEO_SIZE, aw.VIDEO_SIZE, 3)


def test_frames_are_the_image_worlds_renders(small):
    """Each frame is render_scene_at of the scene at that frame's time, in every domain."""
    picks = [next(s for s in small.scenes if any(o.shape == "crescent" for o in s.objects)), small.scenes[0]]
    for domain in DOMAINS:
        for s in picks:
            clip = aw.render_clip(s, aw.VIDEO_SIZE, domain)
            ref = np.stack([render_scene_at(s.frame_scene(k), aw.VIDEO_SIZE, domain) for k in range(aw.FRAMES)])
            assert np.array_equal(clip, ref), domain


def test_moving_objects_move_static_ones_do_not():
    still = scene(aw.make_av_object("star", "red", "large", 48, 48))
    moving = scene(aw.make_av_object("star", "red", "large", 30, 48, "left-right", "slow"))
    circling = scene(aw.make_av_object("star", "red", "large", 48, 48, "circle", "fast", 0.0, orbit=10.0))
    v = aw.render_clip(still)
    assert all(np.array_equal(v[0], f) for f in v[1:])
    for s in (moving, circling):
        v = aw.render_clip(s).astype(np.int16)
        assert all(np.abs(v[k + 1] - v[k]).max() > 50 for k in range(aw.FRAMES - 1))
    # the left-right mover heads right: its colour's centre of mass moves right, frame after frame
    v = aw.render_clip(moving).astype(np.float64)
    redness = np.clip(v[..., 0] - v[..., 1], 0, None)
    xs = (redness.sum(1) * np.arange(aw.VIDEO_SIZE)).sum(1) / redness.sum((1, 2))
    assert np.all(np.diff(xs) > 0)


def test_bounce_is_in_latent_and_key():
    o = aw.make_av_object("circle", "blue", "small", 70, 40, "left-right", "fast")  # hits the right wall first
    lo, hi = o.walls()
    assert o.bounces and abs(o.bounces[0] - (hi - 70) / aw.LINEAR_SPEED["fast"]) < 1e-9
    pos = o.positions(np.array([o.bounces[0] - 1e-3, o.bounces[0], o.bounces[0] + 1e-3]))
    assert abs(pos[1, 0] - hi) < 1e-9 and pos[0, 0] < hi and pos[2, 0] < hi
    assert o.bounce_frames() == (int(o.bounces[0] * aw.FRAMES / aw.DURATION),)
    assert o.key[-1] == o.bounce_frames()
    pos = o.positions(np.linspace(0, 1, 500))
    assert pos[:, 0].min() >= lo - 1e-9 and pos[:, 0].max() <= hi + 1e-9
    assert aw.make_av_object("circle", "blue", "small", 48, 48, "circle", "fast", orbit=12.0).bounces == ()


def test_colour_sets_the_pitch():
    a, b = (aw.synthesise(scene(aw.make_av_object("circle", c, "small", 48, 48))) for c in ("red", "green"))
    fa, fb = (int(np.argmax(spectrum(x))) for x in (a, b))
    assert abs(fa - aw.fundamental("red", "small")) < 3 and abs(fb - aw.fundamental("green", "small")) < 3
    assert fb > fa * 1.1
    # every colour and size has its own fundamental, at least a semitone from any other
    fs = sorted(aw.fundamental(c, s) for c in COLOURS for s in ("small", "large"))
    assert min(np.diff(np.log2(fs)) * 12) >= 1.0


def test_size_sets_octave_and_loudness():
    small_, large = (aw.synthesise(scene(aw.make_av_object("circle", "red", s, 48, 48))) for s in ("small", "large"))
    assert abs(int(np.argmax(spectrum(large))) - aw.fundamental("red", "large")) < 3
    assert np.sqrt((large ** 2).mean()) > 1.5 * np.sqrt((small_ ** 2).mean())


def test_shape_sets_the_harmonic_profile():
    # the spectrum's peaks relative to the fundamental's, at every ratio any timbre uses
    ratios = sorted({r for partials in aw.TIMBRES.values() for r, _ in partials})

    def profile(shape):
        audio = aw.synthesise(scene(aw.make_av_object(shape, "orange", "large", 48, 48)))
        mag, f0 = spectrum(audio), aw.fundamental("orange", "large")
        return np.array([peak_near(mag, r * f0, 0.01) for r in ratios]) / peak_near(mag, f0, 0.01)

    profiles = {s: profile(s) for s in SHAPES}
    assert profiles["circle"][1:].max() < 0.02  # a pure tone
    square = dict(zip(ratios, profiles["square"]))
    assert square[3] > 0.25 and square[2] < 0.02  # odd harmonics only
    for i, s in enumerate(SHAPES):
        for t in SHAPES[i + 1:]:
            assert np.abs(profiles[s] - profiles[t]).max() > 0.1, (s, t)


def test_bounce_makes_an_onset_near_its_frame():
    o = aw.make_av_object("square", "pink", "large", 50, 48, "left-right", "slow")  # bounces once, mid-clip
    (b,) = o.bounces
    (k,) = o.bounce_frames()
    audio = aw.synthesise(scene(o)).astype(np.float64)
    # broadband onset strength: energy of the signal's first difference in 5 ms windows
    hop = aw.SAMPLE_RATE // 200
    energy = (np.diff(audio)[:aw.AUDIO_SAMPLES - hop] ** 2).reshape(-1, hop).sum(1)
    jump = energy[1:] / (energy[:-1] + 1e-12)
    at = (int(np.argmax(jump[2:-2])) + 3) * hop / aw.SAMPLE_RATE  # the window where the jump lands
    assert jump[2:-2].max() > 5
    assert abs(at - b) < 0.01
    assert k * aw.DURATION / aw.FRAMES <= at < (k + 1) * aw.DURATION / aw.FRAMES + 0.01
    # the same object without walls to hit has no such jump
    calm = aw.synthesise(scene(replace(o, bounces=()))).astype(np.float64)
    e2 = (np.diff(calm)[:aw.AUDIO_SAMPLES - hop] ** 2).reshape(-1, hop).sum(1)
    assert (e2[1:] / (e2[:-1] + 1e-12))[2:-2].max() < 2


def test_loudness_follows_horizontal_position():
    o = aw.make_av_object("circle", "yellow", "small", 13, 48, "left-right", "fast")  # heads right all clip
    assert o.bounces == ()
    audio = aw.synthesise(scene(o)).astype(np.float64)
    rms = np.sqrt((audio[:aw.AUDIO_SAMPLES // 4] ** 2).mean()), np.sqrt((audio[-aw.AUDIO_SAMPLES // 4:] ** 2).mean())
    assert rms[1] > 1.5 * rms[0]


def test_two_objects_mix_without_clipping(small):
    two = [s for s in small.scenes if len(s.objects) == 2]
    assert two
    for s in two[:5]:
        a = aw.synthesise(s)
        assert np.abs(a).max() < 0.95
        alone = [aw.synthesise(replace(s, objects=(o,))) for o in s.objects]
        assert np.corrcoef(a, alone[0] + alone[1])[0, 1] > 0.99


def test_objects_never_touch(small):
    t = np.linspace(0, aw.DURATION, 4 * aw.FRAMES + 1)
    for s in small.scenes:
        if len(s.objects) == 2:
            p, q = (o.positions(t) for o in s.objects)
            assert np.hypot(*(p - q).T).min() > s.objects[0].radius + s.objects[1].radius


def test_bad_arguments(small):
    for n in (0, -3, 2.5, True):
        with pytest.raises(UserError):
            aw.generate_av_world(1, n)
    with pytest.raises(UserError):
        aw.generate_av_world(1, 10, unique_block=0)
    with pytest.raises(UserError, match="unknown AV world split"):
        aw.load_av_split("nope")
    with pytest.raises(UserError, match="unknown render domain"):
        small.videos([0], domain="nope")
    with pytest.raises(UserError, match="out of range"):
        small.videos([len(small)])
    with pytest.raises(UserError):
        small.audios([-1])
    with pytest.raises(UserError):
        small.subset(0)
    with pytest.raises(UserError):
        aw.sample_av_scene(np.random.default_rng(0), n_objects=3)
    with pytest.raises(UserError, match="unknown motion"):
        aw.make_av_object("circle", "red", "small", 48, 48, "zigzag", "slow")
    with pytest.raises(UserError):
        aw.make_av_object("circle", "red", "small", 48, 48, "left-right")  # a mover needs a speed
    with pytest.raises(UserError):
        aw.make_av_object("circle", "red", "small", 2, 48)  # outside the walls
    with pytest.raises(UserError):
        aw.make_av_object("circle", "red", "large", 25, 48, "circle", "slow", 0.0, orbit=16.0)  # orbit too big


def test_subset_and_fingerprint(small):
    sub = small.subset(10)
    assert len(sub) == 10 and sub.scenes == small.scenes[:10]
    assert sub.fingerprint() != small.fingerprint()
    assert small.fingerprint() == aw.generate_av_world(7, 40).fingerprint()
