"""Video query shifts (qshift.shifts.video): per-frame ImageNet-C and temporal shifts on tiny clips."""
import numpy as np
import pytest

from qshift.errors import UserError
from qshift.shifts import image as image_shifts
from qshift.shifts import video

T, S = 8, 32


def make_clip(seed: int = 0, n_frames: int = T, size: int = S) -> np.ndarray:
    """A gradient with mild texture and a bright square moving right: every frame distinct, edges to blur."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 200 // size + 20, yy * 200 // size + 20, np.full_like(xx, 110)], -1)
    base = base + rng.integers(-15, 16, base.shape)
    frames = []
    for t in range(n_frames):
        f = base.copy()
        x0 = 2 + 2 * t
        f[8:18, x0:x0 + 8] = (240, 230, 60)
        frames.append(f)
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return make_clip()


@pytest.fixture(scope="module")
def clips() -> np.ndarray:
    return np.stack([make_clip(s) for s in range(3)])


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.any(a != b))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# ------------------------------------------------------------------------------------------ names

def test_names():
    read_list = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                 "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                 "jpeg_compression")
    assert video.VIDEO_CORRUPTIONS == read_list
    assert video.VIDEO_SHIFT_NAMES == read_list + video.TEMPORAL_SHIFTS
    assert len(set(video.VIDEO_SHIFT_NAMES)) == len(video.VIDEO_SHIFT_NAMES)
    assert set(video.DEFAULT_CORRUPTION) <= set(video.TEMPORAL_SHIFTS)


# ------------------------------------------------------------------------------------ frames ↔ clips

def test_frame_ids_and_flattening(clips):
    ids = video.frame_ids([0, 1, 2], T)
    assert ids.dtype == np.int64 and ids.tolist() == list(range(3 * T))
    assert video.frame_ids([5], 4).tolist() == [20, 21, 22, 23]
    frames = video.as_frames(clips)
    assert frames.shape == (3 * T, S, S, 3) and np.shares_memory(frames, clips)
    assert np.array_equal(frames[T + 2], clips[1, 2])
    assert np.array_equal(video.as_clips(frames, T), clips)
    seen = {}

    def fn(fr, fid):
        seen["ids"] = fid.tolist()
        return 255 - fr

    out = video.map_frames(fn, clips, [7, 8, 9])
    assert seen["ids"] == video.frame_ids([7, 8, 9], T).tolist()
    assert np.array_equal(out, 255 - clips)


# --------------------------------------------------------------------------------- per-frame corruption

@pytest.mark.parametrize("name", video.VIDEO_CORRUPTIONS)
def test_every_corruption_changes_every_frame(clip, name):
    out = video.corrupt_clip(clip, name, 5, item_id=3)
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert all(changed(o, c) for o, c in zip(out, clip)), f"{name} left a frame unchanged"


def test_per_frame_is_the_image_corruption_of_each_frame_id(clips):
    out = video.corrupt_clips(clips, "shot_noise", 3, item_ids=[4, 5, 6], workers=1)
    frames = image_shifts.corrupt_batch(video.as_frames(clips), "shot_noise", 3, video.frame_ids([4, 5, 6], T))
    assert np.array_equal(out, video.as_clips(frames, T))
    assert np.array_equal(out[1], video.corrupt_clip(clips[1], "shot_noise", 3, item_id=5))


def test_frames_get_their_own_draws():
    still = np.repeat(make_clip(n_frames=1), T, axis=0)  # eight identical frames
    out = video.corrupt_clip(still, "gaussian_noise", 2, item_id=0)
    assert len({o.tobytes() for o in out}) == T


def test_per_frame_determinism_and_sensitivity(clip, clips):
    a = video.corrupt_clip(clip, "gaussian_noise", 4, item_id=11, seed=0)
    assert np.array_equal(a, video.corrupt_clip(clip, "gaussian_noise", 4, item_id=11, seed=0))
    assert changed(a, video.corrupt_clip(clip, "gaussian_noise", 4, item_id=11, seed=1))
    assert changed(a, video.corrupt_clip(clip, "gaussian_noise", 4, item_id=12, seed=0))
    one = video.corrupt_clips(clips, "motion_blur", 2, item_ids=[0, 1, 2], workers=1)
    two = video.corrupt_clips(clips, "motion_blur", 2, item_ids=[0, 1, 2], workers=2)
    assert np.array_equal(one, two)
    assert np.array_equal(video.corrupt_clips(clips[[2, 0]], "motion_blur", 2, [2, 0], workers=1), one[[2, 0]])
    empty = video.corrupt_clips(clips[:0], "fog", 1, [], workers=1)
    assert empty.shape == (0, T, S, S, 3)


# ---------------------------------------------------------------------------------------- temporal shifts

def test_clean_noise_blur(clip):
    out = video.corrupt_temporal(clip, "clean-noise-blur", 3, item_id=2)
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert np.array_equal(out[:3], clip[:3])
    noise = video.corrupt_clip(clip, "gaussian_noise", 3, item_id=2)
    blur = video.corrupt_clip(clip, "defocus_blur", 3, item_id=2)
    assert np.array_equal(out[3:6], noise[3:6]) and np.array_equal(out[6:], blur[6:])
    assert all(changed(out[t], clip[t]) for t in range(3, T))
    plan = video.temporal_plan("clean-noise-blur", 3, T)
    assert [p.corruption for p in plan] == [None] * 3 + ["gaussian_noise"] * 3 + ["defocus_blur"] * 2


def test_severity_ramp_rises(clip):
    plan = video.temporal_plan("severity-ramp", 5, T)
    sev = [p.severity for p in plan]
    assert sev[0] == 1 and sev[-1] == 5 and sev == sorted(sev) and set(sev) == {1, 2, 3, 4, 5}
    assert all(p.corruption == "gaussian_noise" and p.source == t for t, p in enumerate(plan))
    out = video.corrupt_temporal(clip, "severity-ramp", 5, item_id=1)
    d = [mad(o, c) for o, c in zip(out, clip)]
    by_sev = [np.mean([d[t] for t in range(T) if sev[t] == s]) for s in range(1, 6)]
    assert all(a < b for a, b in zip(by_sev, by_sev[1:])), by_sev
    fog = video.temporal_plan("severity-ramp", 3, T, corruption="fog")
    assert {p.corruption for p in fog} == {"fog"} and [p.severity for p in fog][-1] == 3
    assert [p.severity for p in video.temporal_plan("severity-ramp", 1, T)] == [1] * T


def test_flicker(clip):
    out = video.corrupt_temporal(clip, "flicker", 4, item_id=0)
    assert np.array_equal(out[0::2], clip[0::2])
    assert all(changed(out[t], clip[t]) for t in range(1, T, 2))
    noisy = video.corrupt_temporal(clip, "flicker", 4, item_id=0, corruption="impulse_noise")
    assert np.array_equal(noisy[1::2], video.corrupt_clip(clip, "impulse_noise", 4, item_id=0)[1::2])


def _source_of(out: np.ndarray, clip: np.ndarray) -> list[int]:
    """The input frame each output frame is (the frames of ``clip`` are distinct)."""
    src = []
    for o in out:
        hits = [t for t in range(len(clip)) if np.array_equal(o, clip[t])]
        assert len(hits) == 1, "an output frame is not an input frame"
        src.append(hits[0])
    return src


@pytest.mark.parametrize("item", [0, 1, 2, 3])
def test_frame_drop_holds_the_last_kept_frame(clip, item):
    previous: set[int] = set()
    for s in image_shifts.SEVERITIES:
        out = video.corrupt_temporal(clip, "frame-drop", s, item_id=item)
        src = _source_of(out, clip)
        dropped = {t for t in range(T) if src[t] != t}
        assert len(dropped) == s  # FRAME_FRACTIONS · 8 frames: 1..5
        assert src[0] == 0 and all(src[t] == src[t - 1] for t in dropped)
        assert previous <= dropped  # a higher severity drops a superset
        previous = dropped


@pytest.mark.parametrize("item", [0, 1, 2, 3])
def test_freeze_is_one_contiguous_stuck_run(clip, item):
    for s in image_shifts.SEVERITIES:
        out = video.corrupt_temporal(clip, "freeze", s, item_id=item)
        src = _source_of(out, clip)
        frozen = [t for t in range(T) if src[t] != t]
        assert len(frozen) == s and frozen == list(range(frozen[0], frozen[0] + s))
        assert all(src[t] == frozen[0] - 1 for t in frozen)


def test_affected_fraction_follows_severity_on_other_lengths():
    ten = [sum(p.source != t for t, p in enumerate(video.temporal_plan("frame-drop", s, 10))) for s in range(1, 6)]
    assert ten == [1, 3, 4, 5, 6]
    three = [sum(p.source != t for t, p in enumerate(video.temporal_plan("freeze", s, 3))) for s in range(1, 6)]
    assert three == [1, 1, 1, 2, 2]


def test_temporal_determinism_and_sensitivity(clips):
    plans = {i: video.temporal_plan("frame-drop", 3, T, item_id=i) for i in range(6)}
    assert plans[0] == video.temporal_plan("frame-drop", 3, T, item_id=0)
    assert len({tuple(p) for p in plans.values()}) > 1, "frame drops do not depend on the item"
    seeds = {tuple(video.temporal_plan("freeze", 2, T, item_id=0, seed=s)) for s in range(6)}
    assert len(seeds) > 1, "freezes do not depend on the seed"
    batch = video.corrupt_temporal_clips(clips, "clean-noise-blur", 2, [7, 8, 9], workers=1)
    assert batch.shape == clips.shape and batch.dtype == np.uint8
    assert np.array_equal(batch[1], video.corrupt_temporal(clips[1], "clean-noise-blur", 2, item_id=8))
    assert np.array_equal(video.shift_clips(clips, "clean-noise-blur", 2, [7, 8, 9], workers=1), batch)
    assert np.array_equal(video.shift_clips(clips, "pixelate", 2, [7, 8, 9], workers=1),
                          video.corrupt_clips(clips, "pixelate", 2, [7, 8, 9], workers=1))


# ------------------------------------------------------------------------------------------ errors

def test_user_errors(clip, clips):
    with pytest.raises(UserError, match="unknown corruption"):
        video.corrupt_clip(clip, "sunburn", 1, 0)
    with pytest.raises(UserError, match="unknown temporal shift"):
        video.corrupt_temporal(clip, "rewind", 1, 0)
    with pytest.raises(UserError, match="unknown video shift"):
        video.shift_clips(clips, "rewind", 1, [0, 1, 2])
    for bad in (0, 6, True, 2.5):
        with pytest.raises(UserError, match="severity"):
            video.corrupt_clip(clip, "fog", bad, 0)
        with pytest.raises(UserError, match="severity"):
            video.corrupt_temporal(clip, "freeze", bad, 0)
    with pytest.raises(UserError, match=r"\[T, H, W, 3\]"):
        video.corrupt_clip(clip[0], "fog", 1, 0)
    with pytest.raises(UserError, match=r"\[T, H, W, 3\]"):
        video.corrupt_temporal(clip.astype(np.float32), "freeze", 1, 0)
    with pytest.raises(UserError, match=r"\[B, T, H, W, 3\]"):
        video.corrupt_clips(clip, "fog", 1, [0])
    with pytest.raises(UserError, match=r"\[B, T, H, W, 3\]"):
        video.corrupt_temporal_clips(clip, "freeze", 1, [0])
    with pytest.raises(UserError, match="3 clips but 2 item ids"):
        video.corrupt_clips(clips, "fog", 1, [0, 1])
    with pytest.raises(UserError, match="takes no corruption"):
        video.corrupt_temporal(clip, "frame-drop", 1, 0, corruption="fog")
    with pytest.raises(UserError, match="unknown corruption"):
        video.corrupt_temporal(clip, "flicker", 1, 0, corruption="sunburn")
    with pytest.raises(UserError, match="at least 3 frames"):
        video.corrupt_temporal(clip[:2], "freeze", 1, 0)
    with pytest.raises(UserError, match="whole number"):
        video.corrupt_clip(clip, "fog", 1, item_id=1.5)
    with pytest.raises(UserError, match="not a whole number of 5-frame clips"):
        video.as_clips(video.as_frames(clips), 5)
