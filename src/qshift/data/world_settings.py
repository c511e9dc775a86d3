"""The embedded world's knobs read from the environment: their defaults and the checked readers.

:mod:`qshift.data.world` reads each knob once, at import, into ``RENDER_SIZE``, ``BG_GREY`` and
``TEST_IMAGES`` (and records the non-default ones with ``world_variant()``).
"""
from __future__ import annotations

import os

from qshift.data.world_scenes import IMAGE_SIZE

#: the benchmark's default render size (world v1 used 96 until the v6 source model)
DEFAULT_RENDER_SIZE = 192

#: the range of a scene background's grey level (0-255) before its tint; world v1 draws 90-200.
#: ``QSHIFT_WORLD_BG_GREY=lo,hi`` selects another range, for probing a candidate world (cached sets and
#: result cells record it when it is not the default).
DEFAULT_BG_GREY = (90.0, 200.0)

#: Images in the ``test`` split (10,000 captions with 2,000). ``QSHIFT_WORLD_TEST_IMAGES=N`` draws a larger
#: (or smaller) test split from the same seed for probing how stream length matters, e.g. 5,000 as COCO's
#: 5K test; the scenes are drawn in order, so the first 2,000 (and ``test1k``) are those of the standard
#: split. Recorded by ``world_variant`` like the background range.
DEFAULT_TEST_IMAGES = 2000


def env_render_size() -> int:
    """``QSHIFT_RENDER_SIZE`` (default :data:`DEFAULT_RENDER_SIZE`), a positive multiple of ``IMAGE_SIZE``."""
    raw = os.environ.get("QSHIFT_RENDER_SIZE", str(DEFAULT_RENDER_SIZE))
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"QSHIFT_RENDER_SIZE must be an integer multiple of {IMAGE_SIZE}, got {raw!r}") from None
    if size <= 0 or size % IMAGE_SIZE:
        raise ValueError(f"QSHIFT_RENDER_SIZE must be a positive multiple of {IMAGE_SIZE}, got {size}")
    return size


def env_bg_grey() -> tuple[float, float]:
    """``QSHIFT_WORLD_BG_GREY=lo,hi`` (default :data:`DEFAULT_BG_GREY`), with 0 <= lo < hi <= 255."""
    raw = os.environ.get("QSHIFT_WORLD_BG_GREY")
    if raw is None:
        return DEFAULT_BG_GREY
    try:
        lo, hi = (float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"QSHIFT_WORLD_BG_GREY must be 'lo,hi' (grey levels 0-255), got {raw!r}") from None
    if not 0 <= lo < hi <= 255:
        raise ValueError(f"QSHIFT_WORLD_BG_GREY needs 0 <= lo < hi <= 255, got {raw!r}")
    return (lo, hi)


def env_test_images() -> int:
    """``QSHIFT_WORLD_TEST_IMAGES`` (default :data:`DEFAULT_TEST_IMAGES`), within 1000..20000."""
    raw = os.environ.get("QSHIFT_WORLD_TEST_IMAGES")
    if raw is None:
        return DEFAULT_TEST_IMAGES
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"QSHIFT_WORLD_TEST_IMAGES must be a whole number of images, got {raw!r}") from None
    if not 1000 <= n <= 20000:
        raise ValueError(f"QSHIFT_WORLD_TEST_IMAGES must be within 1000..20000 (test1k is its first 1,000), got {n}")
    return n
