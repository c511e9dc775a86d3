"""The image pipeline of real datasets: decode, corrupt and resize in data-loader workers, cache the result.

A corrupted query set (COCO-C's ``glass_blur``/5, …) is built once: a torch ``DataLoader`` decodes each
image, corrupts it (:func:`qshift.shifts.image.corrupt_image`, seeded by (image index, corruption,
severity, seed) alone, so the pixels do not depend on the worker or the batch an image lands in),
optionally resizes it, and compresses it, in ``workers`` processes with prefetch; the main process only
appends the bytes to an on-disk cache entry (:class:`qshift.bench.cache.RaggedWriter`, images at their
own sizes).  Later builds — the other methods and seeds of a grid — read that entry, one image at a time.

The entry's key holds everything that determines its pixels (:func:`image_set_spec`): the dataset and
its annotation file's SHA-256, the images (their paths' last two parts, file sizes and relevance ids),
the rows built, corruption, severity, shift seed, the resize size, the corruption library's version and
:data:`PIPELINE_VERSION`.  With the cache off (``QSHIFT_CACHE=off``) a set is written to a temporary file
instead, removed when the set is dropped.

Workers: the ``workers`` argument, else ``QSHIFT_WORKERS``, else ``min(4, cpu count)``; 0 decodes and
corrupts in the main process (the same pixels).  Clean images are not cached (decoding a JPEG costs about
what reading it back from the cache does): :class:`LazyImages` reads them on access.  docs/datasets.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qshift.bench import cache
from qshift.bench.cache import norm_rows
from qshift.data.karpathy import ImageTextDataset, read_rgb
from qshift.errors import UserError
from qshift.shifts.image import SEVERITIES, available_corruptions, corrupt_image, library_version

log = logging.getLogger(__name__)

#: bump when decoding, corrupting (src/qshift/shifts/image.py) or resizing changes pixels: cached sets are rebuilt
PIPELINE_VERSION = 1
WORKERS_ENV = "QSHIFT_WORKERS"
#: batches each worker keeps ready
PREFETCH = 4


def default_workers() -> int:
    """``QSHIFT_WORKERS`` when set (a whole number ≥ 0), else ``min(4, cpu count)``."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        return max(1, min(4, os.cpu_count() or 1))
    try:
        n = int(raw)
        if n < 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{WORKERS_ENV} must be a whole number ≥ 0 (0: no worker processes), got {raw!r}") from None
    return n


def resolve_workers(workers: int | None) -> int:
    """``workers`` when given, else :func:`default_workers`."""
    if workers is None:
        return default_workers()
    if int(workers) < 0:
        raise UserError(f"workers must be ≥ 0, got {workers}")
    return int(workers)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize to ``size`` × ``size`` (PIL, as the ``tcr`` preprocessing does, so that it then
    leaves the image as it is); an image of that size already is returned unchanged."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _check(corruption: str | None, severity: int, size: int | None) -> None:
    if corruption is not None and corruption not in available_corruptions():
        raise UserError(f"unknown corruption {corruption!r}; see `qshift shifts list`")
    if corruption is not None and severity not in SEVERITIES:
        raise UserError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
        raise UserError(f"the image size must be a positive whole number of pixels, got {size!r}")


def read_image(paths: Sequence[Path], reader, i: int, corruption: str | None = None, severity: int = 0,
               seed: int = 0, size: int | None = None) -> np.ndarray:
    """Image ``i`` decoded (uint8 HWC), corrupted when ``corruption`` is given (seeded by ``i``), resized
    to ``size`` × ``size`` when given: the one-image path every set is made of."""
    img = reader(i) if reader is not None else read_rgb(paths[i])
    if corruption is not None:
        img = corrupt_image(img, corruption, severity, item_id=int(i), seed=seed)
    return resize_square(img, size) if size is not None else img


class LazyImages(Sequence):
    """A dataset's images (those of ``rows``, in that order) decoded, corrupted and resized on access."""

    def __init__(self, ds: ImageTextDataset, rows=None, corruption: str | None = None, severity: int = 0,
                 seed: int = 0, size: int | None = None) -> None:
        _check(corruption, severity, size)
        self.paths, self.reader = list(ds.image_paths), ds.image_reader
        rows = norm_rows(rows, len(ds))
        self.rows = np.arange(len(ds)) if rows is None else rows
        self.corruption, self.severity, self.seed, self.size = corruption, severity, seed, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return read_image(self.paths, self.reader, int(self.rows[k]), self.corruption, self.severity, self.seed,
                          self.size)

    @property
    def fingerprint(self) -> str:
        """A content key without decoding anything: the images (paths, file sizes), rows, corruption, size."""
        h = hashlib.sha256()
        for p in self.paths:
            try:
                size = p.stat().st_size
            except OSError:
                size = -1
            h.update(f"{p}|{size}\n".encode())
        h.update(self.rows.tobytes())
        h.update(repr((self.corruption, self.severity, self.seed, self.size, PIPELINE_VERSION)).encode())
        return h.hexdigest()


class _Take(Sequence):
    """Some rows of a sequence, read on access."""

    def __init__(self, items: Sequence, rows: np.ndarray) -> None:
        self.items, self.rows = items, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.items[int(self.rows[k])]


class _Items(Dataset):
    """The data-loader side: item ``k`` is image ``rows[k]``, as (k, compressed bytes, shape) or (k, array)."""

    def __init__(self, paths: list[Path], reader, rows: np.ndarray, corruption: str | None, severity: int,
                 seed: int, size: int | None, compress: bool) -> None:
        self.paths, self.reader, self.rows = paths, reader, rows
        self.corruption, self.severity, self.seed, self.size, self.compress = corruption, severity, seed, size, compress

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        img = read_image(self.paths, self.reader, int(self.rows[k]), self.corruption, self.severity, self.seed,
                         self.size)
        return (k, cache.compress_item(img), img.shape) if self.compress else (k, img)


def _keep(item):
    return item


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # one process per core; the corruption code's own threads are left as they are


def _warm_up(corruption: str | None, severity: int) -> None:
    """Compile glass_blur's numba kernel once before forking, so the workers inherit it."""
    if corruption == "glass_blur":
        corrupt_image(np.zeros((32, 32, 3), np.uint8), corruption, severity, item_id=0)


def iter_images(ds: ImageTextDataset, rows=None, corruption: str | None = None, severity: int = 0, seed: int = 0,
                size: int | None = None, workers: int | None = None, progress: bool = False,
                compress: bool = False) -> Iterator[tuple]:
    """Images ``rows`` (default all) of ``ds`` through the data loader, in order: ``(k, array)`` — or
    ``(k, compressed bytes, shape)`` with ``compress`` — for the ``k``-th row.  Bit-identical to
    :func:`read_image` one by one, whatever ``workers``."""
    _check(corruption, severity, size)
    rows = norm_rows(rows, len(ds))
    rows = np.arange(len(ds)) if rows is None else rows
    n_workers = min(resolve_workers(workers), len(rows))
    items = _Items(list(ds.image_paths), ds.image_reader, rows, corruption, severity, seed, size, compress)
    if n_workers > 0:
        _warm_up(corruption, severity)
    loader = DataLoader(items, batch_size=None, shuffle=False, num_workers=n_workers, collate_fn=_keep,
                        worker_init_fn=_init_worker if n_workers else None,
                        prefetch_factor=PREFETCH if n_workers else None)
    desc = f"{ds.name} {corruption}/{severity}" if corruption else f"{ds.name} images"
    yield from tqdm(loader, total=len(rows), desc=desc, unit="img", disable=not progress, leave=False)


def images_digest(ds: ImageTextDataset) -> str:
    """What identifies a dataset's image list: each image's path (its last two parts), file size and
    relevance id — not the data root, so a moved dataset keeps its cache."""
    h = hashlib.sha256()
    sizes: dict[Path, int] = {}
    for p, pid in zip(ds.image_paths, ds.image_ids.tolist()):
        if p not in sizes:
            try:
                sizes[p] = p.stat().st_size
            except OSError:
                sizes[p] = -1
        h.update(f"{'/'.join(p.parts[-2:])}|{sizes[p]}|{pid}\n".encode())
    return h.hexdigest()[:32]


def image_set_spec(ds: ImageTextDataset, corruption: str | None, severity: int = 0, seed: int = 0,
                   size: int | None = None) -> dict[str, Any]:
    """The cache key of a dataset's image set (every image; rows are added by :func:`query_images`)."""
    clean = corruption is None
    return {"kind": "realimg", "pipeline_version": PIPELINE_VERSION, "library": library_version(),
            "dataset": ds.name, "format": ds.format, "annotation_sha256": ds.annotation_digest(),
            "images": images_digest(ds), "n_images": len(ds), "corruption": corruption,
            "severity": 0 if clean else int(severity), "shift_seed": 0 if clean else int(seed),
            "size": None if size is None else int(size)}


def _rows_spec(rows: np.ndarray) -> dict[str, Any]:
    return {"rows": hashlib.sha256(rows.tobytes()).hexdigest()[:24], "n_rows": len(rows)}


def _open(spec: dict[str, Any], n: int) -> cache.RaggedArrays | None:
    hit = cache.cache_open_ragged(spec)
    if hit is not None and len(hit) != n:
        log.warning("cache entry %s holds %d images, expected %d; rebuilding", hit.path, len(hit), n)
        return None
    return hit


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def query_images(ds: ImageTextDataset, corruption: str | None, severity: int = 0, seed: int = 0, rows=None,
                 workers: int | None = None, size: int | None = None, progress: bool = False) -> Sequence[np.ndarray]:
    """The images ``rows`` (default all) of ``ds`` under ``corruption`` at ``severity`` (None: clean), as
    a sequence of uint8 HWC arrays read on access; built once through the data loader and cached.

    A subset is served from its own entry or from the full set's; otherwise only its rows are built.
    Item ``k`` is bit-identical to ``read_image(..., rows[k], ...)``."""
    _check(corruption, severity, size)
    n = len(ds)
    rows = norm_rows(rows, n)
    spec = image_set_spec(ds, corruption, severity, seed, size)
    if rows is not None:
        spec_rows = {**spec, **_rows_spec(rows)}
        hit = _open(spec_rows, len(rows))
        if hit is not None:
            return hit
        full = _open(spec, n)
        if full is not None:
            return _Take(full, rows)
        spec = spec_rows
    else:
        hit = _open(spec, n)
        if hit is not None:
            return hit
    writer = cache.cache_ragged_writer(spec)
    temporary = writer is None
    if temporary:  # the cache is off (or not writable): a file of our own, removed when the set is dropped
        path = Path(tempfile.gettempdir()) / f"qshift-images-{os.getpid()}-{uuid.uuid4().hex[:12]}{cache.SUFFIX}"
        writer = cache.RaggedWriter(path, np.uint8)
    with writer:
        for _, blob, shape in iter_images(ds, rows, corruption, severity, seed, size, workers, progress, compress=True):
            writer.add_compressed(blob, shape)
    out = cache.RaggedArrays(writer.path)
    if temporary:
        try:
            writer.path.unlink()  # POSIX: the open handle keeps the data until the set is dropped
        except OSError:  # pragma: no cover - platforms that cannot remove an open file
            weakref.finalize(out, _remove_quietly, writer.path)
    else:
        cache.ragged_committed(writer.path)
    return out
