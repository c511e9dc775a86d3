"""Real retrieval datasets from their usual annotation files (the CLI's ``--dataset``).

- ``coco`` / ``flickr``: Karpathy test splits in the BLIP / ALBEF JSON (:mod:`qshift.data.karpathy`);
- ``cuhk-pedes`` (``reid_raw.json``) and ``icfg-pedes`` (``ICFG-PEDES.json``): a JSON list of
  ``{"id", "file_path", "captions", "split"}``; the test split, relevance by person id;
- ``nocaps`` / ``nocaps-in`` / ``nocaps-near`` / ``nocaps-out``: the NoCaps validation file
  (``nocaps_val_4500_captions.json``, COCO format: ``images`` with ``id``, ``file_name``, ``domain``
  and ``annotations`` with ``image_id``, ``caption``), the entire set or one domain;
- ``fashiongen``: the Fashion-Gen validation HDF5 (``fashiongen_256_256_validation.h5``: datasets
  ``input_image`` [N, 256, 256, 3], ``input_description`` and ``input_productID``), relevance by
  product id (several images per product); images are read from the file on demand (needs h5py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qshift.data.karpathy import DATASETS as KARPATHY, ImageTextDataset, clean_caption, load_karpathy

PEDES = {"cuhk-pedes": "reid_raw.json", "icfg-pedes": "ICFG-PEDES.json"}
NOCAPS_FILE = "nocaps_val_4500_captions.json"
NOCAPS = {"nocaps": None, "nocaps-in": "in-domain", "nocaps-near": "near-domain", "nocaps-out": "out-domain"}
FASHIONGEN_FILE = "fashiongen_256_256_validation.h5"
DATASET_NAMES = tuple(KARPATHY) + tuple(PEDES) + tuple(NOCAPS) + ("fashiongen",)


def _read_json(root: Path, annotation: str | Path | None, default: str, name: str):
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    ann = Path(annotation) if annotation is not None else root / default
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann} ({name} expects '{default}'; pass --annotation "
                                "if it lives elsewhere)")
    try:
        return ann, json.loads(ann.read_text())
    except ValueError as e:
        raise ValueError(f"{ann}: not valid JSON ({e})") from e


def _check_images(paths: list[Path], ann: Path, root: Path) -> None:
    from qshift.data.karpathy import check_image_files

    check_image_files(paths, ann, root)


def load_pedes(name: str, data_root: str | Path, annotation: str | Path | None = None, split: str = "test",
               check_images: bool = True) -> ImageTextDataset:
    """CUHK-PEDES / ICFG-PEDES test split; images under ``<root>/imgs`` (or ``<root>``) by ``file_path``."""
    root = Path(data_root)
    ann, entries = _read_json(root, annotation, PEDES[name], name)
    if not isinstance(entries, list):
        raise ValueError(f"{ann}: expected a JSON list of {{'id', 'file_path', 'captions', 'split'}}")
    img_root = root / "imgs" if (root / "imgs").is_dir() else root
    paths, ids, caps, owner = [], [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"id", "file_path", "captions"} <= set(e):
            raise ValueError(f"{ann}: entry {i} lacks 'id', 'file_path' or 'captions'")
        if e.get("split", split) != split:
            continue
        texts = [clean_caption(c, max_words=77) for c in (e["captions"] if isinstance(e["captions"], list)
                                                             else [e["captions"]])]
        if not texts or any(not t for t in texts):
            raise ValueError(f"{ann}: entry {i} ({e['file_path']}) has an empty caption")
        k = len(paths)
        paths.append(img_root / e["file_path"])
        ids.append(int(e["id"]))
        for t in texts:
            caps.append(t)
            owner.append(k)
    if not paths:
        raise ValueError(f"{ann}: no entries with split == {split!r}")
    if check_images:
        _check_images(paths, ann, img_root)
    return ImageTextDataset(name, paths, caps, np.asarray(owner), np.asarray(ids))


def load_nocaps(name: str, data_root: str | Path, annotation: str | Path | None = None,
                check_images: bool = True) -> ImageTextDataset:
    """NoCaps validation (entire, or one of in / near / out domain); images under ``<root>`` by ``file_name``."""
    root = Path(data_root)
    ann, data = _read_json(root, annotation, NOCAPS_FILE, name)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{ann}: expected COCO-format JSON with 'images' and 'annotations'")
    domain = NOCAPS[name]
    images = [im for im in data["images"] if domain is None or im.get("domain") == domain]
    if not images:
        raise ValueError(f"{ann}: no images in domain {domain!r}")
    row = {im["id"]: k for k, im in enumerate(images)}
    caps, owner = [], []
    for a in data["annotations"]:
        if a["image_id"] in row:
            t = clean_caption(a["caption"])
            if not t:
                raise ValueError(f"{ann}: empty caption for image {a['image_id']}")
            caps.append(t)
            owner.append(row[a["image_id"]])
    paths = [root / im["file_name"] for im in images]
    if check_images:
        _check_images(paths, ann, root)
    return ImageTextDataset(name, paths, caps, np.asarray(owner))


def load_fashiongen(data_root: str | Path, annotation: str | Path | None = None, max_words: int = 77) -> ImageTextDataset:
    """Fashion-Gen validation from its HDF5 file; one description per image, relevance by product id."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("Fashion-Gen's HDF5 files need h5py: pip install 'qshift[datasets]'") from e
    root = Path(data_root)
    path = Path(annotation) if annotation is not None else root / FASHIONGEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-Gen file not found: {path} (expects '{FASHIONGEN_FILE}'; pass --annotation)")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("input_image", "input_description", "input_productID") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing HDF5 dataset(s) {missing}")
        n = f["input_image"].shape[0]

        def text(x) -> str:
            x = x[0] if getattr(x, "shape", ()) and len(x.shape) else x
            return x.decode("latin-1") if isinstance(x, bytes) else str(x)

        caps = [clean_caption(text(d), max_words) for d in f["input_description"][:]]
        pids = np.asarray([int(text(p)) for p in f["input_productID"][:]], dtype=np.int64)
    bad = [i for i, c in enumerate(caps) if not c]
    if bad:
        raise ValueError(f"{path}: empty description for image(s) {bad[:5]}")
    handle: dict = {}

    def read(i: int) -> np.ndarray:  # one open handle per process, opened lazily
        if "f" not in handle:
            handle["f"] = h5py.File(path, "r")
        return np.asarray(handle["f"]["input_image"][i], dtype=np.uint8)

    return ImageTextDataset("fashiongen", [path] * n, caps, np.arange(n), pids, image_reader=read)


def load_dataset(name: str, data_root: str | Path, annotation: str | Path | None = None,
                 check_images: bool = True) -> ImageTextDataset:
    """Any supported dataset by its CLI name."""
    if name in KARPATHY:
        return load_karpathy(name, data_root, annotation, check_images)
    if name in PEDES:
        return load_pedes(name, data_root, annotation, check_images=check_images)
    if name in NOCAPS:
        return load_nocaps(name, data_root, annotation, check_images)
    if name == "fashiongen":
        return load_fashiongen(data_root, annotation)
    raise ValueError(f"unknown dataset {name!r}; supported: {', '.join(DATASET_NAMES)}")
