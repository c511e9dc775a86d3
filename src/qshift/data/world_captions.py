"""The embedded world's captions: eight source template families (the source model's training
captions) and three held-out styles (sentence-level query shift), each a deterministic function of
the scene and a random generator for its wording choices.
"""
from __future__ import annotations

import numpy as np

from qshift.data.world_scenes import Scene, WorldObject

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
CAPTIONS_PER_IMAGE = 5


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
