import numpy as np
import pytest

from qshift.bench import families, registry
from qshift.data import world


@pytest.fixture
def small_world(monkeypatch, tmp_path):
    """Registry tasks over a 40-image world, cached in a temporary folder."""
    small = world.generate_world(seed=55, n_images=40, name="small-test")
    monkeypatch.setattr(world, "load_split", lambda name: small if name == "test" else small.subset(20, "small-1k"))
    monkeypatch.setenv("QSHIFT_CACHE", str(tmp_path / "cache"))
    return small


def test_names_are_unique_and_cover_every_shift():
    names = registry.list_benchmarks()
    assert len(names) == len(set(names))
    assert sum(n.startswith("world-c/i2t/") for n in names) == 16 * 5
    assert sum(n.startswith("world-c/t2i/") for n in names) == 11 * 7
    assert {"world-qgs/outline/i2t", "world-style/passive/t2i", "world-mixed/i2t/c16-s5/interleaved",
            "world-diverse/i2t/c8-s5/order0"} <= set(names)


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ValueError, match="did you mean world-c/i2t/fog/5"):
        registry.build_benchmark("world-c/i2t/fogg/5")
    with pytest.raises(ValueError, match="unknown benchmark"):
        registry.build_benchmark("world-c/i2t/fog/9")


def test_corruption_task_and_cache(small_world, tmp_path):
    task = registry.build_benchmark("world-c/i2t/brightness/3")
    assert task.direction == "i2t" and task.query_modality == "image"
    assert task.n_queries == 40 and len(task.gallery) == 200
    q = task.query_sets[0]
    assert q.domain == "brightness-3" and q.items.shape == (40, world.RENDER_SIZE, world.RENDER_SIZE, 3)
    assert not np.array_equal(q.items, task.clean_queries.items)
    cached = list((tmp_path / "cache").glob("corrupt-*.qsc"))
    assert len(cached) == 1
    again = registry.build_benchmark("world-c/i2t/brightness/3")
    np.testing.assert_array_equal(again.query_sets[0].items, q.items)
    other_seed = registry.build_benchmark("world-c/i2t/brightness/3", shift_seed=1)
    assert len(list((tmp_path / "cache").glob("corrupt-*.qsc"))) == 2
    assert other_seed.query_sets[0].items.shape == q.items.shape


def test_text_style_and_qgs_tasks(small_world):
    t = registry.build_benchmark("world-c/t2i/char_swap/6")
    assert t.direction == "t2i" and t.n_queries == 200 and len(t.gallery) == 40
    assert t.query_sets[0].items != small_world.captions
    s = registry.build_benchmark("world-style/terse/t2i")
    assert s.n_queries == 40 and ";" in s.query_sets[0].items[0] or "," in s.query_sets[0].items[0]
    gi = registry.build_benchmark("world-style/formal/i2t")
    assert len(gi.gallery) == 40 and gi.gallery[0].startswith("this illustration")
    g = registry.build_benchmark("world-qgs/sketch/t2i")
    assert g.gallery.shape == (40, world.RENDER_SIZE, world.RENDER_SIZE, 3)
    assert g.gallery.mean() > 180  # paper background


def test_mixed_and_diverse_streams(small_world):
    m = registry.build_benchmark("world-mixed/t2i/char-l6/interleaved")
    ids = np.concatenate([q.ids for q in m.query_sets])
    assert len(ids) == 200 and len(m.query_sets) == 6
    batches = list(m.stream(batch_size=32, seed=0))
    assert sum(len(b) for b in batches) == 200
    assert any(len(set(b.domains)) > 1 for b in batches)
    d = registry.build_benchmark("world-diverse/t2i/char-l6/order1")
    doms = [b.domains[0] for b in d.stream(batch_size=16)]
    assert doms[0] == "char_delete-6" and doms[-1] == "keyboard-6"  # reversed order
    assert d.clean_queries is not None and len(d.clean_queries) == 40


def test_mixed_kind_diverse_streams(small_world):
    i = registry.build_benchmark("world-diverse/i2t/mix8/order0")
    assert [q.domain for q in i.query_sets] == list(families.DIVERSE_I2T_MIX8)
    assert all(len(q) == 20 for q in i.query_sets)
    t = registry.build_benchmark("world-diverse/t2i/mix8/order2")
    assert sorted(q.domain for q in t.query_sets) == sorted(families.DIVERSE_T2I_MIX8)
    assert all(len(q) == 20 for q in t.query_sets) and len(t.gallery) == 20
    first_domain = next(iter(t.stream(batch_size=8))).domains[0]
    assert first_domain == families.DIVERSE_T2I_MIX8[t.domain_order[0]]


def test_a_larger_render_size_gives_larger_images_cached_apart(small_world, tmp_path, monkeypatch):
    monkeypatch.setattr(world, "RENDER_SIZE", world.IMAGE_SIZE)
    small = registry.build_benchmark("world-c/i2t/gaussian_noise/5")
    monkeypatch.setattr(world, "RENDER_SIZE", 2 * world.IMAGE_SIZE)
    big = registry.build_benchmark("world-c/i2t/gaussian_noise/5")
    assert big.query_sets[0].items.shape == (40, 2 * world.IMAGE_SIZE, 2 * world.IMAGE_SIZE, 3)
    assert small.query_sets[0].items.shape[1] == world.IMAGE_SIZE
    assert len(list((tmp_path / "cache").glob("corrupt-*.qsc"))) == 2  # not served from the 96 px entry
    assert len(list((tmp_path / "cache").glob("render-*.qsc"))) == 2


def test_render_size_comes_from_the_environment_and_is_checked():
    import subprocess
    import sys
    code = "from qshift.data import world; print(world.RENDER_SIZE)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "QSHIFT_RENDER_SIZE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(world.DEFAULT_RENDER_SIZE) == "192"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "QSHIFT_RENDER_SIZE": "96"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "96"
    bad = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "QSHIFT_RENDER_SIZE": "100"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "multiple of 96" in bad.stderr


def test_background_grey_range_comes_from_the_environment_and_only_changes_backgrounds():
    import os
    import subprocess
    import sys
    code = ("from qshift.data import world; s = world.generate_world(5, 4); "
            "print(world.BG_GREY, world.world_variant(), [o.shape for sc in s.scenes for o in sc.objects], "
            "[round(sum(sc.background.base) / 3) for sc in s.scenes])")
    env = {k: v for k, v in os.environ.items() if k != "QSHIFT_WORLD_BG_GREY"}
    std = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    dark = subprocess.run([sys.executable, "-c", code], env={**env, "QSHIFT_WORLD_BG_GREY": "20,60"},
                          capture_output=True, text=True, check=True).stdout
    assert std.startswith("(90.0, 200.0) {} ") and dark.startswith("(20.0, 60.0) {'bg_grey': [20.0, 60.0]} ")
    # the same objects (the random stream is unchanged), darker backgrounds
    std_objs, dark_objs = std.split("] [")[0].split("} ")[1], dark.split("] [")[0].split("} ")[1]
    assert std_objs == dark_objs
    greys = [int(v) for v in dark.rsplit("[", 1)[1].strip(" ]\n").split(",")]
    assert all(g <= 60 + 30 for g in greys) and max(greys) < min(
        int(v) for v in std.rsplit("[", 1)[1].strip(" ]\n").split(",")) + 100
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "QSHIFT_WORLD_BG_GREY": "200,20"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "lo < hi" in bad.stderr


def test_test_split_size_comes_from_the_environment_and_keeps_the_standard_prefix():
    import os
    import subprocess
    import sys
    code = ("from qshift.data import world; t = world.load_split('test'); k = world.load_split('test1k'); "
            "print(world.TEST_IMAGES, world.world_variant(), len(t.scenes), len(t.captions), "
            "hash(tuple(sc.layout_key for sc in k.scenes)), hash(tuple(k.captions)))")
    env = {k: v for k, v in os.environ.items() if k != "QSHIFT_WORLD_TEST_IMAGES"}
    env["PYTHONHASHSEED"] = "0"
    big = subprocess.run([sys.executable, "-c", code], env={**env, "QSHIFT_WORLD_TEST_IMAGES": "2500"},
                         capture_output=True, text=True, check=True).stdout.split()
    std = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert big[:4] == ["2500", "{'test_images':", "2500}", "2500"] and big[4] == "12500"
    assert std[:4] == ["2000", "{}", "2000", "10000"]
    assert big[-2:] == std[-2:]  # test1k (the first 1,000 images and their captions) is the standard one
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "QSHIFT_WORLD_TEST_IMAGES": "500"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "1000..20000" in bad.stderr


def test_a_world_variant_is_cached_apart_and_recorded_in_the_model_identity(small_world, tmp_path, monkeypatch):
    from qshift.bench.grid import model_identity
    std = registry.build_benchmark("world-c/i2t/gaussian_noise/5")
    assert "bg_grey" not in model_identity(None)
    monkeypatch.setattr(world, "BG_GREY", (20.0, 60.0))
    assert model_identity(None)["bg_grey"] == [20.0, 60.0]
    assert len(list((tmp_path / "cache").glob("render-*.qsc"))) == 1
    registry.build_benchmark("world-c/i2t/gaussian_noise/5")
    assert len(list((tmp_path / "cache").glob("render-*.qsc"))) == 2  # not served from the standard entry
    assert std.query_sets[0].items.shape[0] == 40
