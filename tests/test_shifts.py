import numpy as np
import pytest

from qshift.data import world
from qshift.shifts import image as image_shifts
from qshift.shifts import text as text_shifts


@pytest.fixture(scope="module")
def images():
    return world.generate_world(seed=31, n_images=3).images()


@pytest.mark.parametrize("name", image_shifts.CORRUPTIONS)
def test_every_corruption_runs_changes_pixels_and_is_deterministic(images, name):
    a = image_shifts.corrupt_image(images[0], name, 5, item_id=7, seed=0)
    b = image_shifts.corrupt_image(images[0], name, 5, item_id=7, seed=0)
    assert a.shape == images[0].shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - images[0]).mean() > 1.0, "severity 5 left the image unchanged"


def test_corruption_depends_on_item_not_batch_position(images):
    batch = image_shifts.corrupt_batch(images, "gaussian_noise", 3, item_ids=[10, 11, 12])
    alone = image_shifts.corrupt_image(images[1], "gaussian_noise", 3, item_id=11)
    np.testing.assert_array_equal(batch[1], alone)
    other_seed = image_shifts.corrupt_image(images[1], "gaussian_noise", 3, item_id=11, seed=1)
    assert not np.array_equal(alone, other_seed)
    # numpy's global state is left as it was
    np.random.seed(5)
    x = np.random.rand()
    np.random.seed(5)
    image_shifts.corrupt_image(images[0], "shot_noise", 2, item_id=0)
    assert np.random.rand() == x


def test_severity_orders_damage(images):
    d = [np.abs(image_shifts.corrupt_image(images[0], "gaussian_noise", s, 0).astype(int) - images[0]).mean()
         for s in (1, 3, 5)]
    assert d[0] < d[1] < d[2]


def test_image_corruption_errors(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        image_shifts.corrupt_image(images[0], "sunburn", 1, 0)
    with pytest.raises(ValueError, match="severity"):
        image_shifts.corrupt_image(images[0], "fog", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        image_shifts.corrupt_image(images[0].astype(float), "fog", 1, 0)
    assert "gaussian_blur" in image_shifts.available_corruptions()


CAPTION = "there is a large red star on the left, a large purple cross at the top and a little purple square"


@pytest.mark.parametrize("name", text_shifts.TEXT_PERTURBATIONS)
def test_every_text_perturbation_is_deterministic_and_changes_text(name):
    a = text_shifts.perturb_text(CAPTION, name, 6, item_id=3)
    assert isinstance(a, str) and a.strip()
    assert a == text_shifts.perturb_text(CAPTION, name, 6, item_id=3)
    assert a != CAPTION
    variants = {text_shifts.perturb_text(CAPTION, name, 6, item_id=i) for i in range(5)}
    assert len(variants) > 1


def test_level_scales_character_noise():
    def changed(level):
        outs = [text_shifts.perturb_text(CAPTION, "keyboard", level, i).split() for i in range(20)]
        return np.mean([sum(x != y for x, y in zip(o, CAPTION.split())) for o in outs])
    assert changed(1) < changed(4) < changed(7)


def test_synonyms_come_from_the_world_table():
    out = text_shifts.perturb_text("a large red circle", "synonym_replace", 7, 0)
    words = out.split()
    assert any(w not in ("a", "large", "red", "circle") for w in words)
    for w in words:
        assert w in ("a", "large", "red", "circle") or any(w in syn for syn in text_shifts.WORLD_SYNONYMS.values()) \
            or any(w in s.split() for syn in text_shifts.WORLD_SYNONYMS.values() for s in syn)


def test_text_errors_and_missing_wordnet(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        text_shifts.perturb_text("  ", "keyboard", 1, 0)
    with pytest.raises(ValueError, match="unknown text perturbation"):
        text_shifts.perturb_text("a b", "shout", 1, 0)
    with pytest.raises(ValueError, match="level"):
        text_shifts.perturb_text("a b", "keyboard", 8, 0)
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        text_shifts.wordnet_synonyms(tmp_path)


def test_held_out_styles_are_not_training_families():
    assert not set(world.HELD_OUT_FAMILIES) & set(world.SOURCE_FAMILIES)
    scene, caps = world.train_scene(3)
    assert set(caps) == set(world.SOURCE_FAMILIES)
    for style in world.HELD_OUT_FAMILIES:
        text = world.caption_scene(scene, style, np.random.default_rng(0))
        assert all(o.shape in text and o.colour in text for o in scene.objects)


@pytest.mark.parametrize("domain", [d for d in world.DOMAINS if d != "source"])
def test_domains_render_differently_from_source(domain):
    scene = world.generate_world(seed=4, n_images=1).scenes[0]
    src = world.render_scene(scene).astype(int)
    img = world.render_scene(scene, domain=domain)
    assert img.shape == src.shape and np.abs(img - src).mean() > 5
    np.testing.assert_array_equal(img, world.render_scene(scene, domain=domain))
