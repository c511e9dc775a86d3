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

This module holds the world's configuration (the knobs read from the environment, which
:func:`render_scene` and :func:`sample_scene` apply), the splits and their generation; the parts
live in :mod:`qshift.data.world_scenes` (vocabulary, scene dataclasses, drawing a scene),
:mod:`qshift.data.world_render` (pixels), :mod:`qshift.data.world_captions` (captions) and
:mod:`qshift.data.world_settings` (reading the knobs), and are re-exported here under their old names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# re-exported: the world's public names, as before the split into modules
from qshift.data.world_captions import (CAPTIONS_PER_IMAGE, CELL_PHRASES, COUNT_WORDS,  # noqa: F401
                                        HELD_OUT_FAMILIES, SOURCE_FAMILIES, _relation, caption_scene,
                                        scene_captions)
from qshift.data.world_render import DOMAINS, SUPERSAMPLE, area_downsample, render_scene_at  # noqa: F401
from qshift.data.world_scenes import (CELL_NAMES, COLOURS, IMAGE_SIZE, SHAPES, SIZE_RADIUS,  # noqa: F401
                                      SIZES, Background, Scene, WorldObject)
from qshift.data.world_scenes import sample_scene as _sample_scene
from qshift.data.world_settings import (DEFAULT_BG_GREY, DEFAULT_RENDER_SIZE, DEFAULT_TEST_IMAGES,  # noqa: F401
                                        env_bg_grey, env_render_size, env_test_images)

#: the size the benchmark renders (and corrupts) its images at; the model's preprocessing
#: area-downsamples them to IMAGE_SIZE.  ImageNet-C's severities are defined in pixels for ~224 px
#: images, so the 192 px default keeps more of the information they leave than 96 px did
#: (docs/world.md, "Benchmark validity"); ``QSHIFT_RENDER_SIZE=96`` gives the old world.
#: Shifted sets are cached per render size.
RENDER_SIZE = env_render_size()

#: the range of a scene background's grey level (0-255) before its tint (``QSHIFT_WORLD_BG_GREY``;
#: default ``DEFAULT_BG_GREY``)
BG_GREY = env_bg_grey()

#: images in the ``test`` split (``QSHIFT_WORLD_TEST_IMAGES``; default ``DEFAULT_TEST_IMAGES``)
TEST_IMAGES = env_test_images()


def world_variant() -> dict:
    """The non-default world knobs in force ({} for the standard world), for cache keys and results."""
    variant: dict = {}
    if BG_GREY != DEFAULT_BG_GREY:
        variant["bg_grey"] = list(BG_GREY)
    if TEST_IMAGES != DEFAULT_TEST_IMAGES:
        variant["test_images"] = TEST_IMAGES
    return variant


def render_scene(scene: Scene, size: int | None = None, domain: str = "source") -> np.ndarray:
    """Render a scene to uint8 RGB [size, size, 3] (default :data:`RENDER_SIZE`); see
    :func:`qshift.data.world_render.render_scene_at` for the domains (``source``, ``outline``,
    ``clutter``, ``lowlight``, ``sketch``)."""
    return render_scene_at(scene, RENDER_SIZE if size is None else size, domain)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a random scene: 1–3 non-overlapping objects on a smooth background (grey level from :data:`BG_GREY`)."""
    return _sample_scene(rng, n_objects, bg_grey=BG_GREY)


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


# ------------------------------------------------------------------------------------- splits

def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


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
