"""What a scene of the embedded world is: its vocabulary (shapes, colours, sizes, cells), the scene
dataclasses, and the random draw of one scene.

Every scene holds 1–3 non-overlapping objects, each with a shape (8), a colour (8), a size (2) and a
continuous position, on a smooth, tinted background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the scene coordinate frame in pixels, and the world model's input size
IMAGE_SIZE = 96

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


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, *,
                 bg_grey: tuple[float, float]) -> Scene:
    """Draw a random scene: 1–3 non-overlapping objects on a smooth background whose grey level is
    drawn from ``bg_grey`` (``qshift.data.world.sample_scene`` passes the world's ``BG_GREY``)."""
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
    grey = rng.uniform(*bg_grey)
    tint = rng.normal(0, 12, size=3)
    background = Background(
        base=tuple(int(np.clip(grey + t, 0, 255)) for t in tint),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        gradient_strength=float(rng.uniform(0, 45)),
        grain=float(rng.uniform(0, 4)),
    )
    return Scene(objects=tuple(objects), background=background, noise_seed=int(rng.integers(2**31)))
