"""FashionIQ and CIRR — the real composed-image-retrieval (CIR) datasets — from their released files.

**FashionIQ** (Wu et al., 2021), under the data root::

    captions/cap.<category>.<split>.json      [{"target": name, "candidate": name, "captions": [c1, c2]}, ...]
    image_splits/split.<category>.<split>.json [name, ...]   (the category's gallery for that split)
    images/<name>.png                          (or .jpg / .jpeg)

``category`` is ``dress``, ``shirt`` or ``toptee``; the query is (candidate image, text) and the text joins
the two relative captions as CLIP4Cir does (:func:`fashioniq_text`): the first stripped of the characters
``.?, `` at both ends and capitalised (``str.capitalize``: first letter upper, the rest lower case), then
``" and "``, then the second stripped the same way.  The gallery is the split's image list; the reference is
*kept* in the ranking (FashionIQ's protocol: :func:`qshift.retrieval.cir_metrics.fashioniq_metrics`, R@10 /
R@50).  The test split's entries may lack ``target`` (target row -1).

**CIRR** (Liu et al., 2021), under the data root::

    captions/cap.rc2.<split>.json      [{"pairid", "reference", "target_hard", "target_soft", "caption",
                                         "img_set": {"id", "members": [name × 6]}}, ...]
    image_splits/split.rc2.<split>.json {name: "./dev/<name>.png", ...}

(``split``: ``train``, ``val`` or ``test1``; test1 entries have no ``target_hard`` / ``target_soft``).  Image
paths are the split file's, relative to the data root or to ``<root>/img_raw`` (the official layout; the
CLIP4Cir layout has ``dev/`` … at the root).  The gallery is the split's images; each query's reference is
*removed* from its ranking (``exclude``) and its subset is the ``img_set`` members minus the reference
(``subsets``, -1 padded): CIRR's R@1/5/10/50 and R_s@1/2/3 (:func:`qshift.retrieval.cir_metrics.cirr_metrics`).

A *materialised* root (``qshift shifts materialize --dataset fashioniq|cirr``) is a drop-in data root: the
annotation files (perturbed captions, or copies), the corrupted reference images when the shift is on the
image side, and ``qshift-source.json`` naming the clean root, from which the gallery (and clean references)
are read.  Every mistake is a one-line :class:`~qshift.errors.UserError` naming the file and entry.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from qshift.atomic import atomic_path, write_text_atomic
from qshift.data.karpathy import read_rgb
from qshift.errors import UserError
from qshift.shifts.image import SEVERITIES, available_corruptions, corrupt_image
from qshift.shifts.text import ALL_TEXT_PERTURBATIONS, LEVELS, perturb_real_texts

FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
FASHIONIQ_SPLITS: tuple[str, ...] = ("train", "val", "test")
CIRR_SPLITS: tuple[str, ...] = ("train", "val", "test1")
CIRR_VERSION = "rc2"
CIR_DATASETS: tuple[str, ...] = ("fashioniq", "cirr")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: the marker a materialised root carries (see the module docstring)
SOURCE_MARKER = "qshift-source.json"
_STRIP = ".?, "


def fashioniq_text(captions: list[str]) -> str:
    """FashionIQ's two relative captions as one query text, as CLIP4Cir joins them:
    ``c1.strip(".?, ").capitalize() + " and " + c2.strip(".?, ")``."""
    return f"{captions[0].strip(_STRIP).capitalize()} and {captions[1].strip(_STRIP)}"


@dataclass
class CIRDataset:
    """One CIR split: per query its reference image, text, target / excluded gallery rows and subset.

    ``targets`` [Q] gallery rows (-1: unknown, CIRR test1 / FashionIQ test); ``exclude`` [Q] the row removed
    from the query's ranking (-1: none; CIRR's reference); ``subsets`` [Q, S] gallery rows of the query's
    group (-1 padding; CIRR's img_set minus the reference; None for FashionIQ); ``reference_rows`` [Q] the
    reference's gallery row.  ``pair_ids`` are CIRR's ``pairid`` (FashionIQ: the entry index)."""

    name: str
    split: str
    root: Path
    references: list[Path]
    reference_names: list[str]
    texts: list[str]
    targets: np.ndarray
    gallery_names: list[str]
    gallery_paths: list[Path]
    exclude: np.ndarray
    subsets: np.ndarray | None
    pair_ids: np.ndarray
    reference_rows: np.ndarray
    annotation_files: list[Path] = field(default_factory=list)
    category: str | None = None
    #: for text-side materialisation: each query's raw captions as the file lists them
    raw_captions: list[list[str]] = field(default_factory=list, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        q, n = len(self.texts), len(self.gallery_names)
        for key in ("targets", "exclude", "pair_ids", "reference_rows"):
            setattr(self, key, np.asarray(getattr(self, key), dtype=np.int64))
        if not (len(self.references) == len(self.reference_names) == q == len(self.targets) == len(self.exclude)
                == len(self.pair_ids) == len(self.reference_rows)) or len(self.gallery_paths) != n:
            raise ValueError(f"{self.label}: inconsistent query / gallery counts")
        if self.subsets is not None:
            self.subsets = np.asarray(self.subsets, dtype=np.int64).reshape(q, -1)

    @property
    def label(self) -> str:
        """``fashioniq/dress/val``, ``cirr/val``: what the split is, for messages."""
        return "/".join(x for x in (self.name, self.category, self.split) if x)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def captions(self) -> list[str]:
        """The query texts (the name the image-text datasets use, for code that counts captions)."""
        return self.texts

    @property
    def has_targets(self) -> bool:
        """Whether every query's target is known (not a test split)."""
        return bool(len(self.targets)) and bool((self.targets >= 0).all())

    def fingerprint(self) -> str:
        """SHA-256 of the annotation files read (names and bytes, in reading order)."""
        if self._digest is None:
            self._digest = files_digest(self.annotation_files)
        return self._digest


@dataclass
class FashionIQ:
    """FashionIQ's categories of one split, each a :class:`CIRDataset` (``dataset.category("dress")``); the
    categories whose caption file is present are loaded."""

    root: Path
    split: str
    categories: dict[str, CIRDataset]
    name: str = "fashioniq"

    def category(self, category: str) -> CIRDataset:
        """The :class:`CIRDataset` of ``category`` (a UserError naming the missing file if it was absent)."""
        if category not in FASHIONIQ_CATEGORIES:
            raise UserError(f"unknown FashionIQ category {category!r}; expected one of {', '.join(FASHIONIQ_CATEGORIES)}")
        if category not in self.categories:
            raise UserError(f"FashionIQ category {category!r} was not loaded: "
                            f"{self.root / 'captions' / f'cap.{category}.{self.split}.json'} is missing")
        return self.categories[category]

    @property
    def annotation_files(self) -> list[Path]:
        return [f for c in FASHIONIQ_CATEGORIES if c in self.categories for f in self.categories[c].annotation_files]

    def fingerprint(self) -> str:
        """SHA-256 of every annotation file read (names and bytes, categories in order)."""
        return files_digest(self.annotation_files)

    def __len__(self) -> int:
        return sum(len(d) for d in self.categories.values())

    @property
    def captions(self) -> list[str]:
        return [t for c in FASHIONIQ_CATEGORIES if c in self.categories for t in self.categories[c].texts]


def files_digest(files: list[Path]) -> str:
    """SHA-256 over the names and bytes of ``files``, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0")
        h.update(Path(f).read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ reading

def _root(data_root: str | Path, name: str) -> Path:
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"{name} data root not found: {root} (the folder holding captions/ and image_splits/)")
    return root


def _need(path: Path, what: str) -> Path:
    if not path.parent.is_dir():
        raise UserError(f"{what}: folder not found: {path.parent}")
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]})") from e


def read_source_marker(root: Path) -> tuple[Path, Path, dict]:
    """(folder the references are read from, folder the gallery is read from, the marker's content) of a data
    root: both ``root`` itself, unless it is a materialised root (:data:`SOURCE_MARKER`)."""
    marker = root / SOURCE_MARKER
    if not marker.is_file():
        return root, root, {}
    info = _json(marker)
    clean = Path(info.get("clean_root", "")) if isinstance(info, dict) else Path("")
    if not isinstance(info, dict) or not info.get("clean_root") or not clean.is_dir():
        raise UserError(f"{marker}: its clean_root {clean} is not a folder; the gallery images are read from there "
                        "(move the clean dataset back, or re-materialise)")
    return (root if info.get("references_here") else clean), clean, info


def _image_path(folder: Path, name: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: an empty caption (or not a string): {value!r}")
    return value


# ------------------------------------------------------------------------------ FashionIQ

def load_fashioniq_category(data_root: str | Path, category: str, split: str = "val",
                            check_images: bool = True) -> CIRDataset:
    """One FashionIQ category's split (see the module docstring for the files and the query text)."""
    if category not in FASHIONIQ_CATEGORIES:
        raise UserError(f"unknown FashionIQ category {category!r}; expected one of {', '.join(FASHIONIQ_CATEGORIES)}")
    if split not in FASHIONIQ_SPLITS:
        raise UserError(f"unknown FashionIQ split {split!r}; expected one of {', '.join(FASHIONIQ_SPLITS)}")
    root = _root(data_root, "FashionIQ")
    ref_root, gal_root, marker = read_source_marker(root)
    cap_file = _need(root / "captions" / f"cap.{category}.{split}.json", "FashionIQ captions")
    split_file = _need(root / "image_splits" / f"split.{category}.{split}.json", "FashionIQ image split")
    entries, names = _json(cap_file), _json(split_file)
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{split_file}: expected a JSON list of image names")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{cap_file}: expected a non-empty JSON list of {{'target', 'candidate', 'captions'}}")
    row = {n: i for i, n in enumerate(names)}
    if len(row) != len(names):
        raise UserError(f"{split_file}: an image name is listed twice")
    refs, texts, targets, raw = [], [], [], []
    for i, e in enumerate(entries):
        where = f"{cap_file}: entry {i}"
        if not isinstance(e, dict) or "candidate" not in e or not isinstance(e.get("captions"), list):
            raise UserError(f"{where} lacks 'candidate' or a 'captions' list: {str(e)[:80]}")
        if "target" not in e and split != "test":
            raise UserError(f"{where} lacks 'target' (only the test split may)")
        caps = e["captions"]
        if len(caps) != 2:
            raise UserError(f"{where}: expected two relative captions, got {len(caps)}")
        caps = [_text(c, where) for c in caps]
        for key in ("candidate", "target"):
            if key in e and e[key] not in row:
                raise UserError(f"{where}: the {key} image {e[key]!r} is not in {split_file.name}")
        refs.append(row[e["candidate"]])
        targets.append(row[e["target"]] if "target" in e else -1)
        texts.append(fashioniq_text(caps))
        raw.append(caps)
    gallery = _fashioniq_images(gal_root, names, check_images, split_file)
    ref_paths = gallery if ref_root == gal_root else _fashioniq_images(ref_root, names, False, split_file)
    ref_rows = np.asarray(refs, dtype=np.int64)
    files = [cap_file, split_file] + ([root / SOURCE_MARKER] if marker else [])
    return CIRDataset("fashioniq", split, root, [ref_paths[r] for r in refs], [names[r] for r in refs], texts,
                      np.asarray(targets, dtype=np.int64), list(names), gallery, np.full(len(refs), -1, np.int64),
                      None, np.arange(len(refs)), ref_rows, files, category, raw)


def _fashioniq_images(root: Path, names: list[str], check: bool, split_file: Path) -> list[Path]:
    folder = root / "images"
    if check and not folder.is_dir():
        raise UserError(f"FashionIQ images: folder not found: {folder}")
    paths = []
    for n in names:
        p = _image_path(folder, n)
        if p is None:
            if check:
                raise UserError(f"FashionIQ image {n!r} (listed in {split_file.name}) not found in {folder} "
                                f"as {' / '.join(n + s for s in IMAGE_SUFFIXES)}")
            p = folder / f"{n}.png"
        paths.append(p)
    return paths


def load_fashioniq(data_root: str | Path, split: str = "val", categories: tuple[str, ...] | None = None,
                   check_images: bool = True) -> FashionIQ:
    """FashionIQ's ``split``: the ``categories`` asked for (each must be present), or by default every
    category whose caption file exists under ``data_root`` (at least one)."""
    root = _root(data_root, "FashionIQ")
    if categories is None:
        categories = tuple(c for c in FASHIONIQ_CATEGORIES if (root / "captions" / f"cap.{c}.{split}.json").is_file())
        if not categories:
            raise UserError(f"FashionIQ: no caption file under {root / 'captions'} (expected "
                            f"cap.<{'|'.join(FASHIONIQ_CATEGORIES)}>.{split}.json)")
    return FashionIQ(root, split, {c: load_fashioniq_category(root, c, split, check_images) for c in categories})


# ------------------------------------------------------------------------------ CIRR

def load_cirr(data_root: str | Path, split: str = "val", annotation: str | Path | None = None,
              check_images: bool = True) -> CIRDataset:
    """CIRR's ``split`` (see the module docstring); ``annotation`` replaces ``captions/cap.rc2.<split>.json``."""
    if split not in CIRR_SPLITS:
        raise UserError(f"unknown CIRR split {split!r}; expected one of {', '.join(CIRR_SPLITS)}")
    root = _root(data_root, "CIRR")
    ref_root, gal_root, marker = read_source_marker(root)
    cap_file = _need(Path(annotation) if annotation is not None
                     else root / "captions" / f"cap.{CIRR_VERSION}.{split}.json", "CIRR captions")
    split_file = _need(root / "image_splits" / f"split.{CIRR_VERSION}.{split}.json", "CIRR image split")
    entries, table = _json(cap_file), _json(split_file)
    if not isinstance(table, dict) or not table or not all(isinstance(v, str) for v in table.values()):
        raise UserError(f"{split_file}: expected a JSON object {{image name: relative path}}")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{cap_file}: expected a non-empty JSON list of {{'pairid', 'reference', 'caption', ...}}")
    names = list(table)
    row = {n: i for i, n in enumerate(names)}
    with_targets = split != "test1"
    need = ("pairid", "reference", "caption", "img_set") + (("target_hard",) if with_targets else ())
    refs, texts, targets, sets, pairs, raw = [], [], [], [], [], []
    for i, e in enumerate(entries):
        where = f"{cap_file}: entry {i}"
        if not isinstance(e, dict) or any(k not in e for k in need):
            missing = [k for k in need if not isinstance(e, dict) or k not in e]
            raise UserError(f"{where} lacks {', '.join(repr(k) for k in missing)}")
        members = e["img_set"].get("members") if isinstance(e["img_set"], dict) else None
        if not isinstance(members, list) or not members:
            raise UserError(f"{where}: img_set has no 'members' list")
        try:
            pairs.append(int(e["pairid"]))
        except (TypeError, ValueError):
            raise UserError(f"{where}: pairid {e['pairid']!r} is not an integer") from None
        text = _text(e["caption"], where)
        for n in [e["reference"], *([e["target_hard"]] if with_targets else []), *members]:
            if n not in row:
                raise UserError(f"{where}: the image {n!r} is not in {split_file.name}")
        ref = row[e["reference"]]
        tgt = row[e["target_hard"]] if with_targets else -1
        if tgt == ref:
            raise UserError(f"{where}: the reference is the target ({e['reference']!r})")
        group = [row[m] for m in dict.fromkeys(members) if row[m] != ref]
        if with_targets and tgt not in group:
            raise UserError(f"{where}: the target {e['target_hard']!r} is not among the img_set members")
        refs.append(ref)
        targets.append(tgt)
        sets.append(group)
        texts.append(text)
        raw.append([e["caption"]])
    width = max(len(s) for s in sets)
    subsets = np.full((len(sets), width), -1, np.int64)
    for k, s in enumerate(sets):
        subsets[k, :len(s)] = s
    gallery = _cirr_images(gal_root, table, check_images, split_file)
    ref_paths = gallery if ref_root == gal_root else _cirr_images(ref_root, table, False, split_file,
                                                                  like=(gal_root, gallery))
    files = [cap_file, split_file] + ([root / SOURCE_MARKER] if marker else [])
    ref_rows = np.asarray(refs, dtype=np.int64)
    return CIRDataset("cirr", split, root, [ref_paths[r] for r in refs], [names[r] for r in refs], texts,
                      np.asarray(targets, dtype=np.int64), names, gallery, ref_rows.copy(), subsets,
                      np.asarray(pairs, dtype=np.int64), ref_rows, files, None, raw)


def _cirr_images(root: Path, table: dict[str, str], check: bool, split_file: Path,
                 like: tuple[Path, list[Path]] | None = None) -> list[Path]:
    """The split's image paths: relative to ``root`` or to ``root/img_raw`` (whichever holds the first
    image); ``like`` = (clean root, its paths) gives a materialised root the clean root's layout."""
    if like is not None:
        clean_root, clean_paths = like
        return [root / p.relative_to(clean_root) for p in clean_paths]
    rels = list(table.values())
    base = root
    for cand in (root, root / "img_raw"):
        if (cand / rels[0]).is_file():
            base = cand
            break
    paths = [base / r for r in rels]  # pathlib drops the "./" the split files write
    if check:
        missing = [(n, p) for n, p in zip(table, paths) if not p.is_file()]
        if missing:
            n, p = missing[0]
            raise UserError(f"{len(missing)} of {len(paths)} CIRR images listed in {split_file.name} are missing "
                            f"under {root} (or {root / 'img_raw'}), e.g. {n!r} at {p}")
    return paths


# ------------------------------------------------------------------------------ by name

def load_cir_dataset(name: str, data_root: str | Path, annotation: str | Path | None = None,
                     check_images: bool = True, split: str = "val") -> FashionIQ | CIRDataset:
    """``fashioniq`` (every category present, as a :class:`FashionIQ`) or ``cirr`` (a :class:`CIRDataset`)
    of ``split`` (default ``val``: the split both are evaluated on; CIRR's test split is ``test1``).
    ``annotation`` replaces CIRR's captions file; FashionIQ reads one file per category and takes none."""
    if name == "fashioniq":
        if annotation is not None:
            raise UserError("fashioniq reads captions/cap.<category>.<split>.json under --data-root; it takes no "
                            "--annotation (pass a materialised root as --data-root instead)")
        return load_fashioniq(data_root, split, check_images=check_images)
    if name == "cirr":
        return load_cirr(data_root, split, annotation, check_images)
    raise UserError(f"unknown CIR dataset {name!r}; expected one of {', '.join(CIR_DATASETS)}")


# ------------------------------------------------------------------------------ shifts

def splits_of(dataset: FashionIQ | CIRDataset) -> list[CIRDataset]:
    """The :class:`CIRDataset` splits a loaded dataset holds (FashionIQ: one per category)."""
    return [dataset.categories[c] for c in FASHIONIQ_CATEGORIES if c in dataset.categories] \
        if isinstance(dataset, FashionIQ) else [dataset]


def reference_paths_by_row(ds: CIRDataset) -> list[Path]:
    """Per gallery row, the file its image is read from *as a reference* (a materialised root's corrupted
    copy where there is one; the gallery file otherwise)."""
    out = list(ds.gallery_paths)
    for r, p in zip(ds.reference_rows.tolist(), ds.references):
        out[r] = p
    return out


def corrupted_reference(ds: CIRDataset, row: int, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Gallery row ``row``'s image as a corrupted reference: decoded, corrupted seeded by (``row``, corruption,
    severity, seed) — the pixels the ``<dataset>-c/…/<corruption>/<severity>`` benchmarks stream."""
    return corrupt_image(read_rgb(reference_paths_by_row(ds)[row]), corruption, severity, item_id=int(row), seed=seed)


def perturb_queries(ds: CIRDataset, perturbation: str, level: int, seed: int = 0, rows: Sequence[int] | None = None,
                    wordnet: str | Path | None = None) -> tuple[list[str], list[list[str]]]:
    """(query texts, raw captions) of queries ``rows`` (default all) under a text perturbation: each raw
    caption is perturbed on its own — FashionIQ's two of query ``q`` seeded by ``2q`` and ``2q + 1``, CIRR's
    one by ``q`` (:func:`qshift.shifts.text.perturb_real_texts`) — then joined as the loader joins them, so a
    materialised captions file loads to the same texts."""
    idx = list(range(len(ds))) if rows is None else [int(r) for r in rows]
    per = len(ds.raw_captions[0]) if ds.raw_captions else 1
    flat = [c for q in idx for c in ds.raw_captions[q]]
    ids = [per * q + j for q in idx for j in range(per)]
    out = perturb_real_texts(flat, perturbation, level, ids, seed=seed, wordnet=wordnet)
    raw = [out[k * per:(k + 1) * per] for k in range(len(idx))]
    texts = [fashioniq_text(r) if ds.name == "fashioniq" else r[0] for r in raw]
    return texts, raw


def _check_shifts(corruptions: Sequence[str], severities: Sequence[int], perturbations: Sequence[str],
                  levels: Sequence[int]) -> None:
    bad = [c for c in corruptions if c not in available_corruptions()]
    if bad:
        raise UserError(f"unknown corruption(s) {bad}; see `qshift shifts list`")
    if corruptions and (not severities or any(s not in SEVERITIES for s in severities)):
        raise UserError(f"severities must be among {SEVERITIES}, got {list(severities)}")
    bad = [p for p in perturbations if p not in ALL_TEXT_PERTURBATIONS]
    if bad:
        raise UserError(f"unknown text perturbation(s) {bad}; known: {', '.join(ALL_TEXT_PERTURBATIONS)}")
    if perturbations and (not levels or any(lvl not in LEVELS for lvl in levels)):
        raise UserError(f"text perturbation levels must be among {LEVELS}, got {list(levels)}")


def _copy_annotations(ds: CIRDataset, dest: Path, skip: Path | None = None) -> None:
    """The split's annotation files into ``dest`` at the paths the loader reads (captions/, image_splits/)."""
    cap, split = ds.annotation_files[0], ds.annotation_files[1]
    for src, folder in ((cap, "captions"), (split, "image_splits")):
        if src == skip:
            continue
        name = src.name if folder == "image_splits" or ds.name == "fashioniq" \
            else f"cap.{CIRR_VERSION}.{ds.split}.json"
        target = dest / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)


def _marker(dest: Path, ds: CIRDataset, references_here: bool, shift: dict[str, Any]) -> None:
    _, gallery_root, _ = read_source_marker(ds.root)
    info = {"dataset": ds.name, "split": ds.split, "clean_root": str(gallery_root.resolve()),
            "references_here": references_here, "shift": shift}
    write_text_atomic(dest / SOURCE_MARKER, json.dumps(info, indent=1))


def _save_image(array: np.ndarray, target: Path) -> None:
    im = Image.fromarray(array)
    with atomic_path(target) as tmp:
        if target.suffix.lower() == ".png":
            im.save(tmp, format="PNG")
        else:
            im.save(tmp, format="JPEG", quality=95)


def materialize_cir(dataset: FashionIQ | CIRDataset, out: str | Path, corruptions: Sequence[str] = (),
                    severities: Sequence[int] = SEVERITIES, perturbations: Sequence[str] = (),
                    levels: Sequence[int] = LEVELS, seed: int = 0, wordnet: str | Path | None = None,
                    progress: bool = True) -> tuple[int, list[Path]]:
    """Write a loaded FashionIQ / CIRR split's shifts to disk, each a drop-in data root:

    * ``<out>/<corruption>/<severity>/``: every reference image corrupted (the pixels the on-the-fly
      benchmark streams: PNG names are written as PNG, others as JPEG at quality 95), copies of the
      annotation files, and :data:`SOURCE_MARKER` naming the clean root the gallery is read from;
    * ``<out>/text/<perturbation>/<level>/``: the captions files with every relative caption perturbed as
      :func:`perturb_queries` does, copies of the image splits, and the marker (all images read from the
      clean root).

    Everything is checked (and WordNet found) before anything long runs.  Returns (images written, the
    roots written)."""
    _check_shifts(corruptions, severities, perturbations, levels)
    parts = splits_of(dataset)
    owner: dict[Path, tuple[str, int]] = {}
    for ds in parts:  # one file per reference image: two splits must not corrupt one file differently
        for r in np.unique(ds.reference_rows).tolist():
            p = reference_paths_by_row(ds)[r]
            if owner.setdefault(p, (ds.label, r)) != (ds.label, r):
                raise UserError(f"{p} is a reference of both {owner[p][0]} and {ds.label}; materialise them apart")
    roots: list[Path] = []
    texts = {}
    for pert in perturbations:  # first: fast, and it finds WordNet before the image work
        for lvl in levels:
            texts[pert, lvl] = [perturb_queries(ds, pert, lvl, seed, wordnet=wordnet)[1] for ds in parts]
    for (pert, lvl), per_part in texts.items():
        dest = Path(out) / "text" / pert / str(lvl)
        for ds, raw in zip(parts, per_part):
            entries = _json(ds.annotation_files[0])
            for e, caps in zip(entries, raw):
                if ds.name == "fashioniq":
                    e["captions"] = caps
                else:
                    e["caption"] = caps[0]
            cap_name = ds.annotation_files[0].name if ds.name == "fashioniq" else f"cap.{CIRR_VERSION}.{ds.split}.json"
            write_text_atomic(dest / "captions" / cap_name, json.dumps(entries))
            _copy_annotations(ds, dest, skip=ds.annotation_files[0])
        _marker(dest, parts[0], False, {"perturbation": pert, "level": lvl, "seed": seed})
        roots.append(dest)
    jobs = [(c, s) for c in corruptions for s in severities]
    n_refs = sum(len(np.unique(ds.reference_rows)) for ds in parts)
    n = 0
    bar = tqdm(total=len(jobs) * n_refs, desc="materialize", unit="img", disable=not progress)
    for c, s in jobs:
        dest = Path(out) / c / str(s)
        for ds in parts:
            _, gallery_root, _ = read_source_marker(ds.root)
            paths = reference_paths_by_row(ds)
            for r in np.unique(ds.reference_rows).tolist():
                try:
                    rel = ds.gallery_paths[r].relative_to(gallery_root)
                except ValueError as e:
                    raise UserError(f"{ds.gallery_paths[r]} lies outside the data root {gallery_root}") from e
                image = corrupt_image(read_rgb(paths[r]), c, s, item_id=r, seed=seed)
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _save_image(image, target)
                n += 1
                bar.update()
            _copy_annotations(ds, dest)
        _marker(dest, parts[0], True, {"corruption": c, "severity": s, "seed": seed})
        roots.append(dest)
    bar.close()
    return n, roots
