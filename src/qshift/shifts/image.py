"""Image corruptions: the 16 ImageNet-C corruptions of COCO-C / Flickr-C, severities 1–5.

Implemented by ``imagecorruptions-imaug`` (the maintained, numpy-2-compatible fork of
``imagecorruptions``, same API and severity tables).  Every call is deterministic: the random state
is derived from (item id, corruption, severity, seed) alone, so the same query gets the same pixels
whatever batch or worker it is corrupted in.
"""
from __future__ import annotations

import hashlib
from importlib import metadata

import numpy as np

#: the 16 corruptions of the COCO-C / Flickr-C benchmarks (TCR's list), in its order
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
LIBRARY = "imagecorruptions-imaug"


def _library():
    try:
        # deferred to first use, not optional: imagecorruptions loads scipy, scikit-image and OpenCV (~0.6 s)
        import imagecorruptions  # noqa: F401
        from imagecorruptions import corrupt, get_corruption_names
    except ImportError as e:  # pragma: no cover - a dependency of qshift
        raise ImportError(f"image corruptions need the `{LIBRARY}` package: pip install {LIBRARY}") from e
    return corrupt, get_corruption_names


def library_version() -> str:
    try:
        return f"{LIBRARY}=={metadata.version(LIBRARY)}"
    except metadata.PackageNotFoundError:  # pragma: no cover
        return f"{LIBRARY}==unknown"


def available_corruptions() -> tuple[str, ...]:
    """Every corruption name accepted: the 16 benchmark ones plus the library's extra ones."""
    _, names = _library()
    extra = [n for n in names("all") if n not in CORRUPTIONS]
    return CORRUPTIONS + tuple(extra)


def corruption_seed(item_id: int, corruption: str, severity: int, seed: int) -> int:
    """A 32-bit seed from (item id, corruption, severity, seed), stable across processes and runs."""
    key = f"{int(item_id)}|{corruption}|{int(severity)}|{int(seed)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little") & 0x7FFFFFFF


def corrupt_image(image: np.ndarray, corruption: str, severity: int, item_id: int, seed: int = 0) -> np.ndarray:
    """Corrupt one uint8 HWC image deterministically; returns uint8 HWC of the same shape."""
    if corruption not in available_corruptions():
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(available_corruptions())}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    corrupt, _ = _library()
    s = corruption_seed(item_id, corruption, severity, seed)
    # the library draws from numpy's global state (and takes an explicit seed for two corruptions);
    # save and restore it so callers' random streams are untouched
    state = np.random.get_state()
    try:
        np.random.seed(s)
        kwargs = {"seed": s} if corruption in ("glass_blur", "impulse_noise") else {}
        out = corrupt(image, severity=severity, corruption_name=corruption, **kwargs)
    finally:
        np.random.set_state(state)
    if out.shape != image.shape:  # some corruptions return [H, W] or a size off by one for odd inputs
        raise RuntimeError(f"{corruption} returned shape {out.shape} for input {image.shape}")
    return out


def corrupt_batch(images: np.ndarray, corruption: str, severity: int, item_ids, seed: int = 0) -> np.ndarray:
    """Corrupt a uint8 [N, H, W, 3] batch; item ``k`` is seeded by ``item_ids[k]``."""
    ids = list(item_ids)
    if len(ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(ids)} item ids")
    return np.stack([corrupt_image(im, corruption, severity, i, seed) for im, i in zip(images, ids)])
