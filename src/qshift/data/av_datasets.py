"""VGGSound and Kinetics-Sounds (KS-50) — the video–audio retrieval datasets of CAV-MAE and READ — from their
JSON files.

**The JSON** (CAV-MAE's ``src/dataloader.py``, READ's ``data_process/create_clean_json.py``)::

    {"data": [{"video_id": "kQ7tkcg8Xag_415", "wav": ".../audio_test/kQ7tkcg8Xag_415.wav",
               "video_path": ".../image_mulframe_test/", "labels": "vgg_115"}, ...]}

A clip's frames are ``<video_path>/frame_<i>/<video_id>.jpg`` (``i`` = 0..9, CAV-MAE's
``extract_video_frame.py``); CAV-MAE and READ evaluate on frame 5 (``frame_use``), and when it is missing on
the highest earlier frame that exists (CAV-MAE's ``randselect_img``).  ``wav`` is a 16 kHz mono WAV; files at
another rate are resampled to 16 kHz (``scipy.signal.resample_poly``) and a multi-channel file gives its first
channel (what ``torchaudio.compliance.kaldi.fbank`` reads).  ``labels`` is kept, not used (retrieval is
one-to-one: a clip's own audio track is its only positive).

**Paths.**  READ's released JSONs hold its authors' absolute paths (``/xlearning/...``).  A path is used as
written when it exists; otherwise — and for relative paths — it is looked up under ``--data-root`` (then the
JSON's folder) by its longest trailing part that exists there: ``/xlearning/.../VGGSound/audio_test/x.wav``
is found as ``<data-root>/audio_test/x.wav`` (or ``<data-root>/VGGSound/audio_test/x.wav``).  Folders are
resolved once each.

**READ's -C layout** (``make_corruptions/make_c_video.py``, ``make_c_audio.py``, ``data_process/
create_{video,audio}_c_json.py``)::

    <json root>/clean/severity_0.json                       the clean set (the annotation this loader reads)
    <json root>/video/<corruption>/severity_<s>.json        video_path -> <frames>-C/<corruption>/severity_<s>/
    <json root>/audio/<corruption>/severity_<s>.json        wav -> <audio>-C/<corruption>/severity_<s>/<id>.wav
    <frames>-C/<corruption>/severity_<s>/frame_<i>/<id>.jpg  every frame: Resize(256), CenterCrop(224),
                                                            corrupted, JPEG quality 85
    <audio>-C/<corruption>/severity_<s>/<id>.wav            gaussian_noise, or a weather / traffic / crowd
                                                            recording overlaid (pydub)

(READ's JSONs are shuffled: entries are matched to the clean set by ``video_id``.)  Without the JSON, the
sibling folder ``<clean frames folder>-C`` / ``<clean audio folder>-C`` is used when it exists.
:meth:`AVDataset.precorrupted` finds these; ``shift_source`` says whether the ``-c`` benchmarks read them
(``auto``: when present, else corrupt on the fly; ``files``: required; ``generate``: always on the fly).

**On the fly**, a video query is READ's pipeline without the JPEG round trip: each frame Resize(256) (bilinear)
+ CenterCrop(224), then :func:`qshift.shifts.video.corrupt_clip`; an audio query is the 16 kHz waveform under
:func:`qshift.shifts.audio.corrupt_audio` (``noise_dir``: READ's ``weather_audios`` folder).  Both are seeded by
(the clip's row in the clean JSON, corruption, severity, shift seed).

Every mistake — a missing file or folder, a JSON without ``"data"``, an entry without ``wav``, a missing frame
or WAV — is a one-line :class:`~qshift.errors.UserError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image

from qshift.errors import UserError

AV_DATASETS: tuple[str, ...] = ("vggsound", "ks50")
#: READ's folder name of each dataset's JSON files (``json_csv_files/<name>/clean/severity_0.json``)
READ_JSON_NAMES: dict[str, str] = {"vggsound": "vgg", "ks50": "ks50"}
CLEAN_JSON = Path("clean") / "severity_0.json"
#: CAV-MAE's evaluation frame (``frame_use = 5``, ``int(total_frame / 2)`` of 10)
FRAME_USE = 5
TOTAL_FRAMES = 10
#: READ's frame transform before corrupting (``make_c_video.py``: ``Resize(256), CenterCrop(224)``)
READ_RESIZE, READ_CROP = 256, 224
SAMPLE_RATE = 16000
#: where the ``-c`` benchmarks' corrupted queries come from
SHIFT_SOURCES: tuple[str, ...] = ("auto", "files", "generate")
MODALITIES: tuple[str, ...] = ("video", "audio")


# ------------------------------------------------------------------------------------ paths

class _Resolver:
    """JSON paths to files here: as written when they exist, else under ``roots`` by their longest trailing
    part that exists (folders cached)."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self._dirs: dict[str, Path] = {}

    def folder(self, text: str) -> Path:
        if text not in self._dirs:
            self._dirs[text] = self._find(Path(text))
        return self._dirs[text]

    def file(self, text: str) -> Path:
        p = Path(text)
        if p.is_absolute() and p.is_file():
            return p
        return self.folder(str(p.parent)) / p.name if p.name else self.folder(text)

    def _find(self, p: Path) -> Path:
        if p.is_absolute() and p.is_dir():
            return p
        parts = p.parts[1:] if p.is_absolute() else p.parts
        for i in range(len(parts)):
            for root in self.roots:
                cand = root.joinpath(*parts[i:])
                if cand.is_dir():
                    return cand
        return p if p.is_absolute() else self.roots[0] / p


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from e


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The ``"data"`` list of a CAV-MAE / READ JSON, each entry checked to hold ``video_id``, ``wav`` and
    ``video_path`` (strings) and the video ids to be distinct."""
    payload = _read_json(path)
    if not isinstance(payload, dict) or "data" not in payload:
        raise UserError(f"{path}: expected a JSON object with a \"data\" list (CAV-MAE / READ's format), got "
                        f"{type(payload).__name__}{' with keys ' + ', '.join(map(str, list(payload)[:4])) if isinstance(payload, dict) else ''}")
    data = payload["data"]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: \"data\" must be a non-empty list of {{video_id, wav, video_path, labels}}")
    seen: dict[str, int] = {}
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise UserError(f"{path}: entry {i} is not an object")
        for key in ("video_id", "wav", "video_path"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise UserError(f"{path}: entry {i} lacks {key!r} (a non-empty string)")
        if e["video_id"] in seen:
            raise UserError(f"{path}: video_id {e['video_id']!r} is listed twice (entries {seen[e['video_id']]} "
                            f"and {i}); retrieval is one-to-one")
        seen[e["video_id"]] = i
    return data


# ------------------------------------------------------------------------------------ media

def read_frame(path: Path) -> np.ndarray:
    """A frame as uint8 [H, W, 3] (RGB)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"frame not found: {path}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be decoded as an image ({e})") from e


def read_crop(frame: np.ndarray, size: int = READ_CROP, resize: int = READ_RESIZE) -> np.ndarray:
    """READ's frame transform before corrupting: the shorter side to ``resize`` (bilinear, as torchvision's
    ``Resize``), then a centre ``size`` crop → uint8 [size, size, 3]."""
    im = TF.resize(Image.fromarray(frame), resize, interpolation=TF.InterpolationMode.BILINEAR)
    return np.asarray(TF.center_crop(im, [size, size]))


def read_wav(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A WAV as float32 [N] in [-1, 1] at ``sample_rate``: the first channel, resampled when needed."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise UserError(f"wav not found: {path}") from None
    except (RuntimeError, OSError) as e:  # soundfile's LibsndfileError is a RuntimeError
        if not Path(path).is_file():
            raise UserError(f"wav not found: {path}") from None
        raise UserError(f"{path}: cannot be read as audio ({' '.join(str(e).split())[:160]})") from e
    w = data[:, 0]
    if sr != sample_rate:
        w = resample(w, int(sr), sample_rate, where=str(path))
    return np.ascontiguousarray(w, dtype=np.float32)


def resample(w: np.ndarray, rate: int, target: int = SAMPLE_RATE, where: str = "audio") -> np.ndarray:
    """``w`` from ``rate`` to ``target`` Hz by polyphase filtering (``scipy.signal.resample_poly``)."""
    try:
        from scipy.signal import resample_poly
    except ImportError:  # pragma: no cover - scipy is a dependency of the image corruptions
        raise UserError(f"{where} is at {rate} Hz; resampling to {target} Hz needs scipy (pip install scipy), "
                        f"or convert the files to {target} Hz mono first") from None
    g = math.gcd(int(rate), int(target))
    return resample_poly(np.asarray(w, dtype=np.float64), target // g, rate // g).astype(np.float32)


# ------------------------------------------------------------------------------------ the dataset

@dataclass
class AVDataset:
    """One JSON's clips: ``ids`` (video ids), their ``wavs``, ``video_paths`` (the folders holding
    ``frame_<i>/<id>.jpg``) and ``labels``, in the JSON's order (a clip's row is its relevance id).

    ``frames``: the frame indices a clip is read with (default CAV-MAE's ``(5,)``); ``json_root``: READ's
    JSON folder (``clean/``, ``video/``, ``audio/``), where :meth:`precorrupted` looks; ``noise_dir``: the
    recordings the audio corruptions overlay (READ's ``weather_audios``); ``shift_source``: see the module
    docstring."""

    name: str
    root: Path
    annotation: Path
    ids: list[str]
    wavs: list[Path]
    video_paths: list[Path]
    labels: list[str]
    frames: tuple[int, ...] = (FRAME_USE,)
    json_root: Path | None = None
    noise_dir: Path | None = None
    shift_source: str = "auto"
    split: str = "test"
    variant: str = "clean"
    _digest: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.wavs) == len(self.video_paths) == len(self.labels) == n):
            raise ValueError(f"{self.label}: inconsistent clip counts")
        if not self.frames or any(isinstance(f, bool) or int(f) < 0 for f in self.frames):
            raise UserError(f"frames must be frame indices >= 0, got {self.frames!r}")
        self.frames = tuple(int(f) for f in self.frames)
        if self.shift_source not in SHIFT_SOURCES:
            raise UserError(f"shift_source must be one of {', '.join(SHIFT_SOURCES)}, got {self.shift_source!r}")

    @property
    def label(self) -> str:
        """``vggsound``, ``vggsound[video/fog/5]``: what the set is, for messages."""
        return self.name if self.variant == "clean" else f"{self.name}[{self.variant}]"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def captions(self) -> list[str]:
        """No captions: an empty list (for code that counts a dataset's captions)."""
        return []

    def fingerprint(self) -> str:
        """SHA-256 of the annotation JSON (name and bytes)."""
        if self._digest is None:
            h = hashlib.sha256()
            h.update(self.annotation.name.encode() + b"\0")
            h.update(self.annotation.read_bytes())
            self._digest = h.hexdigest()
        return self._digest

    # ------------------------------------------------------------------------ media

    def frame_path(self, row: int, frame: int) -> Path:
        """``<video_path>/frame_<frame>/<id>.jpg``, or the highest earlier frame that exists (CAV-MAE's rule)."""
        folder, vid = self.video_paths[row], self.ids[row]
        for f in range(frame, -1, -1):
            p = folder / f"frame_{f}" / f"{vid}.jpg"
            if p.is_file():
                return p
        raise UserError(f"no frame of video {vid!r}: {folder / f'frame_{frame}' / f'{vid}.jpg'} (nor an earlier "
                        f"frame_<i>) exists")

    def video(self, row: int) -> np.ndarray:
        """Clip ``row`` as uint8 [T, H, W, 3], T = ``len(frames)`` (frames resized to the first's size if they
        differ)."""
        frames = [read_frame(self.frame_path(int(row), f)) for f in self.frames]
        h, w = frames[0].shape[:2]
        frames = [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC))
                  for f in frames]
        return np.stack(frames)

    def videos(self, rows: Sequence[int], size: int | None = None) -> list[np.ndarray] | np.ndarray:
        """Clips ``rows``: a list of uint8 [T, H, W, 3] at their own sizes, or, with ``size``, every frame through
        READ's Resize(size·256/224) + CenterCrop(size) as one uint8 array [B, T, size, size, 3]."""
        clips = [self.video(r) for r in rows]
        if size is None:
            return clips
        resize = int(round(size * READ_RESIZE / READ_CROP))
        return np.stack([np.stack([read_crop(f, size, resize) for f in c]) for c in clips])

    def audio(self, row: int) -> np.ndarray:
        """Clip ``row``'s audio track: float32 [N] at 16 kHz."""
        return read_wav(self.wavs[int(row)])

    def audios(self, rows: Sequence[int]) -> list[np.ndarray]:
        """The audio tracks of ``rows`` (lengths may differ)."""
        return [self.audio(r) for r in rows]

    def check_files(self) -> None:
        """Every WAV and every clip's frames exist (frames by CAV-MAE's fallback rule); a UserError naming the
        first missing file and how many are missing."""
        missing_wavs = [p for p in self.wavs if not p.is_file()]
        if missing_wavs:
            raise UserError(f"{len(missing_wavs)} of {len(self)} wav files listed in {self.annotation.name} are "
                            f"missing, e.g. wav not found: {missing_wavs[0]} (paths are looked up under "
                            f"--data-root {self.root})")
        for r in range(len(self)):
            for f in self.frames:
                self.frame_path(r, f)

    # ------------------------------------------------------------------------ READ's -C data

    def c_json(self, modality: str, corruption: str, severity: int) -> Path | None:
        """READ's ``<json root>/<modality>/<corruption>/severity_<s>.json``, if there is one."""
        if self.json_root is None:
            return None
        p = self.json_root / modality / corruption / f"severity_{int(severity)}.json"
        return p if p.is_file() else None

    def precorrupted(self, modality: str, corruption: str, severity: int) -> AVDataset | None:
        """This set with ``modality``'s files replaced by READ's pre-corrupted ones (rows aligned with this
        set's), from READ's JSON (:meth:`c_json`) or the sibling ``-C`` folder; None when neither exists."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        variant = f"{modality}/{corruption}/{int(severity)}"
        path = self.c_json(modality, corruption, severity)
        if path is not None:
            by_id = {e["video_id"]: e for e in read_entries(path)}
            absent = [v for v in self.ids if v not in by_id]
            if absent:
                raise UserError(f"{path}: no entry for {len(absent)} clip(s) of {self.annotation.name}, e.g. "
                                f"{absent[0]!r}")
            res = _Resolver([self.root, path.parent])
            if modality == "video":
                paths = [res.folder(by_id[v]["video_path"]) for v in self.ids]
                return replace(self, video_paths=paths, variant=variant, annotation=path, _digest=None)
            wavs = [res.file(by_id[v]["wav"]) for v in self.ids]
            return replace(self, wavs=wavs, variant=variant, annotation=path, _digest=None)
        sub = Path(corruption) / f"severity_{int(severity)}"
        if modality == "video":
            folder = self.video_paths[0]
            c_root = folder.parent / (folder.name + "-C") / sub
            if not c_root.is_dir():
                return None
            paths = [p.parent / (p.name + "-C") / sub for p in self.video_paths]
            return replace(self, video_paths=paths, variant=variant)
        folder = self.wavs[0].parent
        c_root = folder.parent / (folder.name + "-C") / sub
        if not c_root.is_dir():
            return None
        wavs = [p.parent.parent / (p.parent.name + "-C") / sub / p.name for p in self.wavs]
        return replace(self, wavs=wavs, variant=variant)

    def corrupted_source(self, modality: str, corruption: str, severity: int) -> AVDataset | None:
        """What the ``-c`` benchmark of (``modality``, ``corruption``, ``severity``) reads: READ's files
        (``shift_source`` ``auto`` when present, ``files`` always, else a UserError naming where it looked),
        or None to corrupt on the fly (``generate``, or ``auto`` without files)."""
        if self.shift_source == "generate":
            return None
        found = self.precorrupted(modality, corruption, severity)
        if found is None and self.shift_source == "files":
            where = (self.json_root / modality / corruption / f"severity_{int(severity)}.json"
                     if self.json_root is not None else None)
            folder = self.video_paths[0] if modality == "video" else self.wavs[0].parent
            sib = folder.parent / (folder.name + "-C") / corruption / f"severity_{int(severity)}"
            raise UserError(f"shift_source=files: no READ -C data for {modality} {corruption} severity {severity} "
                            f"({where or 'no JSON root'} nor {sib} exists)")
        return found


# ------------------------------------------------------------------------------------ lazy items

class _LazyTracks(Sequence):
    """One modality's items of ``ds`` (those of ``rows``, in that order) read on access: clean, from
    ``source`` (READ's pre-corrupted data), or corrupted on the fly seeded by (row, corruption, severity,
    seed); subclasses say how to read and corrupt an item."""

    def __init__(self, ds: AVDataset, rows: Sequence[int] | None = None, corruption: str | None = None,
                 severity: int = 0, seed: int = 0, source: AVDataset | None = None) -> None:
        self.ds, self.source = ds, source
        self.rows = np.arange(len(ds)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        row = int(self.rows[k])
        if self.source is not None:
            return self._read(self.source, row)
        if self.corruption is None:
            return self._read(self.ds, row)
        return self._corrupt(row)

    def _read(self, ds: AVDataset, row: int) -> np.ndarray:
        raise NotImplementedError

    def _corrupt(self, row: int) -> np.ndarray:
        raise NotImplementedError


class LazyClips(_LazyTracks):
    """Clips read on access as uint8 [T, H, W, 3]; on the fly, READ's crop then
    :func:`qshift.shifts.video.corrupt_clip`."""

    def _read(self, ds: AVDataset, row: int) -> np.ndarray:
        return ds.video(row)

    def _corrupt(self, row: int) -> np.ndarray:
        from qshift.shifts.video import corrupt_clip

        clip = np.stack([read_crop(f) for f in self.ds.video(row)])
        return corrupt_clip(clip, self.corruption, self.severity, item_id=row, seed=self.seed)


class LazyAudios(_LazyTracks):
    """Audio tracks read on access as float32 [N] at 16 kHz; on the fly,
    :func:`qshift.shifts.audio.corrupt_audio` (with the dataset's real noise files, if any)."""

    def _read(self, ds: AVDataset, row: int) -> np.ndarray:
        return ds.audio(row)

    def _corrupt(self, row: int) -> np.ndarray:
        from qshift.shifts.audio import corrupt_audio

        out = corrupt_audio(self.ds.audio(row), self.corruption, self.severity, item_id=row, seed=self.seed,
                            noise_dir=self.ds.noise_dir)
        return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------ loading

def _annotation(name: str, root: Path, annotation: str | Path | None) -> Path:
    if annotation is not None:
        p = Path(annotation)
        if not p.is_file():
            raise UserError(f"{name} annotation not found: {p}")
        return p
    folder = READ_JSON_NAMES[name]
    cands = [root / CLEAN_JSON, root / folder / CLEAN_JSON, root / "json_csv_files" / folder / CLEAN_JSON]
    for c in cands:
        if c.is_file():
            return c
    raise UserError(f"{name}: no annotation found under {root} (looked for {', '.join(str(c) for c in cands)}); "
                    "pass --annotation FILE (a CAV-MAE / READ JSON)")


def load_av_dataset(name: str, data_root: str | Path, annotation: str | Path | None = None,
                    check_files: bool = True, *, frames: Sequence[int] = (FRAME_USE,), shift_source: str = "auto",
                    noise_dir: str | Path | None = None, split: str = "test") -> AVDataset:
    """The clips of a CAV-MAE / READ JSON (``annotation``; default READ's ``clean/severity_0.json`` under
    ``data_root``, ``data_root/<vgg|ks50>/`` or ``data_root/json_csv_files/<vgg|ks50>/``), media looked up as
    the module docstring says.  ``check_files``: every WAV and frame must exist now (else later, on access);
    ``frames``: the frame indices a clip is read with; ``shift_source``: ``auto`` / ``files`` / ``generate``;
    ``noise_dir``: READ's ``weather_audios`` folder (default ``<data_root>/weather_audios`` when it exists)."""
    if name not in AV_DATASETS:
        raise UserError(f"unknown video-audio dataset {name!r}; expected one of {', '.join(AV_DATASETS)}")
    root = Path(data_root)
    if not root.is_dir():
        raise UserError(f"{name} data root not found: {root} (the folder holding the frames and WAVs)")
    ann = _annotation(name, root, annotation)
    entries = read_entries(ann)
    res = _Resolver([root, ann.parent])
    ids = [e["video_id"] for e in entries]
    wavs = [res.file(e["wav"]) for e in entries]
    videos = [res.folder(e["video_path"]) for e in entries]
    labels = ["" if e.get("labels") is None else str(e.get("labels")) for e in entries]
    json_root = ann.parent.parent if ann.parent.name == "clean" else ann.parent
    if noise_dir is None:
        noise = root / "weather_audios"
        noise_dir = noise if noise.is_dir() else None
    elif not Path(noise_dir).is_dir():
        raise UserError(f"noise_dir not found: {noise_dir} (READ's weather_audios folder)")
    ds = AVDataset(name, root, ann, ids, wavs, videos, labels, frames=tuple(frames), json_root=json_root,
                   noise_dir=None if noise_dir is None else Path(noise_dir), shift_source=shift_source, split=split)
    if check_files:
        ds.check_files()
    return ds


__all__ = ["AVDataset", "AV_DATASETS", "FRAME_USE", "LazyAudios", "LazyClips", "READ_CROP", "SHIFT_SOURCES",
           "load_av_dataset", "read_crop", "read_entries", "read_frame", "read_wav", "resample"]
