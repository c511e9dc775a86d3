"""The shifted-set cache: exact compressed storage, row subsets, LRU eviction, info / clear."""
import logging
import os

import numpy as np
import pytest

from qshift.bench import cache, world_data
from qshift.data import streams, world


@pytest.fixture
def cache_root(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("QSHIFT_CACHE", str(root))
    monkeypatch.delenv("QSHIFT_CACHE_MAX_MB", raising=False)
    return root


@pytest.fixture(scope="module")
def small():
    return world.generate_world(seed=55, n_images=12, name="small-cache")


def _no_rendering(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("rendered although the set is cached")
    monkeypatch.setattr(world, "render_scene", boom)


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("arr", [
    np.arange(2 * 5 * 7 * 3, dtype=np.uint8).reshape(2, 5, 7, 3),
    np.zeros((0, 4, 4, 3), np.uint8),
    np.array(3.5),
    np.linspace(-1, 1, 50_000, dtype=np.float32).reshape(500, 100),
    np.asarray(["a", "bb", "", "a much longer caption than the others"] * 300, dtype=np.str_),
])
def test_the_format_round_trips_exactly_and_reads_any_rows(tmp_path, arr):
    p = tmp_path / f"x{cache.SUFFIX}"
    cache.write_array(p, arr)
    back = cache.read_array(p)
    assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)
    assert p.read_bytes().startswith(cache.MAGIC)
    if arr.ndim and len(arr) > 2:
        rows = np.array([len(arr) - 1, 0, 1, 1, len(arr) // 2])
        np.testing.assert_array_equal(cache.read_array(p, rows), arr[rows])


def test_entries_are_compressed(cache_root, small):
    clean = world_data.domain_images(small, "source", workers=1)
    (entry,) = cache_root.glob(f"render-*{cache.SUFFIX}")
    assert entry.with_suffix(".json").is_file()
    assert entry.read_bytes()[:len(cache.MAGIC)] == cache.MAGIC
    assert entry.stat().st_size < 0.8 * clean.nbytes
    assert not list(cache_root.glob("*.npy"))


# --------------------------------------------------------------------------- exactness

def test_a_row_subset_is_bit_identical_to_the_full_set(cache_root, small, monkeypatch):
    rows = np.array([1, 4, 5, 11])
    sub = world_data.corrupted_images(small, "gaussian_noise", 5, workers=1, rows=rows)
    sub_style = world_data.domain_images(small, "sketch", workers=1, rows=rows)
    caps_rows = np.array([0, 7, 33, 59])
    sub_caps = world_data.perturbed_captions(small, "keyboard", 6, rows=caps_rows)
    assert cache.cache_info()["kinds"]["corrupt"]["entries"] == 1  # the subset is cached under its rows

    monkeypatch.setenv("QSHIFT_CACHE", "off")
    full = world_data.corrupted_images(small, "gaussian_noise", 5, workers=2)  # other chunks, other workers
    np.testing.assert_array_equal(sub, full[rows])
    np.testing.assert_array_equal(sub_style, world_data.domain_images(small, "sketch", workers=1)[rows])
    all_caps = world_data.perturbed_captions(small, "keyboard", 6)
    assert sub_caps == [all_caps[k] for k in caps_rows]

    monkeypatch.setenv("QSHIFT_CACHE", str(cache_root))
    again = world_data.corrupted_images(small, "gaussian_noise", 5, workers=1, rows=rows)  # from its entry
    np.testing.assert_array_equal(again, sub)
    cached_full = world_data.corrupted_images(small, "gaussian_noise", 5, workers=1)
    np.testing.assert_array_equal(cached_full, full)
    np.testing.assert_array_equal(world_data.corrupted_images(small, "gaussian_noise", 5, workers=1), full)


def test_a_cached_full_set_serves_any_subset_without_rebuilding(cache_root, small, monkeypatch):
    full = world_data.corrupted_images(small, "contrast", 3, workers=1)
    n_before = cache.cache_info()["entries"]
    _no_rendering(monkeypatch)
    monkeypatch.setattr(world_data.image_shifts, "corrupt_batch", lambda *a, **k: pytest.fail("corrupted again"))
    for rows in ([2, 3, 9], [10], np.arange(12)[::-1]):
        np.testing.assert_array_equal(world_data.corrupted_images(small, "contrast", 3, rows=rows),
                                      full[np.asarray(rows)])
    assert cache.cache_info()["entries"] == n_before  # slices are not stored again


def test_test1k_rows_come_from_the_cached_test_set(cache_root, monkeypatch):
    parent = world.generate_world(seed=56, n_images=10, name="test")
    child = parent.subset(6, name="test1k")
    monkeypatch.setattr(world, "load_split", lambda name: {"test": parent, "test1k": child}[name])
    full = world_data.corrupted_images(parent, "jpeg_compression", 2, workers=1)
    caps = world_data.perturbed_captions(parent, "char_swap", 3)
    _no_rendering(monkeypatch)
    np.testing.assert_array_equal(world_data.corrupted_images(child, "jpeg_compression", 2, rows=[1, 5]), full[[1, 5]])
    np.testing.assert_array_equal(world_data.corrupted_images(child, "jpeg_compression", 2), full[:6])
    assert world_data.perturbed_captions(child, "char_swap", 3) == caps[:len(child.captions)]


def test_rows_are_checked_and_every_row_is_the_full_set(cache_root, small):
    with pytest.raises(IndexError):
        world_data.domain_images(small, "source", workers=1, rows=[0, 12])
    with pytest.raises(ValueError):
        world_data.domain_images(small, "source", workers=1, rows=[[0, 1]])
    assert world_data.domain_images(small, "source", workers=1, rows=[]).shape == (0, world.RENDER_SIZE,
                                                                                    world.RENDER_SIZE, 3)
    cache.cache_clear()
    world_data.domain_images(small, "source", workers=1, rows=np.arange(len(small)))
    (entry,) = cache_root.glob(f"render-*{cache.SUFFIX}")
    assert "rows" not in entry.with_suffix(".json").read_text()  # stored as the full set


@pytest.mark.parametrize("n, k", [(2000, 512), (1000, 64), (10, 3), (10, 10), (10, 11), (10, None)])
def test_subsample_rows_are_the_rows_a_query_subset_keeps(n, k):
    rows = world_data.subsample_rows(n, k)
    q = streams.QuerySet("x", np.arange(n) * 10, np.arange(n))
    if k is None:
        assert rows is None
        return
    kept = q.subset(k)
    if k >= n:
        assert rows is None and kept is q
    else:
        np.testing.assert_array_equal(kept.ids, rows)
        np.testing.assert_array_equal(kept.items, q.items[rows])


# ------------------------------------------------------------------------------ bound, LRU

def _store(name: str, kb: int = 100) -> os.PathLike:
    arr = np.random.default_rng(abs(hash(name)) % 2**32).integers(0, 256, kb * 1024, dtype=np.uint8)  # incompressible
    return cache.cache_store({"kind": "test", "name": name}, arr)


def test_least_recently_used_entries_are_evicted_first(cache_root, monkeypatch):
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", str(350 / 1024))  # room for three 100 KB entries
    paths = {n: _store(n) for n in "abc"}
    for k, n in enumerate("abc"):  # a oldest, c newest
        os.utime(paths[n], ns=(10**18 + k * 10**9,) * 2)
    assert cache.cache_load({"kind": "test", "name": "a"}) is not None  # a read: a is now the newest
    paths["d"] = _store("d")
    left = {p.name for p in cache_root.glob(f"*{cache.SUFFIX}")}
    assert left == {paths[n].name for n in "acd"}  # b, the least recently used, went
    assert not paths["b"].with_suffix(".json").exists()
    assert cache.cache_info()["entries"] == 3

    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", "0")  # the entry just written stays, whatever the bound
    e = _store("e")
    assert [p.name for p in cache_root.glob(f"*{cache.SUFFIX}")] == [e.name]


def test_legacy_npy_entries_go_first_and_are_never_read(cache_root, monkeypatch):
    cache_root.mkdir()
    legacy = cache_root / "corrupt-0123456789abcdef01234567.npy"
    np.save(legacy, np.zeros(200 * 1024, np.uint8))
    os.utime(legacy, ns=(2 * 10**18,) * 2)  # "newer" than anything, still evicted first
    info = cache.cache_info()
    assert info["legacy"]["entries"] == 1 and info["kinds"] == {}
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", str(250 / 1024))
    _store("a")
    assert not legacy.exists()


def test_the_bound_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv("QSHIFT_CACHE_MAX_MB", raising=False)
    assert cache.cache_max_bytes() == cache.DEFAULT_MAX_MB * 2**20 == 4 * 2**30
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", "1.5")
    assert cache.cache_max_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", "none")
    assert cache.cache_max_bytes() is None
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", "lots")
    with caplog.at_level(logging.WARNING):
        assert cache.cache_max_bytes() == cache.DEFAULT_MAX_MB * 2**20
    assert "QSHIFT_CACHE_MAX_MB" in caplog.text


def test_eviction_survives_entries_that_vanish(cache_root, monkeypatch):
    monkeypatch.setenv("QSHIFT_CACHE_MAX_MB", "0")
    keep = _store("a")
    ghost = {"path": cache_root / f"test-gone{cache.SUFFIX}", "kind": "test", "bytes": 10**6, "mtime_ns": 0,
             "legacy": False}
    real = cache._entries
    monkeypatch.setattr(cache, "_entries", lambda root: [ghost, *real(root)])
    assert cache.evict(keep=keep) == (1, 0)  # another process removed it first: nothing freed, no error
    assert keep.exists()


# ------------------------------------------------------------------------------ info / clear

def test_info_and_clear_count_entries_and_bytes(cache_root, small):
    empty = cache.cache_info()
    assert empty["enabled"] and empty["folder"] == str(cache_root) and empty["entries"] == 0
    assert empty["total_bytes"] == 0 and empty["oldest"] is None
    world_data.corrupted_images(small, "contrast", 2, workers=1, rows=[0, 1])  # render rows + corrupt rows
    world_data.perturbed_captions(small, "keyboard", 2, rows=[0, 1])
    _store("a", kb=10)
    info = cache.cache_info()
    files = [p for p in cache_root.iterdir() if p.suffix in (cache.SUFFIX, ".json")]
    assert info["entries"] == 4 and info["total_bytes"] == sum(p.stat().st_size for p in files)
    assert {k: v["entries"] for k, v in info["kinds"].items()} == {"corrupt": 1, "perturb": 1, "render": 1, "test": 1}
    assert info["oldest"] <= info["newest"] and info["max_bytes"] == 4 * 2**30

    n, freed = cache.cache_clear("render")
    assert (n, freed) == (1, info["kinds"]["render"]["bytes"])
    assert cache.cache_clear("render") == (0, 0)
    assert cache.cache_clear() == (3, info["total_bytes"] - freed)
    assert cache.cache_info()["entries"] == 0 and not list(cache_root.iterdir())


def test_cache_off_writes_nothing(monkeypatch, tmp_path, small):
    monkeypatch.setenv("QSHIFT_CACHE", "off")
    monkeypatch.chdir(tmp_path)
    a = world_data.corrupted_images(small, "contrast", 1, workers=1, rows=[3])
    b = world_data.corrupted_images(small, "contrast", 1, workers=1, rows=[3])
    np.testing.assert_array_equal(a, b)
    assert cache.cache_dir() is None and cache.cache_store({"kind": "x"}, a) is None
    info = cache.cache_info()
    assert not info["enabled"] and info["folder"] is None and info["entries"] == 0
    assert cache.cache_clear() == (0, 0) and not list(tmp_path.iterdir())


def test_an_unreadable_entry_is_recomputed_with_a_warning(cache_root, caplog):
    spec = {"kind": "test", "name": "broken"}
    good = np.arange(1000, dtype=np.int64)
    path = cache.cache_store(spec, good)
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with caplog.at_level(logging.WARNING, logger="qshift.bench.cache"):
        out = cache.cached_array(spec, lambda: good.copy())
    assert "unreadable cache entry" in caplog.text
    np.testing.assert_array_equal(out, good)
    np.testing.assert_array_equal(cache.read_array(path), good)  # rewritten whole
    path.write_bytes(b"garbage")
    assert cache.cache_load(spec) is None


def test_an_unwritable_folder_only_warns(monkeypatch, tmp_path, small, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QSHIFT_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="qshift.bench.cache"):
        out = world_data.domain_images(small, "source", workers=1, rows=[0, 2])
    assert out.shape[0] == 2 and "could not write cache entry" in caplog.text
    assert cache.cache_info()["entries"] == 0 and cache.cache_clear() == (0, 0)


def test_repeated_full_reads_come_from_memory_as_copies(cache_root, monkeypatch):
    spec = {"kind": "test", "name": "memo"}
    arr = np.arange(10_000, dtype=np.int32)
    path = cache.cache_store(spec, arr)
    calls = []
    real = cache.read_array
    monkeypatch.setattr(cache, "read_array", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = cache.cache_load(spec)
    first[:] = -1  # the caller's copy
    np.testing.assert_array_equal(cache.cache_load(spec), arr)
    np.testing.assert_array_equal(cache.cache_load(spec, np.array([5, 2])), arr[[5, 2]])
    assert calls == []
    cache.write_array(path, arr * 2)  # rewritten behind the memo's back (another process): a new file
    np.testing.assert_array_equal(cache.cache_load(spec), arr * 2)
    assert len(calls) == 1
    path.unlink()
    assert cache.cache_load(spec) is None  # evicted: not served from memory
