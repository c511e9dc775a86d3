"""Real-dataset formats (BLIP / TCR, Karpathy, COCO captions, the others), fingerprints, and the image
pipeline: data-loader workers, bit-identical to the one-by-one path, cached under a complete key."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from qshift.bench import cache
from qshift.bench.registry import build_benchmark
from qshift.data import pipeline
from qshift.data.karpathy import CorruptedImages, ImageTextDataset, detect_format, load_karpathy
from qshift.data.retrieval_datasets import convert_annotation, load_dataset, main as datasets_main
from qshift.errors import UserError

COCO_CAPTIONS = [[f"A {c} dog on the mat, photo {i}-{k}." for k in range(6 if i % 2 == 0 else 5)]
                 for i, c in enumerate(("red", "blue", "green", "pink", "brown"))]


@pytest.fixture
def cache_root(monkeypatch, tmp_path):
    root = tmp_path / "cache"
    monkeypatch.setenv("QSHIFT_CACHE", str(root))
    monkeypatch.delenv("QSHIFT_CACHE_MAX_MB", raising=False)
    monkeypatch.delenv(pipeline.WORKERS_ENV, raising=False)
    return root


def _jpeg(path, seed: int, shape=(44, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path, quality=90)


def coco_root(root):
    """Five COCO val2014 images (sizes differ) in three annotation formats, plus one train image."""
    names = [f"COCO_val2014_{100 + i:012d}.jpg" for i in range(len(COCO_CAPTIONS))]
    for i, n in enumerate(names):
        _jpeg(root / "val2014" / n, i, (40 + 3 * i, 56 - 2 * i))
    blip = [{"image": f"val2014/{n}", "caption": caps} for n, caps in zip(names, COCO_CAPTIONS)]
    (root / "coco_karpathy_test.json").write_text(json.dumps(blip))
    images = [{"filepath": "val2014", "filename": n, "split": "test", "cocoid": 100 + i, "imgid": i,
               "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i} for c in caps]}
              for i, (n, caps) in enumerate(zip(names, COCO_CAPTIONS))]
    images.insert(2, {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train",
                      "sentences": [{"raw": "not in the test split", "tokens": []}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    coco = {"images": [{"id": 100 + i, "file_name": n, "width": 1, "height": 1} for i, n in enumerate(names)],
            "annotations": [{"image_id": 100 + i, "id": 10 * i + k, "caption": c}
                            for k in range(6) for i, caps in enumerate(COCO_CAPTIONS) if k < len(caps)
                            for c in [caps[k]]]}  # interleaved across images, as COCO's files are
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    return root


def flickr_root(root):
    for i in range(3):
        _jpeg(root / "flickr30k-images" / f"{1000 + i}.jpg", 10 + i)
    caps = [[f"Someone walking a {c} horse {k}" for k in range(5)] for c in ("black", "white", "brown")]
    (root / "flickr30k_test.json").write_text(json.dumps(
        [{"image": f"flickr30k-images/{1000 + i}.jpg", "caption": c} for i, c in enumerate(caps)]))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": f"{1000 + i}.jpg", "split": "test", "sentences": [{"raw": s, "tokens": s.split()} for s in c]}
        for i, c in enumerate(caps)]}))
    return root


def _same(a: ImageTextDataset, b: ImageTextDataset) -> None:
    assert a.image_paths == b.image_paths and a.captions == b.captions
    assert a.caption_image.tolist() == b.caption_image.tolist() and a.image_ids.tolist() == b.image_ids.tolist()


# ------------------------------------------------------------------------------------ formats

def test_coco_in_three_formats_gives_the_same_images_and_captions(tmp_path):
    root = coco_root(tmp_path / "coco")
    blip = load_dataset("coco", root)
    karpathy = load_dataset("coco", root, root / "dataset_coco.json")
    captions = load_dataset("coco", root, root / "annotations" / "captions_val2014.json")
    assert [d.format for d in (blip, karpathy, captions)] == ["blip", "karpathy", "coco-captions"]
    assert len(blip) == 5 and len(blip.captions) == 25  # the first five captions of each image
    assert blip.captions[0] == "a red dog on the mat, photo 0-0"
    _same(blip, karpathy)
    _same(blip, captions)
    fp = karpathy.fingerprint
    assert fp["dataset"] == "coco" and fp["format"] == "karpathy" and fp["annotation"] == "dataset_coco.json"
    assert fp["n_images"] == 5 and fp["n_captions"] == 25 and len(fp["annotation_sha256"]) == 64
    assert fp["annotation_sha256"] != blip.fingerprint["annotation_sha256"]
    # Karpathy's file is found by itself when the BLIP file is absent
    (root / "coco_karpathy_test.json").unlink()
    assert load_dataset("coco", root).format == "karpathy"
    assert len(load_dataset("coco", root, root / "dataset_coco.json", check_images=False, split="train")) == 1


def test_flickr_in_blip_and_karpathy_formats(tmp_path):
    root = flickr_root(tmp_path / "flickr")
    blip, karpathy = load_karpathy("flickr", root), load_karpathy("flickr", root, root / "dataset_flickr30k.json")
    _same(blip, karpathy)  # Karpathy's bare file names are found under flickr30k-images/
    assert len(blip.captions) == 15 and blip.image_paths[0] == root / "flickr30k-images" / "1000.jpg"


def test_existing_formats_still_load_with_fingerprints(tmp_path):
    pytest.importorskip("h5py")
    from backbone_fixtures import tiny_fashiongen, tiny_nocaps, tiny_pedes

    pedes = load_dataset("cuhk-pedes", tiny_pedes(tmp_path / "cuhk"))
    assert pedes.format == "pedes" and pedes.image_ids.tolist() == [0, 0, 1, 1, 2, 2]
    nocaps = load_dataset("nocaps-out", tiny_nocaps(tmp_path / "nocaps"))
    assert nocaps.format == "coco-captions" and len(nocaps) == 2 and nocaps.fingerprint["n_captions"] == 6
    fg = load_dataset("fashiongen", tiny_fashiongen(tmp_path / "fg"))
    assert fg.fingerprint["format"] == "fashiongen-h5" and fg.fingerprint["n_images"] == 4
    assert len(fg.fingerprint["annotation_sha256"]) == 64


def test_unrecognised_or_wrong_files_name_the_accepted_formats(tmp_path):
    root = coco_root(tmp_path / "coco")
    (root / "odd.json").write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(UserError, match="unrecognised JSON layout.*blip.*karpathy.*coco-captions"):
        load_dataset("coco", root, root / "odd.json")
    (root / "pedes.json").write_text(json.dumps([{"id": 1, "file_path": "a.jpg", "captions": ["x"]}]))
    with pytest.raises(UserError, match="the pedes format; coco accepts"):
        load_dataset("coco", root, root / "pedes.json")
    with pytest.raises(UserError, match="cuhk-pedes accepts pedes"):
        load_dataset("cuhk-pedes", root, root / "coco_karpathy_test.json")
    with pytest.raises(UserError, match="for 'coco', not 'flickr'"):
        load_dataset("flickr", root, root / "dataset_coco.json")
    with pytest.raises(UserError, match="no images with split == 'nope'.*'test', 'train'"):
        load_dataset("coco", root, root / "dataset_coco.json", split="nope")
    (root / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_dataset("coco", root, root / "broken.json")
    assert detect_format([]) is None and detect_format({"images": []}) is None


def test_convert_writes_a_blip_file_that_loads_the_same(tmp_path):
    root = coco_root(tmp_path / "coco")
    out = root / "converted.json"
    assert convert_annotation(root / "dataset_coco.json", out, "coco", data_root=root) == 5
    entries = json.loads(out.read_text())
    assert detect_format(entries) == "blip" and entries[0]["image"] == "val2014/COCO_val2014_000000000100.jpg"
    assert entries[0]["caption"] == COCO_CAPTIONS[0]  # raw, every caption
    _same(load_dataset("coco", root, out), load_dataset("coco", root))
    assert datasets_main(["convert", str(root / "annotations" / "captions_val2014.json"), str(root / "c2.json"),
                          "--data-root", str(root)]) == 0
    _same(load_dataset("coco", root, root / "c2.json"), load_dataset("coco", root))
    assert datasets_main(["convert", str(root / "nope.json"), str(root / "c3.json")]) == 2


# ----------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("workers", [0, 2])
def test_the_pipeline_is_bit_identical_to_the_one_by_one_path(cache_root, tmp_path, workers):
    ds = load_dataset("coco", coco_root(tmp_path / "coco"))
    for c, s in (("gaussian_noise", 5), ("glass_blur", 5), ("jpeg_compression", 2)):
        old = CorruptedImages(ds.image_paths, c, s, seed=7)
        got = pipeline.query_images(ds, c, s, 7, workers=workers)
        assert len(got) == len(ds)
        for i in range(len(ds)):
            a = got[i]
            assert a.dtype == np.uint8 and a.shape == old[i].shape and np.array_equal(a, old[i]), (c, i)
        streamed = [a for _, a in pipeline.iter_images(ds, [4, 1], c, s, 7, workers=workers)]
        assert np.array_equal(streamed[0], old[4]) and np.array_equal(streamed[1], old[1])
    clean = pipeline.LazyImages(ds, rows=[3])
    assert np.array_equal(clean[0], np.asarray(Image.open(ds.image_paths[3]).convert("RGB")))


def test_images_inside_one_file_go_through_workers(cache_root, tmp_path):
    pytest.importorskip("h5py")
    from backbone_fixtures import tiny_fashiongen

    ds = load_dataset("fashiongen", tiny_fashiongen(tmp_path / "fg"))
    ds.image_reader(0)  # the parent has the file open before the workers fork
    got = pipeline.query_images(ds, "shot_noise", 2, 0, workers=2)
    old = CorruptedImages(ds.image_paths, "shot_noise", 2, 0, reader=ds.image_reader)
    assert all(np.array_equal(got[i], old[i]) for i in range(len(ds)))
    assert pickle.loads(pickle.dumps(ds.image_reader))(3).shape == (32, 32, 3)


def _no_decoding(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decoded although the set is cached")
    monkeypatch.setattr(pipeline, "read_image", boom)


def test_a_cache_hit_is_identical_and_every_key_part_counts(cache_root, tmp_path, monkeypatch):
    ds = load_dataset("coco", coco_root(tmp_path / "coco"))
    first = pipeline.query_images(ds, "gaussian_noise", 3, 1, workers=0)
    first = [first[i] for i in range(len(ds))]
    (entry,) = cache_root.glob(f"realimg-*{cache.SUFFIX}")
    spec = json.loads(entry.with_suffix(".json").read_text())
    assert spec["annotation_sha256"] == ds.annotation_digest() and spec["severity"] == 3 and spec["shift_seed"] == 1
    with monkeypatch.context() as m:
        _no_decoding(m)
        again = pipeline.query_images(ds, "gaussian_noise", 3, 1, workers=0)
        assert all(np.array_equal(again[i], first[i]) for i in range(len(ds)))
        part = pipeline.query_images(ds, "gaussian_noise", 3, 1, rows=[4, 0])  # served from the full entry
        assert np.array_equal(part[0], first[4]) and np.array_equal(part[1], first[0])
        other = ImageTextDataset(ds.name, ds.image_paths, ds.captions, ds.caption_image, annotation=ds.annotation,
                                 format=ds.format, annotation_sha256="0" * 64)
        for args, kw in ((("gaussian_noise", 3, 2), {}), (("gaussian_noise", 4, 1), {}),
                         (("shot_noise", 3, 1), {}), (("gaussian_noise", 3, 1), {"size": 24})):
            with pytest.raises(AssertionError, match="decoded although"):
                pipeline.query_images(ds, *args, workers=0, **kw)
        with pytest.raises(AssertionError, match="decoded although"):
            pipeline.query_images(other, "gaussian_noise", 3, 1, workers=0)
    # a subset not covered by a full entry is built alone, and cached under its rows
    sub = pipeline.query_images(ds, "gaussian_noise", 3, 9, rows=[2], workers=0)
    assert np.array_equal(sub[0], CorruptedImages(ds.image_paths, "gaussian_noise", 3, 9)[2])
    assert len(list(cache_root.glob(f"realimg-*{cache.SUFFIX}"))) == 2
    sized = pipeline.query_images(ds, "gaussian_noise", 3, 1, rows=[1], size=24, workers=0)
    assert sized[0].shape == (24, 24, 3)


def test_workers_setting_and_the_cache_off(cache_root, tmp_path, monkeypatch):
    assert pipeline.default_workers() >= 1
    monkeypatch.setenv(pipeline.WORKERS_ENV, "3")
    assert pipeline.default_workers() == 3 and pipeline.resolve_workers(0) == 0
    monkeypatch.setenv(pipeline.WORKERS_ENV, "many")
    with pytest.raises(UserError, match="QSHIFT_WORKERS"):
        pipeline.default_workers()
    monkeypatch.setenv(pipeline.WORKERS_ENV, "0")
    ds = load_dataset("coco", coco_root(tmp_path / "coco"))
    with pytest.raises(UserError, match="unknown corruption"):
        pipeline.query_images(ds, "melting", 3)
    monkeypatch.setenv("QSHIFT_CACHE", "off")
    got = pipeline.query_images(ds, "contrast", 2, 0)
    assert not got.path.exists()  # a temporary file, already unlinked; the open handle still reads it
    assert np.array_equal(got[2], CorruptedImages(ds.image_paths, "contrast", 2, 0)[2])
    with pytest.raises(TypeError, match="cannot be sent"):
        pickle.dumps(got)
    assert not cache_root.exists()


def test_ragged_entries_round_trip_and_bad_files_are_rebuilt(cache_root, tmp_path, caplog):
    noise = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    flat = np.zeros((300, 200, 3), np.uint8)
    items = [np.arange(k * 6, dtype=np.uint8).reshape(k, 2, 3) for k in (1, 5, 3)] + [noise, flat]
    assert cache.compress_item(noise)[:1] == b"R" and cache.compress_item(flat)[:1] == b"Z"  # raw when zlib saves little
    with cache.RaggedWriter(tmp_path / f"r{cache.SUFFIX}", np.uint8) as w:
        for a in items:
            w.add(a)
    back = cache.RaggedArrays(tmp_path / f"r{cache.SUFFIX}")
    assert len(back) == 5 and all(np.array_equal(back[i], a) for i, a in enumerate(items))
    assert np.array_equal(pickle.loads(pickle.dumps(back))[-1], items[-1])
    with pytest.raises(TypeError):
        w2 = cache.RaggedWriter(tmp_path / f"s{cache.SUFFIX}", np.uint8)
        w2.add(np.zeros(3, np.float32))
    w2.abort()
    assert not list(tmp_path.glob("*.tmp"))
    ds = load_dataset("coco", coco_root(tmp_path / "coco"))
    pipeline.query_images(ds, "fog", 1, workers=0)
    (entry,) = cache_root.glob(f"realimg-*{cache.SUFFIX}")
    entry.write_bytes(entry.read_bytes()[:-3])  # truncated
    assert "unreadable cache entry" not in caplog.text
    again = pipeline.query_images(ds, "fog", 1, workers=0)
    assert "unreadable cache entry" in caplog.text
    assert np.array_equal(again[0], CorruptedImages(ds.image_paths, "fog", 1, 0)[0])
    assert cache.cache_info()["kinds"]["realimg"]["entries"] == 1


def test_real_benchmarks_build_only_the_queries_they_keep(cache_root, tmp_path):
    ds = load_dataset("coco", coco_root(tmp_path / "coco"))
    full = build_benchmark("coco-c/i2t/pixelate/4", shift_seed=2, dataset=ds, workers=0)
    sub = build_benchmark("coco-c/i2t/pixelate/4", shift_seed=2, dataset=ds, max_queries=2, workers=0)
    old = full.query_sets[0].subset(2)
    assert sub.query_sets[0].ids.tolist() == old.ids.tolist() == sub.clean_queries.ids.tolist()
    for a, b in zip(sub.query_sets[0].items, old.items):
        assert np.array_equal(a, b)
    ref = CorruptedImages(ds.image_paths, "pixelate", 4, 2)
    assert all(np.array_equal(full.query_sets[0].items[i], ref[i]) for i in range(len(ds)))
    t2i = build_benchmark("coco-c/t2i/keyboard/3", shift_seed=1, dataset=ds, max_queries=4)
    t2i_full = build_benchmark("coco-c/t2i/keyboard/3", shift_seed=1, dataset=ds).subsample(4)
    assert t2i.query_sets[0].items == t2i_full.query_sets[0].items
    assert t2i.query_sets[0].ids.tolist() == t2i_full.query_sets[0].ids.tolist()
    assert list(cache_root.glob(f"realperturb-*{cache.SUFFIX}"))
    clean = build_benchmark("coco/i2t", dataset=ds, max_queries=3)
    assert len(clean.query_sets[0]) == 3 and len(clean.gallery) == 25
