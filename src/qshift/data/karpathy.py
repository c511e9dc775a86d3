"""COCO and Flickr30K retrieval splits from their usual annotation files, and COCO-C / Flickr-C built
from them with :mod:`qshift.shifts`.

Three annotation formats, told apart by their content (:func:`detect_format`; docs/datasets.md):

* ``blip`` — the BLIP / ALBEF / TCR test split (``coco_karpathy_test.json``, ``flickr30k_test.json``): a
  JSON list of ``{"image": "<path relative to the data root>", "caption": str | [str, ...]}``;
* ``karpathy`` — Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"filename",
  "filepath" (COCO only), "split", "sentences": [{"raw", "tokens"}, ...]}, ...]}``; the ``test`` split by
  default (5,000 COCO / 1,000 Flickr30K images: the same images, captions and order as the BLIP files);
* ``coco-captions`` — COCO-format caption files (``captions_val2014.json``, NoCaps): ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``: every image of the file.

Captions are cleaned as BLIP does (lower case, the marks ``.!"()*#:;~`` removed, whitespace collapsed, at
most 30 words); COCO keeps the first five captions per image.  Nothing is corrupted on disk: corrupted
query sets are built by :mod:`qshift.data.pipeline` (workers, an on-disk cache), deterministically by
(image index, corruption, severity, seed); the benchmarks built on them (``coco-c/i2t/fog/5``, …) are
registered in src/qshift/bench/families.py.  :attr:`ImageTextDataset.fingerprint` identifies what was
loaded (annotation SHA-256, counts) for result files.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from qshift.atomic import atomic_path
from qshift.errors import UserError
from qshift.shifts.image import available_corruptions, corrupt_image

#: the default annotation file of each dataset (BLIP / ALBEF / TCR layout)
DATASETS = {"coco": "coco_karpathy_test.json", "flickr": "flickr30k_test.json"}
#: looked for when the default is absent: Karpathy's own files
KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr": "dataset_flickr30k.json"}
#: the ``dataset`` field of Karpathy's files, per dataset name
KARPATHY_NAMES = {"coco": ("coco",), "flickr": ("flickr30k",)}
CAPTIONS_PER_IMAGE = {"coco": 5, "flickr": None}
#: every annotation format the loaders accept (name → what it looks like)
FORMATS: dict[str, str] = {
    "blip": "BLIP / ALBEF / TCR split: a JSON list of {'image', 'caption'} (coco_karpathy_test.json, "
            "flickr30k_test.json)",
    "karpathy": "Karpathy's {'images': [{'filename', 'filepath', 'split', 'sentences': [{'raw', 'tokens'}]}]} "
                "(dataset_coco.json, dataset_flickr30k.json)",
    "coco-captions": "COCO captions {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]} "
                     "(captions_val2014.json, nocaps_val_4500_captions.json)",
    "pedes": "person re-id: a JSON list of {'id', 'file_path', 'captions', 'split'} (reid_raw.json, ICFG-PEDES.json)",
    "fashiongen-h5": "the Fashion-Gen HDF5 file (fashiongen_256_256_validation.h5)",
}
_MARKS = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning: lower case, marks removed, whitespace collapsed, ≤ ``max_words`` words."""
    words = _MARKS.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ImageTextDataset:
    """Images (paths), captions, which image each caption belongs to, and relevance ids.

    Relevance is by id: a caption and an image match when ``caption_ids[c] == image_ids[i]``.  For
    COCO / Flickr / NoCaps the id is the image itself; for person re-id (CUHK-PEDES, ICFG-PEDES) and
    Fashion-Gen it is the person / product, so one caption matches several images (many-to-many).
    ``annotation`` / ``format`` say where it was read from; :attr:`fingerprint` identifies it.
    """

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    image_ids: np.ndarray | None = None
    # images that are not files (Fashion-Gen's HDF5): a function from image index to uint8 HWC
    image_reader: Callable[[int], np.ndarray] | None = None
    annotation: Path | None = None
    format: str | None = None
    annotation_sha256: str | None = field(default=None, repr=False)  # computed on first use when None

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        self.image_ids = np.arange(len(self.image_paths)) if self.image_ids is None \
            else np.asarray(self.image_ids, dtype=np.int64)
        if len(self.image_ids) != len(self.image_paths) or len(self.caption_image) != len(self.captions):
            raise ValueError(f"{self.name}: inconsistent image / caption / id counts")

    @property
    def caption_ids(self) -> np.ndarray:
        return self.image_ids[self.caption_image]

    def __len__(self) -> int:
        return len(self.image_paths)

    def annotation_digest(self) -> str | None:
        """SHA-256 of the annotation file (hashed once, on first use); None without a file."""
        if self.annotation_sha256 is None and self.annotation is not None:
            self.annotation_sha256 = file_sha256(self.annotation)
        return self.annotation_sha256

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the loaded data in a result file: name, format, annotation file name and
        SHA-256, image and caption counts."""
        return {"dataset": self.name, "format": self.format,
                "annotation": self.annotation.name if self.annotation is not None else None,
                "annotation_sha256": self.annotation_digest(), "n_images": len(self.image_paths),
                "n_captions": len(self.captions)}


@dataclass
class Record:
    """One image of an annotation file: its path as listed, its raw captions, its relevance id (None:
    the image itself) and its NoCaps domain."""

    image: str
    captions: list[str]
    pid: int | None = None
    domain: str | None = None


def read_annotation(ann: Path) -> tuple[Any, str]:
    """The parsed JSON of ``ann`` and the SHA-256 of its bytes."""
    raw = ann.read_bytes()
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except ValueError as e:
        raise UserError(f"{ann}: not valid JSON ({e}); accepted formats: {accepted(FORMATS)}") from e


def accepted(formats) -> str:
    """``formats`` (names) as one line for an error message, with what each looks like."""
    return "; ".join(f"{k} — {FORMATS[k]}" for k in formats)


def detect_format(data: Any) -> str | None:
    """Which annotation format parsed JSON ``data`` is in (a key of :data:`FORMATS`), None if none."""
    if isinstance(data, list):
        first = next((e for e in data if isinstance(e, dict)), None)
        if first is None:
            return None
        if "image" in first:
            return "blip"
        if "file_path" in first:
            return "pedes"
        return None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next((e for e in data["images"] if isinstance(e, dict)), None)
        if first is not None and "sentences" in first:
            return "karpathy"
        if "annotations" in data:
            return "coco-captions"
    return None


def find_annotation(root: Path, annotation: str | Path | None, candidates: Sequence[str], name: str) -> Path:
    """``annotation``, or the first of ``candidates`` under ``root``; FileNotFoundError naming them all."""
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    if annotation is not None:
        ann = Path(annotation)
        if not ann.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann}")
        return ann
    for c in candidates:
        if (root / c).is_file():
            return root / c
    raise FileNotFoundError(f"annotation file not found under {root}: {name} looks for "
                            f"{' or '.join(repr(c) for c in candidates)}; pass --annotation if it lives elsewhere")


def parse_blip(data: Any, ann: Path) -> list[Record]:
    """Records of a BLIP / ALBEF / TCR list."""
    if not isinstance(data, list) or not data:
        raise UserError(f"{ann}: expected a non-empty JSON list of {{'image': ..., 'caption': ...}}")
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise UserError(f"{ann}: entry {i} lacks 'image' or 'caption': {str(e)[:80]}")
        caps = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        out.append(Record(str(e["image"]), caps))
    return out


def parse_karpathy(data: Any, ann: Path, split: str = "test") -> list[Record]:
    """Records of one split of Karpathy's ``dataset_*.json`` (path ``filepath/filename``, raw sentences)."""
    out, splits = [], set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or not isinstance(im.get("sentences"), list):
            raise UserError(f"{ann}: images[{i}] lacks 'filename' or a 'sentences' list")
        splits.add(im.get("split"))
        if im.get("split") != split:
            continue
        caps = []
        for k, snt in enumerate(im["sentences"]):
            text = snt.get("raw") if isinstance(snt, dict) else None
            if not isinstance(text, str) and isinstance(snt, dict) and isinstance(snt.get("tokens"), list):
                text = " ".join(str(t) for t in snt["tokens"])
            if not isinstance(text, str):
                raise UserError(f"{ann}: images[{i}] ({im['filename']}) sentence {k} has neither 'raw' nor 'tokens'")
            caps.append(text)
        rel = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else str(im["filename"])
        out.append(Record(rel, caps))
    if not out:
        raise UserError(f"{ann}: no images with split == {split!r} (the file has {sorted(map(str, splits))})")
    return out


def parse_coco_captions(data: Any, ann: Path, domain: str | None = None) -> list[Record]:
    """Records of a COCO-format caption file, in its image order, captions grouped by image in file order
    (only the images of NoCaps ``domain`` when given)."""
    if not isinstance(data.get("annotations"), list):
        raise UserError(f"{ann}: 'annotations' must be a list of {{'image_id', 'caption'}}")
    images, row = [], {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise UserError(f"{ann}: images[{i}] lacks 'id' or 'file_name'")
        if domain is not None and im.get("domain") != domain:
            continue
        if im["id"] in row:
            raise UserError(f"{ann}: image id {im['id']} is listed twice")
        row[im["id"]] = len(images)
        images.append(Record(str(im["file_name"]), [], domain=im.get("domain")))
    if not images:
        raise UserError(f"{ann}: no images" + (f" in domain {domain!r}" if domain else ""))
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise UserError(f"{ann}: annotations[{k}] lacks 'image_id' or a text 'caption'")
        if a["image_id"] in row:
            images[row[a["image_id"]]].captions.append(a["caption"])
        elif domain is None:
            raise UserError(f"{ann}: annotations[{k}] names image_id {a['image_id']}, which 'images' does not list")
    return images


def image_folder(root: Path, first: str, candidates: Sequence[str]) -> Path:
    """The folder under ``root`` that holds the listed paths: the first candidate sub-folder in which the
    first listed image exists (``root`` itself when none does: the image check then names the file)."""
    for c in candidates:
        if (root / c / first).is_file():
            return root / c
    return root


def coco_folders(ann: Path, first: str) -> list[str]:
    """Where COCO-format file names may live: the root, ``<x>`` of ``captions_<x>.json``, ``<x>`` of
    ``COCO_<x>_000….jpg``, ``images``."""
    out = [""]
    m = re.match(r"captions_(\w+)\.json$", ann.name)
    if m:
        out.append(m.group(1))
    m = re.match(r"COCO_([a-z]+\d+)_", Path(first).name)
    if m:
        out.append(m.group(1))
    return [*out, "images"]


def build_dataset(name: str, records: list[Record], folder: Path, ann: Path, fmt: str, sha256: str,
                  max_captions: int | None = None, max_words: int = 30, check_images: bool = True,
                  by_pid: bool = False) -> ImageTextDataset:
    """An :class:`ImageTextDataset` from parsed records: captions cleaned (the first ``max_captions``),
    paths under ``folder``, relevance by record id when ``by_pid``."""
    paths, caps, owner = [], [], []
    for i, r in enumerate(records):
        raw = r.captions[:max_captions] if max_captions is not None else r.captions
        cleaned = [clean_caption(c, max_words) if isinstance(c, str) else "" for c in raw]
        if not cleaned or any(not c for c in cleaned):
            raise UserError(f"{ann}: entry {i} ({r.image}) has no caption, or an empty or non-text one")
        paths.append(folder / r.image)
        caps += cleaned
        owner += [i] * len(cleaned)
    if check_images:
        check_image_files(paths, ann, folder)
    ids = np.asarray([r.pid for r in records], dtype=np.int64) if by_pid else None
    return ImageTextDataset(name, paths, caps, np.asarray(owner, dtype=np.int64), ids, annotation=ann, format=fmt,
                            annotation_sha256=sha256)


def load_karpathy(dataset: str, data_root: str | Path, annotation: str | Path | None = None,
                  check_images: bool = True, split: str = "test") -> ImageTextDataset:
    """COCO or Flickr30K (``dataset`` = ``coco`` / ``flickr``) from ``data_root``, in any of the formats
    ``blip``, ``karpathy`` (its ``split``) or ``coco-captions``, detected from the file's content.

    ``annotation`` defaults to ``<data_root>/<coco_karpathy_test.json | flickr30k_test.json>``, else
    Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``.  Image paths are relative to
    ``data_root``; Karpathy's Flickr file names are also looked for under ``flickr30k-images/`` and COCO
    file names under ``val2014/`` (or the folder the caption file is named for).  Fails early, naming the
    file and the fix."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    root = Path(data_root)
    ann = find_annotation(root, annotation, (DATASETS[dataset], KARPATHY_FILES[dataset]), dataset)
    data, sha = read_annotation(ann)
    fmt = detect_format(data)
    ok = ("blip", "karpathy", "coco-captions")
    if fmt not in ok:
        what = "an unrecognised JSON layout" if fmt is None else f"the {fmt} format"
        raise UserError(f"{ann}: {what}; {dataset} accepts {accepted(ok)} (docs/datasets.md)")
    if fmt == "blip":
        records, folder = parse_blip(data, ann), root
    elif fmt == "karpathy":
        named = data.get("dataset")
        if named is not None and named not in KARPATHY_NAMES[dataset]:
            raise UserError(f"{ann}: this Karpathy file is for {named!r}, not {dataset!r}")
        records = parse_karpathy(data, ann, split)
        folder = image_folder(root, records[0].image, ["", "flickr30k-images", "images"])
    else:
        records = parse_coco_captions(data, ann)
        folder = image_folder(root, records[0].image, coco_folders(ann, records[0].image))
    return build_dataset(dataset, records, folder, ann, fmt, sha, CAPTIONS_PER_IMAGE[dataset],
                         check_images=check_images)


def to_blip(records: list[Record], folder: Path, root: Path) -> list[dict[str, Any]]:
    """Records as BLIP / ALBEF / TCR entries (image paths relative to ``root``, captions as listed)."""
    prefix = folder.relative_to(root) if folder != root else None
    return [{"image": (prefix / r.image).as_posix() if prefix else r.image, "caption": list(r.captions)}
            for r in records]


def check_image_files(paths: list[Path], ann: Path, root: Path) -> None:
    """Fail early when listed images are missing or unreadable (headers only: fast)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} images listed in {ann} are missing under {root}, "
                                f"e.g. {missing[0]}; check --data-root")
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018  (reads the header)
        except OSError as e:
            raise OSError(f"unreadable image {p} (listed in {ann}): {e}; re-download or remove it") from e


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e


class CorruptedImages(Sequence):
    """A lazy sequence of images corrupted on access (uint8 HWC arrays); ``corruption=None`` = clean."""

    def __init__(self, paths: list[Path], corruption: str | None = None, severity: int = 0, seed: int = 0,
                 reader: Callable[[int], np.ndarray] | None = None) -> None:
        self.paths, self.corruption, self.severity, self.seed = list(paths), corruption, severity, seed
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        img = self.reader(i) if self.reader is not None else read_rgb(self.paths[i])
        if self.corruption is None:
            return img
        return corrupt_image(img, self.corruption, self.severity, item_id=int(i), seed=self.seed)


TCR_LAYOUT = {"coco": ("coco-IP", "COCO_IP"), "flickr": ("flickr-IP", "Flickr30K_IP")}


def materialize(ds: ImageTextDataset, data_root: str | Path, annotation: str | Path, out: str | Path,
                corruptions: Sequence[str], severities: Sequence[int], seed: int = 0, progress: bool = True,
                layout: str = "qshift") -> int:
    """Write corrupted copies of the images, with the same relative paths as ``data_root``.

    ``layout="qshift"``: ``<out>/<corruption>/<severity>/`` plus a copy of the annotation file, so each
    folder is a drop-in ``--data-root``.  ``layout="tcr"`` (COCO / Flickr): TCR's image roots,
    ``<out>/coco-IP/COCO_IP_<corruption>_<severity>/`` and ``<out>/flickr-IP/Flickr30K_IP_<corruption>_<severity>/``
    (TCR keeps its annotations apart, under its ``ann_root``).  Pixels equal what the on-the-fly
    benchmark streams (same seeds); images are saved as PNG when the name ends in .png, otherwise as
    JPEG at quality 95.  Returns the number of files written."""
    root = Path(data_root)
    if layout not in ("qshift", "tcr"):
        raise ValueError(f"layout must be 'qshift' or 'tcr', got {layout!r}")
    if layout == "tcr" and ds.name not in TCR_LAYOUT:
        raise ValueError(f"TCR's corrupted-copy layout exists for {sorted(TCR_LAYOUT)} only, not {ds.name!r}")
    if ds.image_reader is not None:
        raise ValueError(f"{ds.name}: its images live inside one file; materialize writes copies of image files "
                         "only (the on-the-fly benchmarks work for it)")
    bad = [c for c in corruptions if c not in available_corruptions()]
    if bad:
        raise ValueError(f"unknown corruption(s) {bad}; see `qshift shifts list`")
    jobs = [(c, s) for c in corruptions for s in severities]
    n = 0
    bar = tqdm(total=len(jobs) * len(ds), desc="materialize", unit="img", disable=not progress)
    for c, s in jobs:
        if layout == "tcr":
            parent, prefix = TCR_LAYOUT[ds.name]
            dest = Path(out) / parent / f"{prefix}_{c}_{s}"
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest = Path(out) / c / str(s)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(annotation, dest / Path(annotation).name)
        images = CorruptedImages(ds.image_paths, c, s, seed)
        for i, src in enumerate(ds.image_paths):
            target = dest / src.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(images[i])
            with atomic_path(target) as tmp:
                if target.suffix.lower() == ".png":
                    im.save(tmp, format="PNG")
                else:
                    im.save(tmp, format="JPEG", quality=95)
            n += 1
            bar.update()
    bar.close()
    return n
