import math
from collections import Counter

import numpy as np
import pytest

from qshift.data import world


@pytest.fixture(scope="module")
def test_split():
    return world.load_split("test")


def test_test_split_sizes_and_uniqueness(test_split):
    assert len(test_split) == 2000
    assert len(test_split.captions) == 10_000
    assert Counter(test_split.caption_image.tolist()) == {i: 5 for i in range(2000)}
    assert len(set(test_split.captions)) == 10_000, "every test caption string is unique"
    assert len({s.layout_key for s in test_split.scenes}) == 2000, "every layout is unique"


def test_scenes_follow_the_world_rules(test_split):
    counts = Counter()
    for s in test_split.scenes:
        n = len(s.objects)
        assert 1 <= n <= 3
        counts[n] += 1
        for o in s.objects:
            assert o.shape in world.SHAPES and o.colour in world.COLOURS and o.size in world.SIZES
            lo, hi = world.SIZE_RADIUS[o.size]
            assert lo <= o.radius <= hi
            assert o.radius <= o.x <= world.IMAGE_SIZE - o.radius and o.radius <= o.y <= world.IMAGE_SIZE - o.radius
        for a in range(n):
            for b in range(a + 1, n):
                oa, ob = s.objects[a], s.objects[b]
                assert math.hypot(oa.x - ob.x, oa.y - ob.y) > oa.radius + ob.radius, "objects overlap"
    assert set(counts) == {1, 2, 3}
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 8 and len(world.SIZES) >= 2


def test_five_distinct_captions_from_distinct_families(test_split):
    fams = Counter()
    for i in range(50):
        caps = [c for c, k in zip(test_split.captions, test_split.caption_image) if k == i]
        f = [f for f, k in zip(test_split.families, test_split.caption_image) if k == i]
        assert len(set(caps)) == 5 and len(set(f)) == 5
        fams.update(f)
    assert len(world.SOURCE_FAMILIES) >= 6 and len(fams) >= 6


def test_captions_name_every_object(test_split):
    for i in range(200):
        scene = test_split.scenes[i]
        for c, k in zip(test_split.captions[5 * i:5 * i + 5], test_split.caption_image[5 * i:5 * i + 5]):
            assert k == i
            for o in scene.objects:
                assert o.colour in c and o.shape in c, (c, o)


def test_relations_and_cells_are_geometrically_true():
    a = world.WorldObject("circle", "red", "small", x=10, y=50, radius=9)
    b = world.WorldObject("square", "blue", "small", x=80, y=45, radius=9)
    c = world.WorldObject("star", "green", "small", x=75, y=90, radius=5)
    assert world._relation(a, b) == "to the left of"
    assert world._relation(b, a) == "to the right of"
    assert world._relation(b, c) == "above"
    assert world._relation(c, b) == "below"
    assert a.cell == "left" and c.cell == "bottom right"


def test_generation_and_rendering_are_deterministic():
    s1, s2 = world.generate_world(seed=123, n_images=20), world.generate_world(seed=123, n_images=20)
    assert s1.captions == s2.captions
    np.testing.assert_array_equal(s1.images([0, 5]), s2.images([0, 5]))
    other = world.generate_world(seed=124, n_images=20)
    assert other.captions != s1.captions


def test_rendered_image_shows_the_object_where_the_scene_says():
    obj = world.WorldObject("square", "red", "large", x=20, y=70, radius=18)
    bg = world.Background(base=(128, 128, 128), gradient_angle=0.0, gradient_strength=0.0, grain=0.0)
    big = world.render_scene(world.Scene((obj,), bg, noise_seed=0))
    assert big.shape == (world.RENDER_SIZE, world.RENDER_SIZE, 3) and big.dtype == np.uint8
    img = world.render_scene(world.Scene((obj,), bg, noise_seed=0), size=world.IMAGE_SIZE)
    assert img.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert img[70, 20, 0] > 180 and img[70, 20, 1] < 80  # red at the object's centre
    assert tuple(img[10, 80]) == (128, 128, 128)  # background elsewhere
    k = world.RENDER_SIZE // world.IMAGE_SIZE
    assert big[70 * k, 20 * k, 0] > 180 and tuple(big[10 * k, 80 * k]) == (128, 128, 128)
    # the larger render, area-downsampled, is the same picture as the direct small render
    small = world.area_downsample(big[None])[0]
    assert np.abs(small.astype(int) - img.astype(int)).mean() < 2.0


def test_area_downsample_averages_blocks_and_rejects_bad_sizes():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    a[0, :2, :2] = 200  # top-left 2×2 block
    a[0, 0, 2] = 100  # one pixel of the top-right block
    out = world.area_downsample(a, size=2)
    assert out.shape == (1, 2, 2, 3)
    assert out[0, 0, 0, 0] == 200 and out[0, 0, 1, 0] == 25 and out[0, 1, 1, 0] == 0
    assert world.area_downsample(a, size=4) is a
    with pytest.raises(ValueError, match="multiple"):
        world.area_downsample(np.zeros((1, 5, 5, 3), np.uint8), size=2)


def test_subset_and_fixed_splits():
    t1k = world.load_split("test1k")
    full = world.load_split("test")
    assert len(t1k) == 1000 and len(t1k.captions) == 5000
    assert t1k.captions == full.captions[:5000]
    with pytest.raises(ValueError, match="unknown world split"):
        world.load_split("nope")
    with pytest.raises(ValueError):
        world.generate_world(seed=0, n_images=0)


def test_train_stream_is_disjoint_from_test_seed():
    scene, caps = world.train_scene(0)
    assert set(caps) == set(world.SOURCE_FAMILIES)
    assert world.TRAIN_SEED not in {spec["seed"] for spec in world.SPLITS.values()}
