"""On-disk cache for shifted query sets, so a grid of methods corrupts each set once.

Entries are keyed by everything that determines their content (world seed and split, shift name,
severity / level, shift seed, library version, and the rows kept when only some are built) and
written atomically.  An entry is two files, ``<kind>-<key>.qsc`` (the array) and ``<kind>-<key>.json``
(its spec, for people).

Environment:

* ``QSHIFT_CACHE`` — the folder (default ``~/.cache/qshift``); ``off`` (or ``0``/``none``/``false``)
  disables caching.
* ``QSHIFT_CACHE_MAX_MB`` — the size bound in MiB (default 4096, i.e. 4 GiB; ``none``/``inf``/``unlimited``:
  no bound).  After each write the least-recently-used entries (by the data file's mtime, which a read
  refreshes) are removed until the folder is under the bound; the entry just written is never removed.
  All 80 corruption sets of the 2,000-image test split take about 7–8 GB compressed (estimated from the
  sets measured below): raise the bound for full grids, or sets are rebuilt after eviction.

Storage (``.qsc``): the exact array, row blocks compressed separately with zlib level 1, so a subset of
rows is read without inflating the rest.  Layout: ``b"QSHIFTC1"``, a little-endian uint64 header length,
a JSON header (dtype, shape, codec, rows per block, compressed block sizes), then the blocks.  Chosen by
measurement on this project's 2,000-image test split at 192 px (221.2 MB raw uint8; 2 shared cores,
per-image blocks; write = compress, read = inflate, one thread):

==================  ==========  ==========  ===========  ============  =============
set                 zlib-1      zlib-6      PNG-1        npz (zlib-6)  raw .npy
==================  ==========  ==========  ===========  ============  =============
clean render        126 MB      122 MB      115 MB       123 MB        221 MB
  write / read      3.7 / 1.4s  9.7 / 1.3s  8.5 / 2.2s   24.6 / 2.1s*  0 / 0.03s
gaussian_noise-5    204 MB      201 MB      204 MB       201 MB        221 MB
  write / read      6.5 / 1.3s  9.6 / 1.2s  9.9 / 2.0s   9.8 / 1.6s*   0 / 0.03s
contrast-5          27 MB       18 MB       34 MB        --            221 MB
jpeg_compression-5  21 MB       19 MB       17 MB        --            221 MB
==================  ==========  ==========  ===========  ============  =============

(* measured while another job held both cores.)  Noise is incompressible by any exact codec, so higher
levels buy ~3 % for 1.5–6× the write time; lzma-0 was barely smaller (117 / 208 MB) and 6–15× slower to
read.  Blocks are (de)compressed on a few threads (zlib releases the GIL).  This format, same data: clean
render 125 MB, written in 3.2 s, read whole in 1.6–2.0 s (4.5 s with both cores busy), 512 of its rows in
0.3 s, 64 rows in 0.04 s; gaussian_noise-5 204 MB, 5.4 s, 1.6–2.0 s, 0.4 s, 0.04 s.  The last full arrays
read or written (up to ``MEMO_BYTES``) stay in memory, so a repeated read in one process costs a copy
(0.03 s).  Entries of the old uncompressed ``.npy`` format are never read; they count as least recent
and go first.

Ragged entries (``RAGGED_MAGIC``, same ``.qsc`` suffix, same bound and eviction) hold items of one dtype
but any shape each — a real dataset's corrupted images at their own sizes (src/qshift/data/pipeline.py).
They are written in one pass as items arrive (:class:`RaggedWriter`, items compressed where they are
made; an item whose 64 KB sample zlib shrinks by under 10 % is stored raw) and read one item at a time
(:class:`RaggedArrays`), so no set is ever held in memory whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from qshift.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

#: the data file's suffix (the spec beside it is ``.json``)
SUFFIX = ".qsc"
#: the uncompressed entries of earlier versions: never read, evicted first
LEGACY_SUFFIX = ".npy"
MAGIC = b"QSHIFTC1"
ZLIB_LEVEL = 1
#: the default size bound, MiB
DEFAULT_MAX_MB = 4096
#: rows are grouped into blocks of about this many raw bytes (one 192 px image is 110 KB: one a block)
BLOCK_BYTES = 64 * 1024
_STALE_TMP_S = 3600


def cache_dir() -> Path | None:
    env = os.environ.get("QSHIFT_CACHE")
    if env and env.lower() in ("off", "0", "none", "false"):
        return None
    return Path(env) if env else Path.home() / ".cache" / "qshift"


def cache_max_bytes() -> int | None:
    """The size bound from ``QSHIFT_CACHE_MAX_MB`` (MiB; default 4096); None: unbounded."""
    raw = os.environ.get("QSHIFT_CACHE_MAX_MB", "").strip()
    if not raw:
        return DEFAULT_MAX_MB * 2**20
    if raw.lower() in ("none", "inf", "unlimited"):
        return None
    try:
        mb = float(raw)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
    except ValueError:
        log.warning("QSHIFT_CACHE_MAX_MB must be a size in MiB or 'none', got %r; using %d", raw, DEFAULT_MAX_MB)
        return DEFAULT_MAX_MB * 2**20
    return int(mb * 2**20)


def cache_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _entry_path(root: Path, spec: dict[str, Any]) -> Path:
    return root / f"{spec.get('kind', 'item')}-{cache_key(spec)}{SUFFIX}"


# ------------------------------------------------------------------------------- the format

def _threads(n_blocks: int) -> int:
    return max(1, min(4, os.cpu_count() or 1, n_blocks // 8))


def _blocks(n_rows: int, row_bytes: int) -> int:
    """Rows per block."""
    return max(1, min(n_rows, BLOCK_BYTES // max(1, row_bytes)))


def write_array(path: Path, arr: np.ndarray) -> int:
    """Write ``arr`` to ``path`` (atomically) in the compressed format; returns the file's size."""
    arr = np.asarray(arr)
    arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
    if arr.dtype.hasobject or arr.dtype.fields is not None:
        raise TypeError(f"cannot cache arrays of dtype {arr.dtype}")
    flat = arr.reshape(1) if arr.ndim == 0 else arr
    n = flat.shape[0]
    row_bytes = int(np.prod(flat.shape[1:], dtype=np.int64)) * flat.dtype.itemsize  # not flat[0].nbytes: str scalars drop padding
    per = _blocks(n, row_bytes)
    starts = range(0, n, per)
    raw = memoryview(flat.reshape(-1).view(np.uint8)) if flat.size else memoryview(b"")

    def comp(s: int) -> bytes:
        return zlib.compress(raw[s * row_bytes:min(n, s + per) * row_bytes], ZLIB_LEVEL)

    k = _threads(len(starts))
    if k > 1:
        with ThreadPoolExecutor(k) as ex:
            blocks = list(ex.map(comp, starts))
    else:
        blocks = [comp(s) for s in starts]
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape), "codec": "zlib", "level": ZLIB_LEVEL,
                         "rows_per_block": per, "blocks": [len(b) for b in blocks]}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for b in blocks:
            f.write(b)
        size = f.tell()
    return size


def read_array(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Read an array written by ``write_array`` (only its ``rows`` when given, inflating only their blocks).

    Raises FileNotFoundError when it is missing and ValueError (or OSError) when it is unreadable."""
    with open(path, "rb") as f:
        try:
            lead = f.read(len(MAGIC) + 8)
            if lead[:len(MAGIC)] != MAGIC or len(lead) != len(MAGIC) + 8:
                raise ValueError("not a qshift cache file")
            (hlen,) = struct.unpack("<Q", lead[len(MAGIC):])
            head = json.loads(f.read(hlen))
            dtype, shape = np.dtype(head["dtype"]), tuple(head["shape"])
            per, sizes = int(head["rows_per_block"]), [int(b) for b in head["blocks"]]
            if head.get("codec") != "zlib":
                raise ValueError(f"unknown codec {head.get('codec')!r}")
        except (KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"bad header ({e!r})") from None
        base = len(MAGIC) + 8 + hlen
        offsets = [base, *(base + np.cumsum(sizes, dtype=np.int64)).tolist()]
        size = os.fstat(f.fileno()).st_size
        if offsets[-1] != size:
            raise ValueError(f"file is {size} bytes, its header says {offsets[-1]} (truncated?)")
        flat_shape = (1,) if shape == () else shape
        n, row_shape = flat_shape[0], flat_shape[1:]
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise IndexError(f"rows out of range for an entry of {n} rows")
            need = np.unique(rows // per).tolist()
        else:
            need = list(range(len(sizes)))
        if 2 * len(need) > len(sizes):  # most of the file: one read
            whole = memoryview(f.read())
            blobs = {b: whole[offsets[b] - base:offsets[b + 1] - base] for b in need}
        else:
            blobs = {}
            for b in need:
                f.seek(offsets[b])
                blobs[b] = f.read(sizes[b])
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize

    def block(b: int) -> np.ndarray:
        lo, hi = b * per, min(n, (b + 1) * per)
        try:
            data = zlib.decompress(blobs[b])
        except zlib.error as e:
            raise ValueError(f"block {b}: {e}") from None
        if len(data) != (hi - lo) * row_bytes:
            raise ValueError(f"block {b} inflates to {len(data)} bytes, expected {(hi - lo) * row_bytes}")
        return np.frombuffer(data, dtype=dtype).reshape((hi - lo, *row_shape))

    k = _threads(len(need))
    if k > 1:
        with ThreadPoolExecutor(k) as ex:
            got = dict(zip(need, ex.map(block, need)))
    else:
        got = {b: block(b) for b in need}
    if rows is None:
        out = np.concatenate([got[b] for b in need]) if need else np.empty(flat_shape, dtype)
        return out.reshape(shape)
    out = np.empty((len(rows), *row_shape), dtype)
    for j, r in enumerate(rows.tolist()):
        out[j] = got[r // per][r % per]
    return out


# ---------------------------------------------------------------------------- get / put

def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves entries, just without recency
        pass


#: the last full arrays read, in memory (their copies are handed out), so that a process asking for the
#: same large set again (the clean render, once per benchmark) does not inflate it again: path →
#: ((inode, size), array), least recent first; at most ``MEMO_BYTES`` in all
_MEMO: OrderedDict[Path, tuple[tuple[int, int], np.ndarray]] = OrderedDict()
MEMO_BYTES = 512 * 2**20


def _memo_get(path: Path, rows: np.ndarray | None) -> np.ndarray | None:
    hit = _MEMO.get(path)
    if hit is None:
        return None
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or hit[0] != (st.st_ino, st.st_size):  # evicted or rewritten since
        _MEMO.pop(path, None)
        return None
    _MEMO.move_to_end(path)
    return hit[1].copy() if rows is None else hit[1][np.asarray(rows, dtype=np.int64)]


def _memo_put(path: Path, arr: np.ndarray) -> None:
    if arr.nbytes > MEMO_BYTES:
        return
    try:
        st = path.stat()
    except OSError:
        return
    _MEMO[path] = ((st.st_ino, st.st_size), arr.copy())
    _MEMO.move_to_end(path)
    while sum(a.nbytes for _, a in _MEMO.values()) > MEMO_BYTES:
        _MEMO.popitem(last=False)


def cache_load(spec: dict[str, Any], rows: np.ndarray | None = None) -> np.ndarray | None:
    """The cached array for ``spec`` (only its ``rows`` when given), or None when there is none (or it is
    unreadable: then a warning).  A hit marks the entry as recently used."""
    root = cache_dir()
    if root is None:
        return None
    path = _entry_path(root, spec)
    out = _memo_get(path, rows)
    if out is None:
        try:
            out = read_array(path, rows)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable cache entry %s (%s); recomputing", path, e)
            return None
        if rows is None:
            _memo_put(path, out)
    _touch(path)
    return out


def cache_store(spec: dict[str, Any], arr: np.ndarray) -> Path | None:
    """Save ``arr`` under ``spec`` and evict least-recently-used entries beyond the bound; returns the
    entry's path (None when caching is off or the folder is not writable: then a warning)."""
    root = cache_dir()
    if root is None:
        return None
    path = _entry_path(root, spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_array(path, arr)
        write_text_atomic(path.with_suffix(".json"), json.dumps(spec, sort_keys=True, indent=1))
    except OSError as e:
        log.warning("could not write cache entry %s: %s", path, e)
        return None
    _memo_put(path, np.asarray(arr))
    evict(keep=path)
    return path


def cached_array(spec: dict[str, Any], make: Callable[[], np.ndarray]) -> np.ndarray:
    """``make()`` once per ``spec``; later calls load the saved array."""
    hit = cache_load(spec)
    if hit is not None:
        return hit
    out = make()
    cache_store(spec, out)
    return out


def cached_texts(spec: dict[str, Any], make: Callable[[], list[str]]) -> list[str]:
    """Like ``cached_array`` for a list of strings."""
    arr = cached_array(spec, lambda: np.asarray(make(), dtype=np.str_))
    return [str(x) for x in arr.tolist()]


# ----------------------------------------------------------------------- listing / eviction

def _entries(root: Path) -> list[dict[str, Any]]:
    """Every entry in ``root``: path, kind, bytes (data + spec), mtime_ns, legacy; files that vanish
    while listing (another process evicting) are skipped."""
    out = []
    try:
        names = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for e in names:
        legacy = e.name.endswith(LEGACY_SUFFIX)
        if not (e.name.endswith(SUFFIX) or legacy) or "-" not in e.name:
            continue
        try:
            st = e.stat()
        except FileNotFoundError:
            continue
        path = Path(e.path)
        size = st.st_size
        try:
            size += path.with_suffix(".json").stat().st_size
        except OSError:
            pass
        out.append({"path": path, "kind": e.name.rsplit("-", 1)[0], "bytes": size, "mtime_ns": st.st_mtime_ns,
                    "legacy": legacy})
    return out


def _remove(entry_path: Path) -> int:
    """Remove an entry's files; returns the bytes freed (0 if another process got there first)."""
    freed = 0
    for p in (entry_path, entry_path.with_suffix(".json")):
        try:
            size = p.stat().st_size
            p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def evict(keep: Path | None = None, max_bytes: int | None | str = "env") -> tuple[int, int]:
    """Remove least-recently-used entries until the cache is under ``max_bytes`` (default: the
    ``QSHIFT_CACHE_MAX_MB`` bound), never ``keep``; returns (entries removed, bytes freed)."""
    root = cache_dir()
    bound = cache_max_bytes() if max_bytes == "env" else max_bytes
    if root is None or bound is None:
        return 0, 0
    entries = _entries(root)
    total = sum(e["bytes"] for e in entries)
    n = freed = 0
    for e in sorted(entries, key=lambda e: (not e["legacy"], e["mtime_ns"], e["path"].name)):
        if total <= bound:
            break
        if keep is not None and e["path"] == keep:
            continue
        try:
            got = _remove(e["path"])
        except OSError as err:
            log.warning("could not evict cache entry %s: %s", e["path"], err)
            continue
        total -= e["bytes"]
        n, freed = n + 1, freed + got
        log.info("evicted cache entry %s (%d bytes)", e["path"].name, got)
    return n, freed


def cache_info() -> dict[str, Any]:
    """The cache's folder, whether it is on, its bound, and what it holds (for ``qshift cache info``).

    Keys: ``folder`` (str or None when off), ``enabled``, ``max_bytes`` (None: unbounded), ``total_bytes``,
    ``entries``, ``kinds`` ({kind: {"entries", "bytes"}}, current format), ``legacy`` ({"entries", "bytes"}:
    old ``.npy`` entries, never read), ``oldest`` / ``newest`` (ISO-8601 UTC last use, None when empty)."""
    root = cache_dir()
    info: dict[str, Any] = {"folder": str(root) if root is not None else None, "enabled": root is not None,
                            "max_bytes": cache_max_bytes(), "total_bytes": 0, "entries": 0, "kinds": {},
                            "legacy": {"entries": 0, "bytes": 0}, "oldest": None, "newest": None}
    if root is None:
        return info
    entries = _entries(root)
    for e in entries:
        slot = info["legacy"] if e["legacy"] else info["kinds"].setdefault(e["kind"], {"entries": 0, "bytes": 0})
        slot["entries"] += 1
        slot["bytes"] += e["bytes"]
    info["kinds"] = dict(sorted(info["kinds"].items()))
    info["entries"] = len(entries)
    info["total_bytes"] = sum(e["bytes"] for e in entries)
    if entries:
        stamp = lambda ns: datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
        info["oldest"] = stamp(min(e["mtime_ns"] for e in entries))
        info["newest"] = stamp(max(e["mtime_ns"] for e in entries))
    return info


def cache_clear(kind: str | None = None) -> tuple[int, int]:
    """Remove every entry (only those of ``kind``, e.g. ``corrupt``, ``render``, ``perturb``, when given);
    returns (entries removed, bytes freed).  A full clear also removes orphaned specs and the temporary
    files of writes that died (older than an hour)."""
    root = cache_dir()
    if root is None:
        return 0, 0
    n = freed = 0
    for e in _entries(root):
        if kind is None or e["kind"] == kind:
            freed += _remove(e["path"])
            n += 1
    if kind is None:
        try:
            leftovers = list(os.scandir(root))
        except (FileNotFoundError, NotADirectoryError):
            leftovers = []
        now = time.time()
        for e in leftovers:
            try:
                st = e.stat()
                orphan = e.name.endswith(".json") and not any(
                    Path(e.path).with_suffix(s).exists() for s in (SUFFIX, LEGACY_SUFFIX))
                stale = e.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S
                if orphan or stale:
                    os.unlink(e.path)
                    freed += st.st_size
            except FileNotFoundError:
                pass
    return n, freed


# --------------------------------------------------------------------------- ragged entries

#: a ragged entry: items of one dtype and any shape each (real images: every photo its own size)
RAGGED_MAGIC = b"QSHIFTR1"
_TRAILER = struct.Struct("<Q")


#: each block of a ragged entry starts with its codec: zlib, or the raw bytes (when zlib saves too little)
_ZLIB_BLOCK, _RAW_BLOCK = b"Z", b"R"
#: a sample of this many bytes is compressed first; when it shrinks by less than ``RAW_BELOW`` the item is
#: stored raw (noise-like images — the noise corruptions, grainy photos — gain ~5 % for 20+ ms each)
PROBE_BYTES, RAW_BELOW = 64 * 1024, 0.10


def compress_item(arr: np.ndarray) -> bytes:
    """One item as a ragged entry stores it: a codec byte, then its zlib-compressed bytes (the cache's
    level) or, when a sample shows zlib would save under 10 %, its raw bytes.  Done where the item is made
    (a data-loader worker), so the process writing the entry only copies bytes."""
    raw = np.ascontiguousarray(arr).tobytes()
    if len(raw) > 2 * PROBE_BYTES:
        mid = len(raw) // 2
        probe = len(zlib.compress(raw[mid:mid + PROBE_BYTES], ZLIB_LEVEL))
        if probe > (1 - RAW_BELOW) * PROBE_BYTES:
            return _RAW_BLOCK + raw
    return _ZLIB_BLOCK + zlib.compress(raw, ZLIB_LEVEL)


def _inflate_item(blob: bytes) -> bytes | memoryview:
    if blob[:1] == _RAW_BLOCK:
        return memoryview(blob)[1:]
    if blob[:1] != _ZLIB_BLOCK:
        raise ValueError(f"unknown block codec {blob[:1]!r}")
    return zlib.decompress(blob[1:])


class RaggedWriter:
    """Streams items into a ragged entry, then commits it atomically (``with`` commits on success and
    discards the partial file on an error).

    Layout: ``RAGGED_MAGIC``, one block per item (:func:`compress_item`), a JSON trailer (dtype, codec, per-item shapes
    and block sizes), the trailer's length as a little-endian uint64 — so an entry is written in one
    pass, as its items arrive, without holding the set in memory."""

    def __init__(self, path: Path, dtype: str | np.dtype, spec: dict[str, Any] | None = None) -> None:
        self.path, self.dtype, self.spec = Path(path), np.dtype(dtype), spec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{id(self):x}.tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(RAGGED_MAGIC)
        self._shapes: list[list[int]] = []
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def add_compressed(self, blob: bytes, shape: tuple[int, ...]) -> None:
        """Append one item already compressed by :func:`compress_item`."""
        self._f.write(blob)
        self._shapes.append([int(s) for s in shape])
        self._sizes.append(len(blob))

    def add(self, arr: np.ndarray) -> None:
        """Append one item."""
        arr = np.asarray(arr)
        if arr.dtype != self.dtype:
            raise TypeError(f"a ragged entry of {self.dtype} got an item of {arr.dtype}")
        self.add_compressed(compress_item(arr), arr.shape)

    def commit(self) -> Path:
        """Write the trailer and move the entry into place (with its spec beside it when one was given)."""
        trailer = json.dumps({"dtype": self.dtype.str, "codec": "zlib-or-raw", "level": ZLIB_LEVEL,
                              "shapes": self._shapes, "sizes": self._sizes}).encode()
        self._f.write(trailer + _TRAILER.pack(len(trailer)))
        self._f.close()
        self._tmp.replace(self.path)
        if self.spec is not None:
            write_text_atomic(self.path.with_suffix(".json"), json.dumps(self.spec, sort_keys=True, indent=1))
        return self.path

    def abort(self) -> None:
        """Discard what was written."""
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RaggedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class RaggedArrays(Sequence):
    """A ragged entry opened for random access: ``items[i]`` inflates item ``i`` alone (a fresh array).

    The file stays open (so an entry evicted or a temporary file removed meanwhile still reads); reads
    use ``os.pread`` where there is one, so forked processes may share the handle.  It pickles by path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            size = os.fstat(fd).st_size
            head = self._read(fd, 0, len(RAGGED_MAGIC))
            if head != RAGGED_MAGIC or size < len(RAGGED_MAGIC) + _TRAILER.size:
                raise ValueError(f"{self.path}: not a qshift ragged cache entry")
            (tlen,) = _TRAILER.unpack(self._read(fd, size - _TRAILER.size, _TRAILER.size))
            start = size - _TRAILER.size - tlen
            if tlen <= 0 or start < len(RAGGED_MAGIC):
                raise ValueError(f"{self.path}: bad trailer length {tlen} (truncated?)")
            try:
                meta = json.loads(self._read(fd, start, tlen))
                self.dtype = np.dtype(meta["dtype"])
                self.shapes = [tuple(int(x) for x in s) for s in meta["shapes"]]
                sizes = [int(s) for s in meta["sizes"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}: bad trailer ({e!r})") from None
            if meta.get("codec") != "zlib-or-raw" or len(sizes) != len(self.shapes):
                raise ValueError(f"{self.path}: bad trailer (codec {meta.get('codec')!r}, {len(sizes)} blocks for "
                                 f"{len(self.shapes)} items)")
            offsets = np.concatenate([[len(RAGGED_MAGIC)], len(RAGGED_MAGIC) + np.cumsum(sizes, dtype=np.int64)])
            if int(offsets[-1]) != start:
                raise ValueError(f"{self.path}: blocks end at {int(offsets[-1])}, the trailer starts at {start}")
        except BaseException:
            os.close(fd)
            raise
        self._offsets = offsets
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)

    @staticmethod
    def _read(fd: int, offset: int, n: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(fd, n, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
        return os.read(fd, n)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a ragged entry of {len(self)}")
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        try:
            data = _inflate_item(self._read(self._fd, lo, hi - lo))
        except (zlib.error, ValueError) as e:
            raise ValueError(f"{self.path}: item {i}: {e}") from None
        shape = self.shapes[i]
        if len(data) != int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize:
            raise ValueError(f"{self.path}: item {i} inflates to {len(data)} bytes, not shape {shape}")
        return np.frombuffer(data, dtype=self.dtype).reshape(shape).copy()

    def close(self) -> None:
        self._close()

    def __reduce__(self):
        if not self.path.is_file():
            raise TypeError(f"{self.path} is gone (a temporary set, built with the cache off); it cannot be "
                            "sent to another process")
        return (RaggedArrays, (self.path,))


def ragged_entry_path(spec: dict[str, Any]) -> Path | None:
    """Where the ragged entry for ``spec`` lives (None when caching is off)."""
    root = cache_dir()
    return None if root is None else _entry_path(root, spec)


def cache_open_ragged(spec: dict[str, Any]) -> RaggedArrays | None:
    """The ragged entry for ``spec`` opened for reading, or None when there is none (or it is unreadable:
    then a warning); a hit marks the entry as recently used."""
    path = ragged_entry_path(spec)
    if path is None:
        return None
    try:
        out = RaggedArrays(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("unreadable cache entry %s (%s); recomputing", path, e)
        return None
    _touch(path)
    return out


def cache_ragged_writer(spec: dict[str, Any], dtype: str | np.dtype = np.uint8) -> RaggedWriter | None:
    """A writer for ``spec``'s ragged entry (None when caching is off or the folder is not writable: then
    a warning).  Call :func:`ragged_committed` after it commits, to apply the size bound."""
    path = ragged_entry_path(spec)
    if path is None:
        return None
    try:
        return RaggedWriter(path, dtype, spec)
    except OSError as e:
        log.warning("could not write cache entry %s: %s", path, e)
        return None


def ragged_committed(path: Path) -> None:
    """Apply the size bound after a ragged entry was written (never removing that entry)."""
    evict(keep=path)


def norm_rows(rows, n: int) -> np.ndarray | None:
    """``rows`` as int64 indices into ``n`` items (images, captions); None when absent or exactly every item in order."""
    if rows is None:
        return None
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise ValueError(f"rows must be a 1-D array of integer indices, got {r.dtype} {r.shape}")
    r = r.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= n):
        raise IndexError(f"rows must lie in [0, {n}), got {int(r.min())}..{int(r.max())}")
    if len(r) == n and np.array_equal(r, np.arange(n)):
        return None
    return r
