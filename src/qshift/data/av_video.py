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

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from qshift.data.av_scenes import FRAMES, AVScene, frame_time
from qshift.data.world_render import DOMAINS, SUPERSAMPLE, _background, _shape_polygon
from qshift.data.world_scenes import COLOURS, IMAGE_SIZE, WorldObject
from qshift.errors import UserError

#: frame size in px: of 32 / 48 / 64 the smallest, at which shape, colour and size stay legible (the
#: measurements are in :mod:`qshift.data.av_world`'s docstring)
VIDEO_SIZE = 32


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
    hatch = None
    if domain == "sketch":
        hatch = Image.new("L", (S, S), 0)
        hdraw = ImageDraw.Draw(hatch)
        for d in range(-S, S, int(3 * k)):
            hdraw.line([d, 0, d + S, S], fill=255, width=max(1, stroke // 2))
    fills = [tuple(min(255, max(0, c + t)) for c, t in zip(COLOURS[o.colour], o.tint)) for o in scene.objects]
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for o, fill in zip(scene.objects, fills):
            w = o.at(frame_time(f, frames))
            _draw_object(img, draw, canvas, w, fill, k, S, stroke, domain, hatch)
        out[f] = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    # the per-image steps of render_scene_at after downsampling, in its order and with its generators
    if domain == "lowlight":
        out = 255.0 * (out / 255.0) ** 1.6 * 0.45 + np.array([0.0, 4.0, 18.0], np.float32)
        out = out + rng.normal(0, 3.0, size=out.shape[1:])
    if scene.background.grain > 0:
        out = out + np.random.default_rng(scene.noise_seed).normal(0, scene.background.grain, size=out.shape[1:])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _draw_object(img: Image.Image, draw: ImageDraw.ImageDraw, canvas: np.ndarray, o: WorldObject, fill: tuple, k: float,
                 S: int, stroke: int, domain: str, hatch: Image.Image | None) -> None:
    """One object drawn as :func:`qshift.data.world_render.render_scene_at` draws it."""
    cx, cy, r = o.x * k, o.y * k, o.radius * k
    if domain == "outline":
        kw = {"outline": fill, "width": stroke}
    elif domain == "sketch":
        kw = {"outline": tuple(int(0.55 * c) for c in fill), "width": max(1, stroke // 2)}
    else:
        kw = {"fill": fill}
    if o.shape in ("circle", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
        if o.shape == "crescent":
            off = 0.5 * r
            a = math.radians(o.rotation)
            ox, oy = cx + off * math.cos(a), cy + off * math.sin(a) - 0.15 * r
            rr = 0.85 * r
            px, py = int(np.clip(ox, 0, S - 1)), int(np.clip(oy, 0, S - 1))
            bite = tuple(int(v) for v in canvas[py, px])
            draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=bite,
                         **({"outline": kw["outline"], "width": kw["width"]} if "outline" in kw else {}))
    else:
        draw.polygon(_shape_polygon(o.shape, cx, cy, r, o.rotation), **kw)
    if hatch is not None:
        mask = Image.new("L", (S, S), 0)
        mdraw = ImageDraw.Draw(mask)
        if o.shape in ("circle", "crescent"):
            mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            mdraw.polygon(_shape_polygon(o.shape, cx, cy, r, o.rotation), fill=255)
        img.paste(fill, (0, 0), ImageChops.multiply(mask, hatch))
