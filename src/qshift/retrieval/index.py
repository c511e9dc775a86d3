"""The search behind a gallery: the top-K candidates of each query, exactly or through a FAISS index.

A method that runs with ``candidates=K`` (:class:`qshift.options.Protocol`) asks its gallery index for
each query's K nearest gallery rows and scores the query against those rows only, so a batch costs
O(B·K) memory, never O(B·N) (docs/large-galleries.md).  Two kinds of index:

* ``exact`` — torch, the gallery scanned in row blocks with a running top-K: exact, no extra memory,
  the default;
* a FAISS factory string over inner product (``Flat``, ``IVF4096,Flat``, ``HNSW32,Flat``, …), with
  search parameters such as ``nprobe=32`` or ``efSearch=128``.  ``Flat`` is exact; IVF and HNSW are
  approximate and much faster for large N.

An index is tied to the gallery it was built from by the embeddings' fingerprint; ``save_index`` writes
the FAISS file and a JSON sidecar, ``load_index`` refuses a file built from other embeddings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qshift.atomic import write_text_atomic
from qshift.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["EXACT", "GalleryIndex", "build_index", "check_index_spec", "embeddings_fingerprint", "index_paths", "load_index",
           "save_index", "faiss_available"]

EXACT = "exact"
#: the sidecar's format version (bumped when its fields change meaning)
INDEX_FORMAT = 1
# rows of the gallery scored at once by the exact scan: bounds its memory at B x block floats
_EXACT_BLOCK = 65536


def faiss_available() -> bool:
    """Whether the ``faiss`` module (``pip install faiss-cpu``) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("a FAISS index needs the faiss package: pip install faiss-cpu (or 'qshift[index]'); "
                        "index=exact searches without it") from e
    return faiss


def embeddings_fingerprint(gallery: torch.Tensor | np.ndarray) -> str:
    """SHA-256 (first 16 hex digits) of the gallery embeddings' shape and float32 bytes."""
    arr = np.ascontiguousarray(_as_numpy(gallery))
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass
class GalleryIndex:
    """Top-K search over a frozen [N, d] gallery; ``search`` answers torch tensors on the gallery's device."""

    gallery: torch.Tensor
    kind: str = EXACT
    params: str = ""
    fingerprint: str = ""
    _faiss_index: Any = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.gallery.shape[0])

    @property
    def dim(self) -> int:
        return int(self.gallery.shape[1])

    @property
    def is_exact(self) -> bool:
        """True when the search returns the true top-K (``exact`` or a ``Flat`` FAISS index)."""
        return self.kind == EXACT or self.kind.replace(" ", "").lower() in ("flat", "idmap,flat")

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best gallery rows of each query: (scores [B, k], rows [B, k] int64), best first."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"the index holds {self.dim}-dimensional embeddings, the queries are "
                            f"{tuple(queries.shape)[1:]}-dimensional (an index from another model?)")
        if not 1 <= k <= self.ntotal:
            raise UserError(f"candidates must be between 1 and the gallery size {self.ntotal}, got {k}")
        if not bool(torch.isfinite(queries).all()):
            raise FloatingPointError("non-finite query embeddings reached the index")
        if self._faiss_index is None:
            return self._exact(queries.detach(), k)
        values, rows = self._faiss_index.search(_as_numpy(queries), k)
        rows_t = torch.from_numpy(rows).to(self.gallery.device)
        if bool((rows_t < 0).any()):
            # an approximate index may find fewer than k items (a sparse IVF list): pad with the best row
            # found, scored as the worst, so the shape is kept and no wrong row can outrank a found one
            missing = rows_t < 0
            rows_t = torch.where(missing, rows_t[:, :1].clamp_min(0), rows_t)
            values = np.where(missing.cpu().numpy(), np.float32(-np.inf), values)
        return torch.from_numpy(values).to(self.gallery.device, self.gallery.dtype), rows_t

    def _exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_v = best_i = None
        for start in range(0, self.ntotal, _EXACT_BLOCK):
            block = queries @ self.gallery[start:start + _EXACT_BLOCK].T
            v, i = block.topk(min(k, block.shape[1]), dim=1)
            i = i + start
            if best_v is None:
                best_v, best_i = v, i
            else:
                v, pick = torch.cat([best_v, v], 1).topk(k, dim=1)
                best_i = torch.cat([best_i, i], 1).gather(1, pick)
                best_v = v
        return best_v, best_i

    def describe(self) -> dict[str, Any]:
        """What a result file records about the search."""
        return {"index": self.kind, "index_params": self.params, "ntotal": self.ntotal, "exact": self.is_exact,
                "fingerprint": self.fingerprint}


def check_index_spec(kind: str, params: str = "") -> None:
    """Fail early (``UserError``) on an index that cannot be built whatever the gallery: FAISS missing, a
    factory string FAISS cannot parse, or search parameters for the exact search.  What depends on the
    gallery (its dimension, too few rows to train on) is checked when the index is built."""
    if kind == EXACT:
        if params:
            raise UserError(f"index=exact takes no search parameters, got index_params={params!r}")
        return
    faiss = _faiss()
    try:
        faiss.index_factory(256, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        if "could not parse" in str(e):
            raise UserError(f"FAISS cannot build index {kind!r}: {_first_line(e)}") from e


def build_index(gallery: torch.Tensor | np.ndarray, kind: str = EXACT, params: str = "", *, seed: int = 0,
                train_size: int | None = None) -> GalleryIndex:
    """An index over ``gallery`` [N, d] (L2-normalised rows; inner product = cosine).

    ``kind`` is ``exact`` or a FAISS factory string; IVF indexes are trained on ``train_size`` rows drawn
    with ``seed`` (default: all rows up to 256 per list, FAISS's rule of thumb).  ``params`` are FAISS
    search parameters (``nprobe=32``)."""
    g = gallery if isinstance(gallery, torch.Tensor) else torch.from_numpy(_as_numpy(gallery))
    if g.ndim != 2 or g.shape[0] == 0:
        raise UserError(f"a gallery index needs [N, d] embeddings with N > 0, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise UserError("the gallery embeddings hold NaN or inf")
    g = g.detach().float()
    fp = embeddings_fingerprint(g)
    if kind == EXACT:
        if params:
            raise UserError(f"index=exact takes no search parameters, got {params!r}")
        return GalleryIndex(g, EXACT, "", fp)
    faiss = _faiss()
    arr = _as_numpy(g)
    try:
        index = faiss.index_factory(arr.shape[1], kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"FAISS cannot build index {kind!r}: {_first_line(e)}") from e
    if not index.is_trained:
        if train_size is None:
            nlist = faiss.extract_index_ivf(index).nlist if _is_ivf(faiss, index) else 0
            train_size = min(len(arr), 256 * nlist) if nlist else len(arr)
        rows = np.random.default_rng(seed).permutation(len(arr))[:train_size]
        log.info("training index %s on %d of %d rows", kind, len(rows), len(arr))
        index.train(arr[np.sort(rows)])
    index.add(arr)
    _set_params(faiss, index, params)
    return GalleryIndex(g, kind, params, fp, _on_device(faiss, index, gallery))


def _on_device(faiss, index, gallery: torch.Tensor | np.ndarray):
    """The index on the gallery's GPU when the gallery is on one and FAISS is the GPU build (faiss-gpu);
    else as it is (the CPU build searches on the CPU, and the results are moved to the gallery's device)."""
    if isinstance(gallery, torch.Tensor) and gallery.is_cuda and hasattr(faiss, "StandardGpuResources"):
        device = gallery.device.index or 0
        log.info("FAISS index moved to cuda:%d", device)
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
    return index


def _is_ivf(faiss, index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def _set_params(faiss, index, params: str) -> None:
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise UserError(f"FAISS search parameters {params!r} do not fit this index: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """FAISS's message without its C++ location (``Error in <function> at <file>:<line>: ``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "Error" in ln or "error" in ln), lines[-1] if lines else type(e).__name__)
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)


def index_paths(embeddings: str | Path) -> tuple[Path, Path]:
    """Where ``qshift index build`` puts the index of ``embeddings`` (a .npy file): ``<stem>.faiss`` and
    ``<stem>.faiss.json`` beside it."""
    p = Path(embeddings)
    base = p.with_suffix(".faiss") if p.suffix else p.with_name(p.name + ".faiss")
    return base, base.with_name(base.name + ".json")


def save_index(index: GalleryIndex, path: str | Path) -> Path:
    """Write ``index`` to ``path`` (FAISS's format) and ``path.json`` (kind, parameters, fingerprint),
    both atomically; an ``exact`` index has nothing to save but its sidecar."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if index._faiss_index is not None:
        faiss = _faiss()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        cpu = index._faiss_index
        if hasattr(faiss, "index_gpu_to_cpu") and type(cpu).__name__.startswith("Gpu"):
            cpu = faiss.index_gpu_to_cpu(cpu)
        try:
            faiss.write_index(cpu, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    meta = {"format": INDEX_FORMAT, **index.describe(), "dim": index.dim}
    write_text_atomic(sidecar, json.dumps(meta, indent=1))
    return path


def load_index(path: str | Path, gallery: torch.Tensor | np.ndarray, params: str | None = None) -> GalleryIndex:
    """Read an index written by :func:`save_index` for ``gallery``; refuse one built from other embeddings
    (``UserError`` naming both fingerprints).  ``params`` overrides the saved search parameters."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        raise UserError(f"{sidecar} not found: an index is written by 'qshift index build' with its sidecar")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{sidecar} is not an index sidecar: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise UserError(f"{sidecar}: unknown index format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    g = gallery if isinstance(gallery, torch.Tensor) else torch.from_numpy(_as_numpy(gallery))
    fp = embeddings_fingerprint(g)
    if meta.get("fingerprint") != fp:
        raise UserError(f"{path} was built from other gallery embeddings (fingerprint {meta.get('fingerprint')}, "
                        f"these {fp}); rebuild it with 'qshift index build'")
    params = meta.get("index_params", "") if params is None else params
    if meta["index"] == EXACT:
        return GalleryIndex(g.detach().float(), EXACT, "", fp)
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise UserError(f"{path} is not a readable FAISS index: {_first_line(e)}") from e
    if index.ntotal != g.shape[0] or index.d != g.shape[1]:
        raise UserError(f"{path} indexes {index.ntotal} x {index.d}, the gallery is {tuple(g.shape)}")
    _set_params(faiss, index, params)
    return GalleryIndex(g.detach().float(), meta["index"], params, fp, _on_device(faiss, index, g))
