"""Real retrieval datasets from their usual annotation files (the CLI's ``--dataset``).

The annotation format is detected from the file's content (:func:`qshift.data.karpathy.detect_format`;
the formats and folder layouts: docs/datasets.md):

- ``coco`` / ``flickr``: the BLIP / ALBEF / TCR test split, Karpathy's ``dataset_coco.json`` /
  ``dataset_flickr30k.json`` (its test split) or a COCO-format caption file (:mod:`qshift.data.karpathy`);
- ``cuhk-pedes`` (``reid_raw.json``) and ``icfg-pedes`` (``ICFG-PEDES.json``): a JSON list of
  ``{"id", "file_path", "captions", "split"}``; the test split, relevance by person id;
- ``nocaps`` / ``nocaps-in`` / ``nocaps-near`` / ``nocaps-out``: the NoCaps validation file
  (``nocaps_val_4500_captions.json``, COCO format: ``images`` with ``id``, ``file_name``, ``domain``
  and ``annotations`` with ``image_id``, ``caption``), the entire set or one domain;
- ``fashiongen``: the Fashion-Gen validation HDF5 (``fashiongen_256_256_validation.h5``: datasets
  ``input_image`` [N, 256, 256, 3], ``input_description`` and ``input_productID``), relevance by
  product id (several images per product); images are read from the file on demand (needs h5py).

Every loaded dataset has a ``fingerprint`` (annotation SHA-256, image and caption counts) for result files.
Converting Karpathy or COCO-format files into the BLIP / TCR layout (for TCR's own code)::

    python -m qshift.data.retrieval_datasets convert dataset_coco.json coco_karpathy_test.json --dataset coco
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from qshift.atomic import write_text_atomic
from qshift.data.karpathy import (DATASETS as KARPATHY, ImageTextDataset, Record, accepted, build_dataset,
                                  check_image_files, clean_caption, coco_folders, detect_format, find_annotation,
                                  image_folder, load_karpathy, parse_blip, parse_coco_captions, parse_karpathy,
                                  read_annotation, to_blip)
from qshift.data.av_datasets import AV_DATASETS, load_av_dataset
from qshift.data.cir_datasets import CIR_DATASETS, load_cir_dataset
from qshift.errors import UserError

PEDES = {"cuhk-pedes": "reid_raw.json", "icfg-pedes": "ICFG-PEDES.json"}
NOCAPS_FILE = "nocaps_val_4500_captions.json"
NOCAPS = {"nocaps": None, "nocaps-in": "in-domain", "nocaps-near": "near-domain", "nocaps-out": "out-domain"}
FASHIONGEN_FILE = "fashiongen_256_256_validation.h5"
DATASET_NAMES = tuple(KARPATHY) + tuple(PEDES) + tuple(NOCAPS) + ("fashiongen",)


def _detected(ann: Path, data, name: str, ok: tuple[str, ...]) -> str:
    fmt = detect_format(data)
    if fmt not in ok:
        what = "an unrecognised JSON layout" if fmt is None else f"the {fmt} format"
        raise UserError(f"{ann}: {what}; {name} accepts {accepted(ok)} (docs/datasets.md)")
    return fmt


def load_pedes(name: str, data_root: str | Path, annotation: str | Path | None = None, split: str = "test",
               check_images: bool = True) -> ImageTextDataset:
    """CUHK-PEDES / ICFG-PEDES test split; images under ``<root>/imgs`` (or ``<root>``) by ``file_path``."""
    root = Path(data_root)
    ann = find_annotation(root, annotation, (PEDES[name],), name)
    entries, sha = read_annotation(ann)
    _detected(ann, entries, name, ("pedes",))
    img_root = root / "imgs" if (root / "imgs").is_dir() else root
    records = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"id", "file_path", "captions"} <= set(e):
            raise UserError(f"{ann}: entry {i} lacks 'id', 'file_path' or 'captions'")
        if e.get("split", split) != split:
            continue
        caps = e["captions"] if isinstance(e["captions"], list) else [e["captions"]]
        try:
            pid = int(e["id"])
        except (TypeError, ValueError):
            raise UserError(f"{ann}: entry {i} ({e['file_path']}) has a non-integer id {e['id']!r}") from None
        records.append(Record(str(e["file_path"]), caps, pid=pid))
    if not records:
        raise UserError(f"{ann}: no entries with split == {split!r}")
    return build_dataset(name, records, img_root, ann, "pedes", sha, max_words=77, check_images=check_images,
                         by_pid=True)


def load_nocaps(name: str, data_root: str | Path, annotation: str | Path | None = None,
                check_images: bool = True) -> ImageTextDataset:
    """NoCaps validation (entire, or one of in / near / out domain); images under ``<root>`` by ``file_name``."""
    root = Path(data_root)
    ann = find_annotation(root, annotation, (NOCAPS_FILE,), name)
    data, sha = read_annotation(ann)
    _detected(ann, data, name, ("coco-captions",))
    records = parse_coco_captions(data, ann, NOCAPS[name])
    folder = image_folder(root, records[0].image, coco_folders(ann, records[0].image))
    return build_dataset(name, records, folder, ann, "coco-captions", sha, check_images=check_images)


class _H5Images:
    """Fashion-Gen images from the HDF5 file by index (uint8 HWC): one handle per process, opened lazily,
    reopened after a fork; pickles by path (for data-loader workers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = None
        self._pid = None

    def __call__(self, i: int) -> np.ndarray:
        import h5py  # optional dependency (checked when the dataset is loaded)

        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = h5py.File(self.path, "r"), os.getpid()
        return np.asarray(self._f["input_image"][int(i)], dtype=np.uint8)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def load_fashiongen(data_root: str | Path, annotation: str | Path | None = None, max_words: int = 77) -> ImageTextDataset:
    """Fashion-Gen validation from its HDF5 file; one description per image, relevance by product id."""
    try:
        import h5py  # optional dependency (qshift[datasets])
    except ImportError as e:
        raise ImportError("Fashion-Gen's HDF5 files need h5py: pip install 'qshift[datasets]'") from e
    root = Path(data_root)
    path = Path(annotation) if annotation is not None else root / FASHIONGEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-Gen file not found: {path} (expects '{FASHIONGEN_FILE}'; pass --annotation)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not an HDF5 file ({e}); fashiongen accepts {accepted(('fashiongen-h5',))}") from e
    with f:
        missing = [k for k in ("input_image", "input_description", "input_productID") if k not in f]
        if missing:
            raise UserError(f"{path}: missing HDF5 dataset(s) {missing}")
        n = f["input_image"].shape[0]

        def text(x) -> str:
            x = x[0] if getattr(x, "shape", ()) and len(x.shape) else x
            return x.decode("latin-1") if isinstance(x, bytes) else str(x)

        caps = [clean_caption(text(d), max_words) for d in f["input_description"][:]]
        pids = np.asarray([int(text(p)) for p in f["input_productID"][:]], dtype=np.int64)
    bad = [i for i, c in enumerate(caps) if not c]
    if bad:
        raise UserError(f"{path}: empty description for image(s) {bad[:5]}")
    return ImageTextDataset("fashiongen", [path] * n, caps, np.arange(n), pids, image_reader=_H5Images(path),
                            annotation=path, format="fashiongen-h5")


def load_dataset(name: str, data_root: str | Path, annotation: str | Path | None = None,
                 check_images: bool = True, split: str = "test") -> ImageTextDataset:
    """Any supported dataset by its CLI name (``split``: the Karpathy / person re-id split to read)."""
    if name in KARPATHY:
        return load_karpathy(name, data_root, annotation, check_images, split=split)
    if name in PEDES:
        return load_pedes(name, data_root, annotation, split=split, check_images=check_images)
    if name in NOCAPS:
        return load_nocaps(name, data_root, annotation, check_images)
    if name == "fashiongen":
        return load_fashiongen(data_root, annotation)
    if name in CIR_DATASETS:  # composed retrieval: FashionIQ / CIRR, their val split (qshift.data.cir_datasets)
        return load_cir_dataset(name, data_root, annotation, check_images)
    if name in AV_DATASETS:  # video-audio: VGGSound / Kinetics-Sounds in READ's JSON (qshift.data.av_datasets)
        return load_av_dataset(name, data_root, annotation, check_images, split=split)
    raise UserError(f"unknown dataset {name!r}; supported: {', '.join(DATASET_NAMES + CIR_DATASETS + AV_DATASETS)}")


def convert_annotation(source: str | Path, out: str | Path, dataset: str = "coco", split: str = "test",
                       data_root: str | Path | None = None) -> int:
    """Write ``source`` (Karpathy's ``dataset_*.json`` or a COCO-format caption file) as a BLIP / ALBEF /
    TCR list of ``{"image", "caption": [raw captions]}``; returns the number of images written.

    Image paths are made relative to ``data_root`` when it is given (found as the loaders find them),
    else written as the source lists them (Karpathy: ``filepath/filename``; COCO: ``file_name``)."""
    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(f"annotation file not found: {src}")
    data, _ = read_annotation(src)
    fmt = _detected(src, data, "convert", ("karpathy", "coco-captions", "blip"))
    if fmt == "karpathy":
        records = parse_karpathy(data, src, split)
    elif fmt == "coco-captions":
        records = parse_coco_captions(data, src, NOCAPS.get(dataset))
    else:
        records = parse_blip(data, src)
    root = Path(data_root) if data_root is not None else None
    if root is None:
        entries = to_blip(records, Path("."), Path("."))
    else:
        folders = ["", "flickr30k-images", "images"] if fmt == "karpathy" else coco_folders(src, records[0].image)
        folder = image_folder(root, records[0].image, folders) if fmt != "blip" else root
        check_image_files([folder / r.image for r in records[:1]], src, folder)
        entries = to_blip(records, folder, root)
    write_text_atomic(out, json.dumps(entries))
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    """``python -m qshift.data.retrieval_datasets convert SOURCE OUT [--dataset coco] [--split test]``."""
    ap = argparse.ArgumentParser(prog="python -m qshift.data.retrieval_datasets",
                                 description="Convert annotation files into the BLIP / ALBEF / TCR test-split layout.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="Karpathy's dataset_*.json or COCO captions → a BLIP / TCR list")
    c.add_argument("source", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--dataset", default="coco", choices=[*KARPATHY, *NOCAPS],
                   help="coco keeps every caption as listed; nocaps-* keep one domain")
    c.add_argument("--split", default="test", help="Karpathy split to keep (test, val, train, restval)")
    c.add_argument("--data-root", type=Path, default=None,
                   help="make image paths relative to this folder (as `--data-root` will be)")
    args = ap.parse_args(argv)
    try:
        n = convert_annotation(args.source, args.out, args.dataset, args.split, args.data_root)
    except (UserError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
