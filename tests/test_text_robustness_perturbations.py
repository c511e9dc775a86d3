"""The composed-image-retrieval robustness text corruptions of :mod:`qshift.shifts.text`: space_remove,
misspell, repeat, homophone — and the old perturbations' outputs, pinned from before they were added."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qshift.data.cir_world import TEXT_FAMILIES, generate_cir_world
from qshift.data.world import CELL_PHRASES, COLOURS, SHAPES, SIZES
from qshift.errors import UserError
from qshift.shifts import text as T

ROBUST = ("space_remove", "misspell", "repeat", "homophone")
WORDNET = Path(__file__).parent / "fixtures" / "wordnet"

_SPLIT = generate_cir_world(5, 40)
CIR_TEXTS = [t for family in TEXT_FAMILIES for t in _SPLIT.family_texts(family)]
REAL = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs sitting on a wooden bench in the park.",
    "A woman holding an umbrella while walking down a city street.",
    "A plate of food with broccoli and rice on a table.",
    "A red double decker bus driving down the road.",
    "A giraffe standing next to a tall tree in a field.",
    "Several people are flying kites on the beach.",
    "A little boy swinging a baseball bat at a ball.",
    "There is a large clock tower on the right side of the building.",
    "A black and white cat lying on a blue blanket.",
    "Four horses grazing in a green pasture near a fence.",
    "A young girl eating a slice of pizza at the kitchen table.",
    "An airplane flying through a clear blue sky.",
    "A bowl of fruit with bananas, apples and oranges.",
    "Two people playing tennis on a court at night.",
    "A brown bear walking through the tall grass.",
    "A train pulling into the station next to a platform.",
    "A small boat floating on the water near the shore.",
    "A man and a woman cutting a wedding cake together.",
    "A stop sign on the corner of a quiet street.",
]
CORPUS = CIR_TEXTS + REAL
SPLIT_WORD = re.compile(r"(\W*)(.*?)(\W*)", re.DOTALL)


def _core(token):
    return SPLIT_WORD.fullmatch(token).groups()


def _budget(text, level):
    return max(1, round(0.05 * level * len(text.split())))


def _misspell_changes(orig, out):
    """Positions whose word changed; asserts each is one of the word's misspellings, punctuation kept."""
    a, b = orig.split(), out.split()
    assert len(a) == len(b)
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    for i in changed:
        (p0, w0, s0), (p1, w1, s1) = _core(a[i]), _core(b[i])
        assert (p0, s0) == (p1, s1) and w1 in T.misspellings(w0) and w1 != w0
    return changed


def _homophone_changes(orig, out):
    a, b = orig.split(), out.split()
    assert len(a) == len(b)
    changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    for i in changed:
        (p0, w0, s0), (p1, w1, s1) = _core(a[i]), _core(b[i])
        assert (p0, s0) == (p1, s1)
        assert w1.lower() in T.HOMOPHONES[w0.lower()], (w0, w1)
        assert w1[:1].isupper() == w0[:1].isupper()
    return changed


def _is_stretch(word, new):
    return any(word[:j] + word[j] * 3 + word[j + 1:] == new for j in range(len(word)) if word[j].isalpha())


def _repeat_changes(orig, out):
    """Align ``out`` with ``orig``: each word is kept, said twice, or has a letter stretched to three."""
    a, b = orig.split(), out.split()
    j, twice, stretched = 0, 0, 0
    for tok in a:
        pre, word, post = _core(tok)
        if word and b[j:j + 2] == [pre + word, word + post]:
            twice, j = twice + 1, j + 2
        elif b[j] == tok:
            j += 1
        else:
            p1, w1, s1 = _core(b[j])
            assert (p1, s1) == (pre, post) and _is_stretch(word, w1), (tok, b[j])
            stretched, j = stretched + 1, j + 1
    assert j == len(b)
    return twice, stretched


def _changed(name, orig, out):
    if name == "space_remove":
        assert out.replace(" ", "") == orig.replace(" ", "")
        return len(orig.split()) - len(out.split())
    if name == "misspell":
        return len(_misspell_changes(orig, out))
    if name == "homophone":
        return len(_homophone_changes(orig, out))
    return sum(_repeat_changes(orig, out))


def test_the_tuples():
    assert T.ROBUSTNESS_PERTURBATIONS == ROBUST
    assert T.TEXT_PERTURBATIONS == T.CHAR_PERTURBATIONS + T.WORD_PERTURBATIONS and len(T.TEXT_PERTURBATIONS) == 11
    assert not set(ROBUST) & set(T.TEXT_PERTURBATIONS)
    assert T.ALL_TEXT_PERTURBATIONS == T.TEXT_PERTURBATIONS + ROBUST
    for name in ROBUST:
        assert T.real_lexicon_key(name) == "none"
        assert T.describe(name)["rate"] == "0.05 × level of the words"


@pytest.mark.parametrize("name", ROBUST)
def test_deterministic_and_seeded(name):
    texts = CORPUS[:60]
    ids = range(len(texts))
    a = T.perturb_texts(texts, name, 5, ids, seed=0)
    assert a == T.perturb_texts(texts, name, 5, ids, seed=0)
    assert a == [T.perturb_text(t, name, 5, i, seed=0) for t, i in zip(texts, ids)]
    b = T.perturb_texts(texts, name, 5, ids, seed=1)
    assert sum(x != y for x, y in zip(a, b)) > len(texts) // 4
    shifted = T.perturb_texts(texts, name, 5, [i + 1000 for i in ids], seed=0)
    assert shifted != a
    real = T.perturb_real_texts(REAL, name, 5, range(len(REAL)), seed=3)
    assert real == [T.perturb_real_text(t, name, 5, i, seed=3) for i, t in enumerate(REAL)]
    assert all(isinstance(x, str) and x.strip() for x in a + b + real)


@pytest.mark.parametrize("name", ROBUST)
def test_changes_cir_texts_and_real_captions(name):
    for texts, fn in ((CIR_TEXTS, T.perturb_text), (REAL, T.perturb_real_text)):
        for level in (1, 7):
            for k, text in enumerate(texts):
                out = fn(text, name, level, k)
                n = _changed(name, text, out)
                if name == "space_remove" and len(text.split()) < 2 or name == "homophone" and not any(
                        _core(w)[1].lower() in T.HOMOPHONES for w in text.split()):
                    assert out == text and n == 0  # nothing it can change: kept
                    continue
                assert out != text and 1 <= n <= _budget(text, level), (name, level, text, out)


@pytest.mark.parametrize("name", ROBUST)
def test_more_words_change_at_higher_levels(name):
    means = []
    for level in T.LEVELS:
        counts = [_changed(name, t, T.perturb_text(t, name, level, k, seed=2)) for k, t in enumerate(CORPUS)]
        means.append(np.mean(counts))
    assert all(x <= y for x, y in zip(means, means[1:])), means
    assert means[-1] > 1.5 * means[0], means


def test_space_remove_merges_words_and_keeps_letters():
    text = "the large red circle is in the top left corner now"
    for level in T.LEVELS:
        for k in range(30):
            out = T.perturb_text(text, "space_remove", level, k)
            assert out.replace(" ", "") == text.replace(" ", "")
            assert len(out.split()) == len(text.split()) - min(_budget(text, level), len(text.split()) - 1)
    real = "A man riding  a wave, on top of a surfboard."
    out = T.perturb_real_text(real, "space_remove", 7, 0)
    assert out.replace(" ", "") == real.replace(" ", "") and out.count(" ") < real.count(" ") - 1
    assert T.perturb_text("circle", "space_remove", 7, 0) == "circle"  # no space to remove: kept


def test_misspellings_rules():
    for word in ["circle", "square", "red", "the", "sky", "gym", "and", "Phone", "RED", "it's", "top-left"] + \
            list(COLOURS) + list(SHAPES) + list(SIZES):
        variants = T.misspellings(word)
        assert variants and word not in variants and len(set(variants)) == len(variants)
        assert all(" " not in v for v in variants)
    assert "fone" in T.misspellings("phone") and "graf" in T.misspellings("graph")  # ph -> f
    assert "recieve" in T.misspellings("receive") and "beleive" in T.misspellings("believe")  # ie <-> ei
    assert "tomorow" in T.misspellings("tomorrow") and "untill" in T.misspellings("until")  # (un)doubled
    assert "mak" in T.misspellings("make") and "arrangment" in T.misspellings("arrangement")  # silent e
    assert "kat" in T.misspellings("cat") and "blak" in T.misspellings("black")  # c / ck -> k
    assert "nite" in T.misspellings("night") and "independant" in T.misspellings("independent")
    assert "Fone" in T.misspellings("Phone") and all(v.isupper() for v in T.misspellings("RED"))
    assert T.misspellings("an") == T.misspellings("a") == T.misspellings("->") == T.misspellings("") == ()
    assert T.misspellings("hello") == T.misspellings("hello")  # fixed order


def test_misspell_changes_only_chosen_words():
    text = "a small boy kicks the red ball across the green field near the old wooden fence"
    for level in T.LEVELS:
        for k in range(20):
            out = T.perturb_text(text, "misspell", level, k)
            changed = _misspell_changes(text, out)
            eligible = [i for i, w in enumerate(text.split()) if len(w) >= 3]
            assert set(changed) <= set(eligible)
            assert len(changed) == min(_budget(text, level), len(eligible))
    # short words only: nothing a misspelling can change, the text is kept
    assert T.perturb_text("a b an", "misspell", 7, 0) == "a b an"


def test_repeat_says_words_twice_or_stretches_letters():
    twice = stretched = 0
    for k, text in enumerate(CORPUS):
        out = T.perturb_text(text, "repeat", 6, k)
        t, s = _repeat_changes(text, out)
        assert t + s == min(_budget(text, 6), sum(any(c.isalnum() for c in w) for w in text.split()))
        twice, stretched = twice + t, stretched + s
    assert twice > 50 and stretched > 50
    outs = {T.perturb_real_text("Surfboard.", "repeat", 1, k) for k in range(40)}
    assert "Surfboard Surfboard." in outs and len(outs) > 3
    assert all(o == "Surfboard Surfboard." or o.endswith(".") and _is_stretch("Surfboard", o[:-1]) for o in outs)


def test_homophones_cover_the_world_and_come_from_the_table():
    vocab = set(COLOURS) | set(SHAPES) | set(SIZES) | {"big", "little"}
    vocab |= {w for phrase in CELL_PHRASES.values() for w in phrase.split() if w not in ("a", "an", "at", "on")}
    words = {w for fam in TEXT_FAMILIES.values() for opts in fam.values() for o in opts for w in o.split()}
    words = {w.strip("?,") for w in words if not w.startswith("{") and re.fullmatch(r"[a-z?,]+", w)}
    missing_world = sorted(w for w in vocab if w not in T.HOMOPHONES)
    assert not missing_world, missing_world
    template_missing = sorted(w for w in words if w not in T.HOMOPHONES)
    assert len(template_missing) <= 6, template_missing  # function words like "a", "and", "at", "on"
    for pair in [("red", "read"), ("two", "too"), ("right", "write"), ("blue", "blew"), ("the", "thee"),
                 ("there", "their"), ("for", "four"), ("heart", "hart")]:
        assert pair[1] in T.HOMOPHONES[pair[0]]
    for word, hs in T.HOMOPHONES.items():
        assert hs and word not in hs and all(" " not in h and h == h.lower() for h in hs)
    assert T.homophones("The") == ("Thee",) and T.homophones("zebra") == ()
    for k, text in enumerate(CORPUS):
        out = T.perturb_text(text, "homophone", 7, k)
        _homophone_changes(text, out)
    assert T.perturb_text("zebra zebra", "homophone", 7, 0) == "zebra zebra"  # no homophone: kept
    assert T.perturb_text("zebra two zebra", "homophone", 1, 0) in ("zebra too zebra", "zebra to zebra")


@pytest.mark.parametrize("name", ROBUST)
def test_errors_like_the_others(name):
    with pytest.raises(ValueError, match="empty"):
        T.perturb_text("  ", name, 1, 0)
    with pytest.raises(ValueError, match="empty"):
        T.perturb_real_text("", name, 1, 0)
    with pytest.raises(ValueError, match="level"):
        T.perturb_text("a b", name, 0, 0)
    with pytest.raises(ValueError, match="3 texts but 2"):
        T.perturb_real_texts(["a", "b", "c"], name, 1, [0, 1])
    assert T.perturb_text("x", name, 7, 0).strip()


def test_unknown_name_lists_all():
    with pytest.raises(ValueError, match="unknown text perturbation") as e:
        T.perturb_text("a b", "shout", 1, 0)
    for name in T.ALL_TEXT_PERTURBATIONS:
        assert name in str(e.value)


def test_materialize_text_writes_robustness_perturbations(tmp_path):
    root = tmp_path / "data"
    ds = SimpleNamespace(name="coco", image_paths=[str(root / "a.jpg"), str(root / "b.jpg")],
                         captions=REAL[:4], caption_image=[0, 0, 1, 1])
    paths = T.materialize_text(ds, root, tmp_path / "out", ["space_remove", "homophone"], [2], "test.json")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == ["space_remove/2/test.json",
                                                                             "homophone/2/test.json"]
    entries = json.loads(paths[1].read_text())
    assert entries[0]["caption"] == [T.perturb_real_text(c, "homophone", 2, k) for k, c in enumerate(REAL[:2])]
    tcr = T.materialize_text(ds, root, tmp_path / "tcr", ["misspell"], [1], "test.json", layout="tcr")
    assert tcr[0].relative_to(tmp_path / "tcr").as_posix() == "coco-TP/annotation_misspell/1/test.json"
    with pytest.raises(UserError, match="space_remove, misspell, repeat, homophone"):
        T.materialize_text(ds, root, tmp_path / "x", ["shout"], [1], "test.json")


# outputs of the old perturbations computed with the code from before the robustness corruptions were added
PINNED_WORLD = {  # perturb_text("make the small red star blue", name, 5, 7, seed=0)
    "keyboard": "majd the shqll red star blue",
    "ocr": "make the 8mal1 ked star blue",
    "char_insert": "make the smlacll red star _bhlue",
    "char_substitute": "make the sefll red star %$ue",
    "char_swap": "akme the small red star lbeu",
    "char_delete": "make the sma red ar blue",
    "synonym_replace": "make the tiny red star azure",
    "word_insert": "pentagram make the scarlet small red star blue",
    "word_swap": "make the small star blue red",
    "word_delete": "the small red",
    "insert_punctuation": "make , the small red star blue ?",
}
PINNED_REAL = {  # perturb_real_text("A man riding a wave on top of a surfboard.", name, 6, 3, seed=1), fixture WordNet
    "keyboard": "A man riwkng a wagd on top of a skrbboatd.",
    "char_swap": "A man riding a awev on top of a usrfborda.",
    "word_swap": "on man riding of a A top wave a surfboard.",
    "insert_punctuation": "A man riding a wave on : . . top of a surfboard.",
    "word_delete": "A man riding wave on top a surfboard.",
    "synonym_replace": "A mankind riding a brandish on tip of a surfboard.",
    "word_insert": "A undulate man riding a wave surf on crown top of a surfboard.",
}


def test_old_perturbations_are_unchanged(monkeypatch):
    assert set(PINNED_WORLD) == set(T.TEXT_PERTURBATIONS)
    for name, expected in PINNED_WORLD.items():
        assert T.perturb_text("make the small red star blue", name, 5, 7, seed=0) == expected, name
    monkeypatch.setenv("QSHIFT_WORDNET", str(WORDNET))
    for name, expected in PINNED_REAL.items():
        assert T.perturb_real_text("A man riding a wave on top of a surfboard.", name, 6, 3, seed=1) == expected, name
