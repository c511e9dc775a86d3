"""Rendering an audio–video clip's frames: each frame is exactly the image world's rendering
(:func:`qshift.data.world_render.render_scene_at`) of the scene at that frame's time, in any of the
world's render domains, 4× supersampled and box-downsampled.

Everything but the objects is static within a clip — the background (and a ``clutter`` domain's
texture), the sketch hatching, the grain and a ``lowlight`` domain's sensor noise are drawn from the
scene's noise seed, as the image world does for every image — so a clip renders its background once and
then draws the objects per frame.  That is the whole difference from calling ``render_scene_at`` per
frame (about 3× faster at 32 px); the tests check the pixels are identical.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from qshift.data.av_scenes import FRAMES, AVScene, frame_time
from qshift.data.world_render import (DOMAINS, SUPERSAMPLE, _background, draw_object, finish_render, object_fill,
                                      sketch_hatch)
from qshift.data.world_scenes import IMAGE_SIZE
from qshift.errors import UserError

#: frame size in px: of 32 / 48 / 64 the smallest, at which shape, colour and size stay legible (the
#: measurements are in :mod:`qshift.data.av_world`'s docstring)
VIDEO_SIZE = 32
#: the size the benchmark renders (and corrupts) its clips at; the model's preprocessing area-downsamples
#: them to VIDEO_SIZE, as the image world renders at 192 px for a 96 px model.  ImageNet-C's severities are
#: defined in pixels for ~224 px images; measured on 400 val clips with the shipped AV model (v2a R@1,
#: clean / severity-5 gaussian_noise, defocus_blur, glass_blur, jpeg_compression): corrupted at 32 px
#: 40.0 / 0.5, 0.8, 2.5, 3.2 (nothing left to adapt), at 64 px 42.5 / 5.2, 12.8, 19.0, 22.2, at 128 px
#: 43.2 / 18.8, 33.2, 37.0, 37.2; a clip renders in ~46 ms at 128 px
BENCH_RENDER_SIZE = 128


def check_domain(domain: str) -> None:
    """Raise :class:`UserError` unless ``domain`` is one of the image world's render domains."""
    if domain not in DOMAINS:
        raise UserError(f"unknown render domain {domain!r}; known: {', '.join(DOMAINS)}")


def render_clip(scene: AVScene, size: int = VIDEO_SIZE, domain: str = "source",
                frames: int = FRAMES) -> np.ndarray:
    """Render a clip to uint8 RGB [frames, size, size, 3]; frame ``k`` shows the scene at
    :func:`~qshift.data.av_scenes.frame_time` ``(k)``."""
    check_domain(domain)
    if size <= 0 or frames <= 0:
        raise UserError(f"a clip needs a positive size and frame count, got size={size}, frames={frames}")
    S = size * SUPERSAMPLE
    k = S / IMAGE_SIZE
    rng = np.random.default_rng([scene.noise_seed, DOMAINS.index(domain)])
    canvas = _background(scene, S, domain, rng)
    base = Image.fromarray(canvas, "RGB")
    stroke = max(1, int(round(1.6 * k)))
    hatch = sketch_hatch(S, k, stroke) if domain == "sketch" else None
    fills = [object_fill(o) for o in scene.objects]
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for o, fill in zip(scene.objects, fills):
            w = o.at(frame_time(f, frames))
            draw_object(img, draw, canvas, w, fill, k, S, stroke, domain, hatch)
        out[f] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return finish_render(out, scene, domain, rng)
