"""Text perturbations for caption queries, after the MM_Robustness recipe used by COCO-C / Flickr-C.

* character level (``nlpaug``): keyboard, ocr, char_insert, char_substitute, char_swap, char_delete —
  level 1–7 perturbs each word with probability 0.05·level;
* word level (EDA-style, implemented here): synonym_replace, word_insert, word_swap, word_delete,
  insert_punctuation — rate 0.05·level of the words;
* sentence level (the embedded world only): caption styles the source model never saw — see
  ``qshift.data.world.HELD_OUT_FAMILIES``; they are generated from the scene, not from a caption.

Every perturbation is deterministic by (item id, perturbation, level, seed).
"""
from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHAR_PERTURBATIONS: tuple[str, ...] = ("keyboard", "ocr", "char_insert", "char_substitute", "char_swap", "char_delete")
WORD_PERTURBATIONS: tuple[str, ...] = ("synonym_replace", "word_insert", "word_swap", "word_delete", "insert_punctuation")
TEXT_PERTURBATIONS: tuple[str, ...] = CHAR_PERTURBATIONS + WORD_PERTURBATIONS
LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
PUNCTUATION: tuple[str, ...] = (".", ",", "!", "?", ";", ":")

#: synonyms for the embedded world's vocabulary (words the source model saw → words it may not have)
WORLD_SYNONYMS: dict[str, tuple[str, ...]] = {
    "large": ("big", "huge", "sizable"), "big": ("large", "huge", "sizable"),
    "small": ("little", "tiny", "compact"), "little": ("small", "tiny", "compact"),
    "circle": ("disc", "round"), "square": ("box", "quadrate"), "triangle": ("trigon",),
    "star": ("pentagram",), "heart": ("love heart",), "diamond": ("rhombus", "lozenge"),
    "cross": ("plus", "plus sign"), "crescent": ("moon", "sickle"),
    "red": ("crimson", "scarlet"), "orange": ("amber", "tangerine"), "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"), "cyan": ("turquoise", "aqua"), "blue": ("navy", "azure"),
    "purple": ("violet", "lilac"), "pink": ("rose", "magenta"),
    "picture": ("photo", "image"), "image": ("picture", "photo"), "shape": ("object", "figure"),
    "shapes": ("objects", "figures"), "showing": ("depicting", "displaying"), "center": ("middle", "centre"),
    "top": ("upper part", "upper side"), "bottom": ("lower part", "lower side"), "corner": ("angle",),
    "left": ("left side",), "right": ("right side",), "above": ("over", "on top of"), "below": ("under", "beneath"),
    "alone": ("by itself", "on its own"), "single": ("lone", "sole"), "only": ("sole",),
}
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")


def perturbation_seed(item_id: int, perturbation: str, level: int, seed: int) -> int:
    key = f"{int(item_id)}|{perturbation}|{int(level)}|{int(seed)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


@contextmanager
def _seeded(s: int):
    """Seed python's and numpy's global generators (nlpaug uses both), then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(s)
    np.random.seed(s)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# ----------------------------------------------------------------------------- character level

@lru_cache(maxsize=64)
def _char_augmenter(name: str, level: int):
    try:
        import nlpaug.augmenter.char as nac
    except ImportError as e:  # pragma: no cover - a dependency of qshift
        raise ImportError("character-level perturbations need nlpaug: pip install nlpaug") from e
    p = 0.05 * level
    common = {"aug_word_p": p, "aug_word_max": 1000}
    if name == "keyboard":
        return nac.KeyboardAug(include_special_char=False, include_numeric=False, include_upper_case=False, **common)
    if name == "ocr":
        return nac.OcrAug(**common)
    action = name.split("_", 1)[1]
    return nac.RandomCharAug(action=action, include_upper_case=False, include_numeric=False, **common)


def _nlpaug_text(out) -> str:
    return out[0] if isinstance(out, list) else out


# ----------------------------------------------------------------------------------- word level

SynonymLookup = Callable[[str], tuple[str, ...]]


def world_synonyms(word: str) -> tuple[str, ...]:
    """Synonyms from the built-in table of the embedded world's vocabulary."""
    return WORLD_SYNONYMS.get(word.lower(), ())


@lru_cache(maxsize=1)
def _wordnet_reader(path: str):
    root = Path(path)
    if not (root / "data.noun").is_file():
        raise FileNotFoundError(
            f"WordNet data not found in {root}: install it with `apt-get install wordnet-base` "
            "(or pass the folder holding data.noun / index.noun), and `pip install nltk`")
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise ImportError("WordNet synonyms need nltk: pip install nltk") from e
    return WordNetCorpusReader(str(root), None)


def wordnet_synonyms(path: str | Path = DEFAULT_WORDNET_DIR) -> SynonymLookup:
    """A synonym lookup over an offline WordNet 3.0 folder (Debian's ``wordnet-base``)."""
    reader = _wordnet_reader(str(path))

    @lru_cache(maxsize=100_000)
    def lookup(word: str) -> tuple[str, ...]:
        names = {l.name().replace("_", " ").lower() for s in reader.synsets(word) for l in s.lemmas()}
        names.discard(word.lower())
        return tuple(sorted(names))

    return lookup


def _eda(words: list[str], op: str, rate: float, rng: random.Random, synonyms: SynonymLookup) -> list[str]:
    n = len(words)
    k = max(1, round(rate * n))
    words = list(words)
    if op == "synonym_replace":
        order = [i for i in rng.sample(range(n), n) if synonyms(words[i])]
        for i in order[:k]:
            words[i] = rng.choice(synonyms(words[i]))
    elif op == "word_insert":
        for _ in range(k):
            with_syn = [w for w in words if synonyms(w)]
            if not with_syn:
                break
            words.insert(rng.randrange(len(words) + 1), rng.choice(synonyms(rng.choice(with_syn))))
    elif op == "word_swap":
        for _ in range(k):
            if len(words) < 2:
                break
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "word_delete":
        kept = [w for w in words if rng.random() >= rate]
        words = kept if kept else [rng.choice(words)]
    elif op == "insert_punctuation":
        for _ in range(k):
            words.insert(rng.randrange(len(words) + 1), rng.choice(PUNCTUATION))
    else:  # pragma: no cover - guarded by perturb_text
        raise ValueError(op)
    return words


def perturb_text(text: str, perturbation: str, level: int, item_id: int, seed: int = 0,
                 synonyms: SynonymLookup | None = None) -> str:
    """Perturb one caption deterministically; returns a non-empty string.

    ``synonyms`` is used by ``synonym_replace`` and ``word_insert`` (default: the world's table).
    """
    if perturbation not in TEXT_PERTURBATIONS:
        raise ValueError(f"unknown text perturbation {perturbation!r}; known: {', '.join(TEXT_PERTURBATIONS)}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"cannot perturb an empty caption (item {item_id}): {text!r}")
    s = perturbation_seed(item_id, perturbation, level, seed)
    if perturbation in CHAR_PERTURBATIONS:
        with _seeded(s):
            out = _nlpaug_text(_char_augmenter(perturbation, level).augment(text))
    else:
        words = text.split()
        out = " ".join(_eda(words, perturbation, 0.05 * level, random.Random(s), synonyms or world_synonyms))
    if not out or not out.strip():
        log.warning("perturbation %s/%d emptied item %s; keeping the clean caption", perturbation, level, item_id)
        return text
    return out


def perturb_texts(texts: list[str], perturbation: str, level: int, item_ids, seed: int = 0,
                  synonyms: SynonymLookup | None = None) -> list[str]:
    """Perturb a list of captions; caption ``k`` is seeded by ``item_ids[k]``."""
    ids = list(item_ids)
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} item ids")
    return [perturb_text(t, perturbation, level, i, seed, synonyms) for t, i in zip(texts, ids)]


def describe(perturbation: str) -> Mapping[str, str]:
    kind = "character" if perturbation in CHAR_PERTURBATIONS else "word"
    return {"name": perturbation, "kind": kind, "rate": "0.05 × level of the words"}
