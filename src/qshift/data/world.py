"""The embedded image–caption world: procedurally rendered scenes with five captions each.

Every scene holds 1–3 non-overlapping objects, each with a shape (8), a colour (8), a size (2)
and a continuous position, on a smooth, tinted background.  Rendering is deterministic by
(split seed, scene index): the same call always gives the same pixels and captions.

Splits (fixed; see ``SPLITS``):

* ``train`` — an unbounded stream of scenes from seed 1 (the trainer draws as many as it needs);
* ``val``   — 1,000 images from seed 2;
* ``test``  — 2,000 images × 10,000 captions from seed 3; every layout and every caption string
  is unique within the split;
* ``test1k`` — the first 1,000 images of ``test`` (a quick-check subset).

``generate_world(seed, n_images)`` makes a fresh test-like set from any other seed.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

#: the scene coordinate frame in pixels, and the world model's input size
IMAGE_SIZE = 96


#: the benchmark's default render size (world v1 used 96 until the v6 source model)
DEFAULT_RENDER_SIZE = 192


def _render_size_from_env() -> int:
    raw = os.environ.get("QSHIFT_RENDER_SIZE", str(DEFAULT_RENDER_SIZE))
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"QSHIFT_RENDER_SIZE must be an integer multiple of {IMAGE_SIZE}, got {raw!r}") from None
    if size <= 0 or size % IMAGE_SIZE:
        raise ValueError(f"QSHIFT_RENDER_SIZE must be a positive multiple of {IMAGE_SIZE}, got {size}")
    return size


#: the size the benchmark renders (and corrupts) its images at; the model's preprocessing
#: area-downsamples them to IMAGE_SIZE.  ImageNet-C's severities are defined in pixels for ~224 px
#: images, so the 192 px default keeps more of the information they leave than 96 px did
#: (docs/world.md, "Benchmark validity"); ``QSHIFT_RENDER_SIZE=96`` gives the old world.
#: Shifted sets are cached per render size.
RENDER_SIZE = _render_size_from_env()

#: the range of a scene background's grey level (0-255) before its tint; world v1 draws 90-200.
#: ``QSHIFT_WORLD_BG_GREY=lo,hi`` selects another range, for probing a candidate world (cached sets and
#: result cells record it when it is not the default).
DEFAULT_BG_GREY = (90.0, 200.0)


def _bg_grey_from_env() -> tuple[float, float]:
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


BG_GREY = _bg_grey_from_env()


#: Images in the ``test`` split (10,000 captions with 2,000). ``QSHIFT_WORLD_TEST_IMAGES=N`` draws a larger
#: (or smaller) test split from the same seed for probing how stream length matters, e.g. 5,000 as COCO's
#: 5K test; the scenes are drawn in order, so the first 2,000 (and ``test1k``) are those of the standard
#: split. Recorded by ``world_variant`` like the background range.
DEFAULT_TEST_IMAGES = 2000


def _test_images_from_env() -> int:
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


TEST_IMAGES = _test_images_from_env()


def world_variant() -> dict:
    """The non-default world knobs in force ({} for the standard world), for cache keys and results."""
    variant: dict = {}
    if BG_GREY != DEFAULT_BG_GREY:
        variant["bg_grey"] = list(BG_GREY)
    if TEST_IMAGES != DEFAULT_TEST_IMAGES:
        variant["test_images"] = TEST_IMAGES
    return variant
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "crescent")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "cyan": (40, 205, 215),
    "blue": (35, 70, 215),
    "purple": (135, 50, 185),
    "pink": (245, 125, 195),
}
SIZES: tuple[str, ...] = ("small", "large")
#: radius range in pixels at IMAGE_SIZE, per size class
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (9.0, 12.0), "large": (16.0, 20.0)}
CELL_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
CELL_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
#: caption template families used to train and evaluate the source model
SOURCE_FAMILIES: tuple[str, ...] = (
    "left_to_right", "there_is", "relation", "count", "position_first", "pairwise", "picture", "size_first",
)
#: caption styles the source model never sees in training (sentence-level query shift)
HELD_OUT_FAMILIES: tuple[str, ...] = ("passive", "formal", "terse")
#: rendering domains for query–gallery shift; "source" is the training domain
DOMAINS: tuple[str, ...] = ("source", "outline", "clutter", "lowlight", "sketch")
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene: categorical attributes plus its exact placement (pixels)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    rotation: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def cell(self) -> str:
        col = min(2, int(3 * self.x / IMAGE_SIZE))
        row = min(2, int(3 * self.y / IMAGE_SIZE))
        return CELL_NAMES[row][col]

    def phrase(self, size_word: str | None = None) -> str:
        return f"{size_word or self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """A smooth background: a low-saturation tint with a linear gradient and mild grain."""

    base: tuple[int, int, int]
    gradient_angle: float
    gradient_strength: float
    grain: float


@dataclass(frozen=True)
class Scene:
    """A scene: objects, background, and the seed of its pixel noise."""

    objects: tuple[WorldObject, ...]
    background: Background
    noise_seed: int

    @property
    def layout_key(self) -> tuple:
        """The scene's describable content: what its captions can pin down."""
        return tuple(sorted((o.shape, o.colour, o.size, o.cell) for o in self.objects))


@dataclass
class WorldSplit:
    """A set of scenes with their captions; caption ``k`` belongs to image ``caption_image[k]``."""

    name: str
    seed: int
    scenes: list[Scene]
    captions: list[str]
    caption_image: np.ndarray  # int64 [n_captions]
    families: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, indices: list[int] | None = None) -> np.ndarray:
        """Render scenes to a uint8 array [n, RENDER_SIZE, RENDER_SIZE, 3]."""
        idx = range(len(self.scenes)) if indices is None else indices
        return np.stack([render_scene(self.scenes[i]) for i in idx])

    def subset(self, n_images: int, name: str | None = None) -> "WorldSplit":
        """The first ``n_images`` images and their captions."""
        keep = self.caption_image < n_images
        return WorldSplit(
            name=name or f"{self.name}[:{n_images}]",
            seed=self.seed,
            scenes=self.scenes[:n_images],
            captions=[c for c, k in zip(self.captions, keep) if k],
            caption_image=self.caption_image[keep],
            families=[f for f, k in zip(self.families, keep) if k] if self.families else [],
        )

    def fingerprint(self) -> str:
        """SHA-256 over the rendered pixels and captions (identifies the exact test set)."""
        h = hashlib.sha256()
        for i in range(len(self.scenes)):
            h.update(render_scene(self.scenes[i]).tobytes())
        for c, k in zip(self.captions, self.caption_image.tolist()):
            h.update(f"{k}\t{c}\n".encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------------- sampling

def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a random scene: 1–3 non-overlapping objects on a smooth background."""
    for _ in range(100):
        n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])) if n_objects is None else n_objects
        objects: list[WorldObject] = []
        for _ in range(n):
            placed = False
            for _attempt in range(50):
                size = SIZES[int(rng.integers(2))]
                radius = float(rng.uniform(*SIZE_RADIUS[size]))
                margin = radius + 2
                x = float(rng.uniform(margin, IMAGE_SIZE - margin))
                y = float(rng.uniform(margin, IMAGE_SIZE - margin))
                if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 4 for o in objects):
                    shape = SHAPES[int(rng.integers(len(SHAPES)))]
                    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                    # two objects of one scene never share both shape and colour, so that
                    # "the red circle" always names one object
                    if any(o.shape == shape and o.colour == colour for o in objects):
                        continue
                    objects.append(
                        WorldObject(
                            shape=shape, colour=colour, size=size, x=x, y=y, radius=radius,
                            rotation=float(rng.uniform(-12, 12)),
                            tint=tuple(int(v) for v in rng.integers(-14, 15, size=3)),
                        )
                    )
                    placed = True
                    break
            if not placed:
                break
        if len(objects) == n:
            break
    else:  # pragma: no cover - 100 failures in a row do not happen with these sizes
        raise RuntimeError("could not place objects")
    grey = rng.uniform(*BG_GREY)
    tint = rng.normal(0, 12, size=3)
    background = Background(
        base=tuple(int(np.clip(grey + t, 0, 255)) for t in tint),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        gradient_strength=float(rng.uniform(0, 45)),
        grain=float(rng.uniform(0, 4)),
    )
    return Scene(objects=tuple(objects), background=background, noise_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------------------------- rendering

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


def render_scene(scene: Scene, size: int | None = None, domain: str = "source") -> np.ndarray:
    """Render a scene to uint8 RGB [size, size, 3] (4× supersampled, then downsampled; default
    :data:`RENDER_SIZE`).

    ``domain`` picks the rendering style: ``source`` (training domain), or one of the held-out
    query–gallery-shift domains ``outline`` (outline-only shapes), ``clutter`` (textured, cluttered
    background), ``lowlight`` (dark, blue-cast, low-contrast exposure) and ``sketch`` (pen strokes
    and hatching on paper).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; known: {DOMAINS}")
    size = RENDER_SIZE if size is None else size
    S = size * SUPERSAMPLE
    k = S / IMAGE_SIZE
    rng = np.random.default_rng([scene.noise_seed, DOMAINS.index(domain)])
    canvas = _background(scene, S, domain, rng)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    stroke = max(1, int(round(1.6 * k)))
    for o in scene.objects:
        fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[o.colour], o.tint))
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
        if domain == "sketch":  # hatching in the object's colour, clipped to its bounding circle
            mask = Image.new("L", (S, S), 0)
            mdraw = ImageDraw.Draw(mask)
            if o.shape in ("circle", "crescent"):
                mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            else:
                mdraw.polygon(_shape_polygon(o.shape, cx, cy, r, o.rotation), fill=255)
            hatch = Image.new("L", (S, S), 0)
            hdraw = ImageDraw.Draw(hatch)
            step = int(3 * k)
            for d in range(-S, S, step):
                hdraw.line([d, 0, d + S, S], fill=255, width=max(1, stroke // 2))
            from PIL import ImageChops
            img.paste(fill, (0, 0), ImageChops.multiply(mask, hatch))
    out = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    if domain == "lowlight":
        out = 255.0 * (out / 255.0) ** 1.6 * 0.45 + np.array([0.0, 4.0, 18.0], np.float32)
        out = out + rng.normal(0, 3.0, size=out.shape)  # sensor noise in the dark
    bg = scene.background
    if bg.grain > 0:
        noise = np.random.default_rng(scene.noise_seed).normal(0, bg.grain, size=out.shape)
        out = out + noise
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------- captions

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _relation(a: WorldObject, b: WorldObject) -> str:
    """Where ``a`` is relative to ``b``."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _size_word(o: WorldObject, rng: np.random.Generator) -> str:
    if o.size == "large":
        return "large" if rng.random() < 0.6 else "big"
    return "small" if rng.random() < 0.7 else "little"


def caption_scene(scene: Scene, family: str, rng: np.random.Generator) -> str:
    """One caption of ``scene`` in template ``family`` (wording choices drawn from ``rng``)."""
    objs = list(scene.objects)
    lr = sorted(objs, key=lambda o: o.x)
    ph = {id(o): o.phrase(_size_word(o, rng)) for o in objs}
    n = len(objs)
    if family == "left_to_right":
        if n == 1:
            return f"a single {ph[id(objs[0])]} {CELL_PHRASES[objs[0].cell]}"
        return "from left to right: " + _join([_article(ph[id(o)]) for o in lr])
    if family == "there_is":
        parts = [f"{_article(ph[id(o)])} {CELL_PHRASES[o.cell]}" for o in objs]
        return "there is " + _join(parts)
    if family == "relation":
        if n == 1:
            return f"{_article(ph[id(objs[0])])} alone {CELL_PHRASES[objs[0].cell]}"
        order = list(rng.permutation(n))
        a, b = objs[order[0]], objs[order[1]]
        text = f"{_article(ph[id(a)])} {_relation(a, b)} {_article(ph[id(b)])}"
        if n == 3:
            c = objs[order[2]]
            text += f", and {_article(ph[id(c)])} {_relation(c, b)} it"
        return text
    if family == "count":
        noun = "shape" if n == 1 else "shapes"
        parts = [f"{_article(ph[id(o)])} {CELL_PHRASES[o.cell]}" for o in lr]
        return f"{COUNT_WORDS[n]} {noun}: " + _join(parts)
    if family == "position_first":
        parts = [f"{CELL_PHRASES[o.cell]} {_article(ph[id(o)])}" for o in objs]
        return _join(parts)
    if family == "pairwise":
        if n == 1:
            o = objs[0]
            return f"the only shape is {_article(ph[id(o)])} {CELL_PHRASES[o.cell]}"
        a, b = objs[0], objs[1]
        text = f"the {ph[id(a)]} is {_relation(a, b)} the {ph[id(b)]}"
        if n == 3:
            c = objs[2]
            text += f" and the {ph[id(c)]} is {_relation(c, a)} the {a.colour} {a.shape}"
        return text
    if family == "picture":
        parts = [f"{_article(ph[id(o)])} {CELL_PHRASES[o.cell]}" for o in sorted(objs, key=lambda o: o.y)]
        return "a picture of " + _join(parts)
    if family == "size_first":
        big = sorted(objs, key=lambda o: -o.radius)
        parts = [f"{_article(ph[id(o)])} {CELL_PHRASES[o.cell]}" for o in big]
        return "an image showing " + _join(parts)
    if family == "passive":
        parts = [f"{_article(f'{o.shape} coloured {o.colour}')} of {o.size} size is placed {CELL_PHRASES[o.cell]}"
                 for o in objs]
        return _join(parts)
    if family == "formal":
        noun = "object" if n == 1 else "objects"
        parts = [f"{_article(ph[id(o)])} positioned {CELL_PHRASES[o.cell]}" for o in lr]
        return f"this illustration contains precisely {COUNT_WORDS[n]} {noun}, namely " + _join(parts)
    if family == "terse":
        return "; ".join(f"{o.colour} {o.shape}, {o.size}, {o.cell}" for o in lr)
    raise ValueError(f"unknown caption family {family!r}; known: {SOURCE_FAMILIES + HELD_OUT_FAMILIES}")


def scene_captions(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE,
                   families: tuple[str, ...] = SOURCE_FAMILIES) -> list[tuple[str, str]]:
    """``n`` distinct captions from ``n`` distinct families: [(family, caption), ...]."""
    chosen = rng.choice(len(families), size=n, replace=False)
    return [(families[i], caption_scene(scene, families[i], rng)) for i in chosen]


# ------------------------------------------------------------------------------------- splits

SPLITS: dict[str, dict] = {
    "val": {"seed": 2, "n_images": 1000},
    "test": {"seed": 3, "n_images": TEST_IMAGES},
}
TRAIN_SEED = 1


def generate_world(seed: int, n_images: int, name: str | None = None) -> WorldSplit:
    """A test-like split from ``seed``: unique layouts and unique caption strings, 5 captions each."""
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}")
    scenes: list[Scene] = []
    captions: list[str] = []
    owner: list[int] = []
    fams: list[str] = []
    seen_layouts: set = set()
    seen_captions: set = set()
    draw = 0
    while len(scenes) < n_images:
        rng = _rng(seed, draw)
        draw += 1
        if draw > 50 * n_images + 1000:
            raise RuntimeError(f"could not draw {n_images} unique scenes from seed {seed}")
        scene = sample_scene(rng)
        if scene.layout_key in seen_layouts:
            continue
        caps = scene_captions(scene, rng)
        texts = [c for _, c in caps]
        if len(set(texts)) < len(texts) or any(c in seen_captions for c in texts):
            continue
        seen_layouts.add(scene.layout_key)
        seen_captions.update(texts)
        idx = len(scenes)
        scenes.append(scene)
        for fam, text in caps:
            captions.append(text)
            owner.append(idx)
            fams.append(fam)
    return WorldSplit(name=name or f"world(seed={seed})", seed=seed, scenes=scenes, captions=captions,
                      caption_image=np.asarray(owner, dtype=np.int64), families=fams)


_SPLIT_CACHE: dict[str, WorldSplit] = {}


def load_split(name: str) -> WorldSplit:
    """A fixed split: ``val``, ``test`` (2,000 images unless ``QSHIFT_WORLD_TEST_IMAGES``) or ``test1k`` (its
    first 1,000 images)."""
    if name in _SPLIT_CACHE:
        return _SPLIT_CACHE[name]
    if name == "test1k":
        split = load_split("test").subset(1000, name="test1k")
    elif name in SPLITS:
        spec = SPLITS[name]
        split = generate_world(spec["seed"], spec["n_images"], name=name)
    else:
        raise ValueError(f"unknown world split {name!r}; known: {sorted(SPLITS) + ['test1k']} "
                         "(training scenes come from train_scenes())")
    _SPLIT_CACHE[name] = split
    return split


def train_scene(index: int, seed: int = TRAIN_SEED) -> tuple[Scene, dict[str, str]]:
    """Training scene ``index`` of the unbounded train stream and one caption per source family."""
    rng = _rng(seed, index)
    scene = sample_scene(rng)
    return scene, {fam: caption_scene(scene, fam, rng) for fam in SOURCE_FAMILIES}
