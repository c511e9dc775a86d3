"""Rendering the embedded world's scenes to pixels: the source style and the four query–gallery-shift
domains, 4× supersampled and box-downsampled, and the area downsampling to the model's input size.

Rendering is deterministic by scene: the same scene, size and domain always give the same pixels.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from qshift.data.world_scenes import COLOURS, IMAGE_SIZE, Scene, WorldObject

SUPERSAMPLE = 4

#: rendering domains for query–gallery shift; "source" is the training domain
DOMAINS: tuple[str, ...] = ("source", "outline", "clutter", "lowlight", "sketch")


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    def pts(radii_angles):
        out = []
        for rad, ang in radii_angles:
            a = math.radians(ang + rot)
            out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return out

    if shape == "square":
        return pts([(r * 0.92 * math.sqrt(2) * 0.8, 45 + 90 * k) for k in range(4)])
    if shape == "diamond":
        return pts([(r if k % 2 == 0 else r * 0.62, -90 + 90 * k) for k in range(4)])
    if shape == "triangle":
        return pts([(r, -90 + 120 * k) for k in range(3)])
    if shape == "star":
        return pts([(r if k % 2 == 0 else r * 0.45, -90 + 36 * k) for k in range(10)])
    if shape == "cross":
        a, b = r * 0.95, r * 0.33
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in base]
    if shape == "heart":
        out = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            px = 16 * math.sin(t) ** 3
            py = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            px, py = px * r / 16.5, (py + 2.5) * r / 16.5
            c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
            out.append((cx + px * c - py * s, cy + px * s + py * c))
        return out
    return None  # circle and crescent are drawn with ellipses


def _background(scene: Scene, S: int, domain: str, rng: np.random.Generator) -> np.ndarray:
    bg = scene.background
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
    ramp = (xx * math.cos(bg.gradient_angle) + yy * math.sin(bg.gradient_angle)) * bg.gradient_strength
    base = np.asarray(bg.base, np.float32)
    if domain == "sketch":
        base = np.array([238.0, 234.0, 222.0], np.float32)  # paper
        ramp = ramp * 0.2
    canvas = base[None, None, :] + ramp[..., None]
    if domain == "clutter":
        # a high-contrast texture: random stripes and blobs in muted colours
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(40):
            grey = rng.uniform(40, 220)
            col = tuple(int(np.clip(grey + rng.normal(0, 15), 0, 255)) for _ in range(3))
            x0, y0 = rng.uniform(0, S, size=2)
            if rng.random() < 0.5:
                x1, y1 = x0 + rng.normal(0, S / 3), y0 + rng.normal(0, S / 3)
                draw.line([x0, y0, x1, y1], fill=col, width=int(rng.uniform(2, 8) * S / IMAGE_SIZE))
            else:
                r = rng.uniform(2, 8) * S / IMAGE_SIZE
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)
        canvas = np.asarray(img, np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def area_downsample(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, H, W, 3] (H = W = k · size) → uint8 [N, size, size, 3] by k × k box averaging."""
    n, h, w = images.shape[:3]
    if h != w or h % size:
        raise ValueError(f"cannot area-downsample {h}×{w} images to {size} px (need a whole multiple)")
    k = h // size
    if k == 1:
        return images
    out = images.reshape(n, size, k, size, k, 3).astype(np.float32).mean((2, 4))
    return np.rint(out).clip(0, 255).astype(np.uint8)


def render_scene_at(scene: Scene, size: int, domain: str = "source") -> np.ndarray:
    """Render a scene to uint8 RGB [size, size, 3] (4× supersampled, then downsampled);
    ``qshift.data.world.render_scene`` renders at the world's ``RENDER_SIZE`` by default.

    ``domain`` picks the rendering style: ``source`` (training domain), or one of the held-out
    query–gallery-shift domains ``outline`` (outline-only shapes), ``clutter`` (textured, cluttered
    background), ``lowlight`` (dark, blue-cast, low-contrast exposure) and ``sketch`` (pen strokes
    and hatching on paper).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {DOMAINS}")
    S = size * SUPERSAMPLE
    k = S / IMAGE_SIZE
    rng = np.random.default_rng([scene.noise_seed, DOMAINS.index(domain)])
    canvas = _background(scene, S, domain, rng)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    stroke = max(1, int(round(1.6 * k)))
    hatch = sketch_hatch(S, k, stroke) if domain == "sketch" else None
    for o in scene.objects:
        draw_object(img, draw, canvas, o, object_fill(o), k, S, stroke, domain, hatch)
    out = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return finish_render(out, scene, domain, rng)


def object_fill(o: WorldObject) -> tuple[int, int, int]:
    """An object's RGB fill: its colour plus its tint, clipped to 0..255."""
    return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[o.colour], o.tint))


def sketch_hatch(S: int, k: float, stroke: int) -> Image.Image:
    """The ``sketch`` domain's diagonal hatching over an S × S canvas (an L-mode mask)."""
    hatch = Image.new("L", (S, S), 0)
    hdraw = ImageDraw.Draw(hatch)
    for d in range(-S, S, int(3 * k)):
        hdraw.line([d, 0, d + S, S], fill=255, width=max(1, stroke // 2))
    return hatch


def draw_object(img: Image.Image, draw: ImageDraw.ImageDraw, canvas: np.ndarray, o: WorldObject, fill: tuple,
                k: float, S: int, stroke: int, domain: str, hatch: Image.Image | None) -> None:
    """Draw one object on a supersampled canvas of S px (``k`` px per world px) in ``domain``'s style;
    ``canvas`` is the background (a crescent's bite takes its colour), ``hatch`` the sketch hatching."""
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
            # cut the bite with the background colour at that spot
            px, py = int(np.clip(ox, 0, S - 1)), int(np.clip(oy, 0, S - 1))
            bite = tuple(int(v) for v in canvas[py, px])
            draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=bite,
                         **({"outline": kw["outline"], "width": kw["width"]} if "outline" in kw else {}))
    else:
        draw.polygon(_shape_polygon(o.shape, cx, cy, r, o.rotation), **kw)
    if hatch is not None:  # hatching in the object's colour, clipped to its bounding shape
        mask = Image.new("L", (S, S), 0)
        mdraw = ImageDraw.Draw(mask)
        if o.shape in ("circle", "crescent"):
            mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            mdraw.polygon(_shape_polygon(o.shape, cx, cy, r, o.rotation), fill=255)
        img.paste(fill, (0, 0), ImageChops.multiply(mask, hatch))


def finish_render(out: np.ndarray, scene: Scene, domain: str, rng: np.random.Generator) -> np.ndarray:
    """The per-image steps after downsampling (a ``lowlight`` exposure and its sensor noise, the
    background's grain), then rounding to uint8; ``out`` is float [..., size, size, 3] (frames share the
    noise)."""
    if domain == "lowlight":
        out = 255.0 * (out / 255.0) ** 1.6 * 0.45 + np.array([0.0, 4.0, 18.0], np.float32)
        out = out + rng.normal(0, 3.0, size=out.shape[-3:])  # sensor noise in the dark
    bg = scene.background
    if bg.grain > 0:
        out = out + np.random.default_rng(scene.noise_seed).normal(0, bg.grain, size=out.shape[-3:])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
