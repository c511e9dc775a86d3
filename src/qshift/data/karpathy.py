"""COCO and Flickr30K Karpathy test splits in the BLIP / ALBEF JSON format, and COCO-C / Flickr-C
built on the fly from them with :mod:`qshift.shifts`.

The annotation file is a JSON list of ``{"image": "<path relative to the image root>", "caption":
str | [str, ...]}``.  Captions are cleaned as BLIP does (lower case, the marks ``.!"()*#:;~``
removed, whitespace collapsed, at most 30 words); COCO keeps the first five captions per image.
Nothing is corrupted on disk: a corrupted query set is a lazy sequence that loads and corrupts an
image when the stream asks for it, deterministically by (image id, corruption, severity, seed); the
benchmarks built on them (``coco-c/i2t/fog/5``, …) are registered in src/qshift/bench/families.py.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from qshift.atomic import atomic_path
from qshift.shifts.image import available_corruptions, corrupt_image

DATASETS = {"coco": "coco_karpathy_test.json", "flickr": "flickr30k_test.json"}
CAPTIONS_PER_IMAGE = {"coco": 5, "flickr": None}
_MARKS = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning: lower case, marks removed, whitespace collapsed, ≤ ``max_words`` words."""
    words = _MARKS.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


@dataclass
class ImageTextDataset:
    """Images (paths), captions, which image each caption belongs to, and relevance ids.

    Relevance is by id: a caption and an image match when ``caption_ids[c] == image_ids[i]``.  For
    COCO / Flickr / NoCaps the id is the image itself; for person re-id (CUHK-PEDES, ICFG-PEDES) and
    Fashion-Gen it is the person / product, so one caption matches several images (many-to-many).
    """

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    image_ids: np.ndarray | None = None
    # images that are not files (Fashion-Gen's HDF5): a function from image index to uint8 HWC
    image_reader: Callable[[int], np.ndarray] | None = None

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


def load_karpathy(dataset: str, data_root: str | Path, annotation: str | Path | None = None,
                  check_images: bool = True) -> ImageTextDataset:
    """Read a Karpathy test split (``dataset`` = ``coco`` or ``flickr``) from ``data_root``.

    ``annotation`` defaults to ``<data_root>/<coco_karpathy_test.json | flickr30k_test.json>``; image
    paths in it are relative to ``data_root``.  Fails early, naming the file and the fix.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    ann = Path(annotation) if annotation is not None else root / DATASETS[dataset]
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann} (the BLIP/ALBEF '{DATASETS[dataset]}'; "
                                "pass --annotation if it lives elsewhere)")
    try:
        entries = json.loads(ann.read_text())
    except ValueError as e:
        raise ValueError(f"{ann}: not valid JSON ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{ann}: expected a non-empty JSON list of {{'image': ..., 'caption': ...}}")
    keep = CAPTIONS_PER_IMAGE[dataset]
    paths, caps, owner = [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ValueError(f"{ann}: entry {i} lacks 'image' or 'caption': {str(e)[:80]}")
        raw = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        if keep is not None:
            raw = raw[:keep]
        cleaned = [clean_caption(c) for c in raw if isinstance(c, str)]
        if not cleaned or any(not c for c in cleaned):
            raise ValueError(f"{ann}: entry {i} ({e['image']}) has an empty or non-text caption")
        paths.append(root / e["image"])
        for c in cleaned:
            caps.append(c)
            owner.append(i)
    if check_images:
        check_image_files(paths, ann, root)
    return ImageTextDataset(dataset, paths, caps, np.asarray(owner, dtype=np.int64))


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
