"""The embedded composed-image-retrieval (CIR) world: (reference scene, modification text, target scene)
triplets built on the image world of :mod:`qshift.data.world`.

A reference is an ordinary world scene (1–3 non-overlapping objects).  Its target is the reference with
exactly **one** edit (:data:`EDIT_KINDS`): an object's colour, shape or size changed, an object added or
removed, an object moved to another of the nine named cells, or two objects (in different cells) swapping
positions.  Everything the edit does not touch — the other objects, the background, the pixel-noise seed —
is kept, so a target is a near-duplicate of its reference.  Each edit is stored as plain data (a dict; see
:func:`modification_text`), and its text names the edited object unambiguously within the reference (by
shape, colour and/or size, as needed).

Modification texts come from the template families of :data:`TEXT_FAMILIES`; those in
:data:`HELD_OUT_TEXT_FAMILIES` are sentence-level query shifts, never used to train (the splits' own texts
come from :data:`SOURCE_TEXT_FAMILIES`; :meth:`CIRSplit.family_texts` rewrites a split in any family).

Gallery, CIRR-style: for every query it holds the reference and a **group** of ``group_size`` (6)
near-duplicates — the target and scenes that differ from the target in exactly one attribute of one
object (the same edit with another colour / shape / size / cell value first).  Rows are shuffled.  Every
target's layout (:attr:`Scene.layout_key`) is unique in its gallery: no other row can be described the way
the target is, so a perfect model gets R@1 = 100.  :meth:`CIRSplit.metric_inputs` gives
:func:`qshift.retrieval.cir_metrics.cirr_metrics` its ``targets``, ``references`` and ``subsets``.

Splits (fixed, :data:`CIR_SPLITS`): ``train`` 10,000 queries, ``val`` and ``test`` 2,000 each, drawn query
by query from the split's seed with the per-index generator of :func:`qshift.data.world.generate_world`
(so the first k queries of a split are those of ``generate_cir_world(seed, k)``); train's target layouts
are unique within each block of 2,000 queries, the others' within the split.  Nothing is rendered at
generation time; :meth:`CIRSplit.reference_images` and :meth:`CIRSplit.gallery_images` render on demand in
any render domain.  Scenes follow the world's knobs (``QSHIFT_WORLD_BG_GREY``, ``QSHIFT_RENDER_SIZE``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np

from qshift.data.world import (CELL_NAMES, CELL_PHRASES, COLOURS, IMAGE_SIZE, SHAPES, SIZE_RADIUS, SIZES, Scene,
                               WorldObject, _rng, render_scene, sample_scene)
from qshift.data.world_captions import _article, _size_word

#: the fixed splits: seed, queries, and the block over which target layouts are unique (train is five
#: test-sized blocks, so that its mix of edits and object counts is the test's)
CIR_SPLITS: dict[str, dict[str, int]] = {
    "train": {"seed": 101, "n_queries": 10_000, "unique_block": 2_000},
    "val": {"seed": 102, "n_queries": 2_000, "unique_block": 2_000},
    "test": {"seed": 103, "n_queries": 2_000, "unique_block": 2_000},
}
#: gallery scenes per query group (the target and its near-duplicates)
GROUP_SIZE = 6

EDIT_KINDS: tuple[str, ...] = ("colour", "shape", "size", "add", "remove", "move", "swap")
#: an object's categorical attributes (what a layout, and a group member's one difference, is made of)
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "cell")
CELLS: tuple[str, ...] = tuple(c for row in CELL_NAMES for c in row)

#: modification-text templates: family → edit kind → wordings (one drawn per text).  Fields: ``obj`` /
#: ``other`` (the edited objects as named in the reference), ``new`` (new colour / shape / cell name),
#: ``new_a`` (new shape with its article), ``new_size`` (a word for the new size), ``result_a`` (the edited
#: object after the edit), ``item`` / ``item_a`` (an added object), ``cell``, ``where`` (``in the top left
#: corner``), ``to`` (``to the top left corner``).
TEXT_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "imperative": {
        "colour": ("make the {obj} {new}", "paint the {obj} {new}"),
        "shape": ("turn the {obj} into {new_a}", "replace the {obj} with {result_a}"),
        "size": ("make the {obj} {new_size}",),
        "add": ("add {item_a} {where}", "put {item_a} {where}"),
        "remove": ("remove the {obj}", "delete the {obj}"),
        "move": ("move the {obj} {to}",),
        "swap": ("swap the {obj} and the {other}",),
    },
    "descriptive": {
        "colour": ("the {obj} is {new} now", "the {obj} has turned {new}"),
        "shape": ("the {obj} is {new_a} now", "the {obj} has become {new_a}"),
        "size": ("the {obj} is {new_size} now",),
        "add": ("there is also {item_a} {where}",),
        "remove": ("the {obj} is gone", "the {obj} has disappeared"),
        "move": ("the {obj} is {where} now",),
        "swap": ("the {obj} and the {other} have traded places",),
    },
    "terse": {
        "colour": ("{obj} -> {new}",),
        "shape": ("{obj} -> {new}",),
        "size": ("{obj} -> {new_size}",),
        "add": ("+ {item}, {cell}",),
        "remove": ("- {obj}",),
        "move": ("{obj} -> {cell}",),
        "swap": ("{obj} <-> {other}",),
    },
    "relative": {
        "colour": ("has {result_a} instead of the {obj}",),
        "shape": ("has {result_a} instead of the {obj}",),
        "size": ("has {result_a} instead of the {obj}",),
        "add": ("has an extra {item} {where}",),
        "remove": ("has no {obj}",),
        "move": ("has the {obj} {where} instead",),
        "swap": ("has the {obj} where the {other} was and vice versa",),
    },
    "question": {
        "colour": ("what if the {obj} were {new}?",),
        "shape": ("what if the {obj} were {new_a}?",),
        "size": ("what if the {obj} were {new_size}?",),
        "add": ("what if there were also {item_a} {where}?",),
        "remove": ("what if the {obj} were not there?",),
        "move": ("what if the {obj} were {where}?",),
        "swap": ("what if the {obj} and the {other} switched places?",),
    },
    "formal": {
        "colour": ("the colour of the {obj} is changed to {new}",),
        "shape": ("the shape of the {obj} is changed to {new_a}",),
        "size": ("the size of the {obj} is changed to {new_size}",),
        "add": ("{item_a} is added {where}",),
        "remove": ("the {obj} is removed from the picture",),
        "move": ("the {obj} is relocated {to}",),
        "swap": ("the positions of the {obj} and the {other} are exchanged",),
    },
}
#: text styles never used in training (sentence-level query shift for composed queries)
HELD_OUT_TEXT_FAMILIES: tuple[str, ...] = ("question", "formal")
#: the families the splits' texts (and a CIR model's training texts) are drawn from
SOURCE_TEXT_FAMILIES: tuple[str, ...] = tuple(f for f in TEXT_FAMILIES if f not in HELD_OUT_TEXT_FAMILIES)

_PLACE_TRIES = 30
#: a placeholder object, for asking the world's rules about a size or a position alone
_PROTO = WorldObject("circle", "red", "small", 0.0, 0.0, 0.0)
#: the world's distribution of object counts (:func:`qshift.data.world_scenes.sample_scene`), and the counts
#: a reference may have for each kind of edit
_COUNT_P: dict[int, float] = {1: 0.2, 2: 0.4, 3: 0.4}
_OBJECT_COUNTS: dict[str, tuple[int, ...]] = {
    "colour": (1, 2, 3), "shape": (1, 2, 3), "size": (1, 2, 3), "move": (1, 2, 3),
    "add": (1, 2), "remove": (2, 3), "swap": (2, 3),
}
_SIBLING_TIERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "colour": (("colour",), ("shape", "size", "cell")),
    "shape": (("shape",), ("colour", "size", "cell")),
    "size": (("size",), ("colour", "shape", "cell")),
    "move": (("cell",), ("colour", "shape", "size")),
    "add": (ATTRIBUTES,),
    "remove": (ATTRIBUTES,),
    "swap": (("cell",), ("colour", "shape", "size")),
}


# ------------------------------------------------------------------------------ scene geometry

def _fits(x: float, y: float, radius: float, others: list[WorldObject]) -> bool:
    """The placement rule of :func:`qshift.data.world_scenes.sample_scene`: inside the margin, clear of the rest."""
    margin = radius + 2
    return (margin <= x <= IMAGE_SIZE - margin and margin <= y <= IMAGE_SIZE - margin
            and all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 4 for o in others))


def _pair_free(shape: str, colour: str, others: list[WorldObject]) -> bool:
    return not any(o.shape == shape and o.colour == colour for o in others)


def _place_in_cell(rng: np.random.Generator, cell: str, radius: float,
                   others: list[WorldObject]) -> tuple[float, float] | None:
    flat = CELLS.index(cell)
    row, col = divmod(flat, 3)
    third = IMAGE_SIZE / 3
    lo_x, hi_x = max(col * third, radius + 2), min((col + 1) * third, IMAGE_SIZE - radius - 2)
    lo_y, hi_y = max(row * third, radius + 2), min((row + 1) * third, IMAGE_SIZE - radius - 2)
    for _ in range(_PLACE_TRIES):
        x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        if _fits(x, y, radius, others):
            if replace(_PROTO, x=x, y=y).cell == cell:
                return x, y
    return None


def _resized(rng: np.random.Generator, o: WorldObject, size: str, others: list[WorldObject]) -> WorldObject | None:
    """``o`` in another size class: at the same centre when it fits there, else elsewhere in its cell."""
    radius = float(rng.uniform(*SIZE_RADIUS[size]))
    if _fits(o.x, o.y, radius, others):
        return replace(o, size=size, radius=radius)
    pos = _place_in_cell(rng, o.cell, radius, others)
    return None if pos is None else replace(o, size=size, radius=radius, x=pos[0], y=pos[1])


def _changed(rng: np.random.Generator, scene: Scene, index: int, attribute: str, value: str) -> Scene | None:
    """``scene`` with object ``index``'s ``attribute`` set to ``value``, or None when that breaks a scene rule."""
    objs = list(scene.objects)
    o, others = objs[index], objs[:index] + objs[index + 1:]
    if attribute in ("colour", "shape"):
        new = replace(o, **{attribute: value})
        if not _pair_free(new.shape, new.colour, others):
            return None
    elif attribute == "size":
        new = _resized(rng, o, value, others)
    else:
        pos = _place_in_cell(rng, value, o.radius, others)
        new = None if pos is None else replace(o, x=pos[0], y=pos[1])
    if new is None:
        return None
    objs[index] = new
    return replace(scene, objects=tuple(objs))


def _values(attribute: str) -> tuple[str, ...]:
    return {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "cell": CELLS}[attribute]


# ------------------------------------------------------------------------------------- edits

def _refer(scene: Scene, index: int, rng: np.random.Generator) -> str:
    """A phrase that names object ``index`` and no other object of ``scene`` (the wording drawn from ``rng``)."""
    o = scene.objects[index]
    others = [p for k, p in enumerate(scene.objects) if k != index]
    options = [keys for keys in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))
               if not any(all(getattr(p, k) == getattr(o, k) for k in keys) for p in others)]
    keys = options[int(rng.integers(len(options)))]
    words = {"size": _size_word(o, rng), "colour": o.colour, "shape": o.shape}
    return " ".join(words[k] for k in keys)


def _make_edit(ref: Scene, kind: str, rng: np.random.Generator) -> tuple[dict, Scene] | None:
    """(edit, target) of one ``kind`` of edit of ``ref``, or None when this draw cannot make one."""
    objs = list(ref.objects)
    n = len(objs)
    if kind in ("colour", "shape", "size", "move"):
        i = int(rng.integers(n))
        attribute = "cell" if kind == "move" else kind
        old = getattr(objs[i], attribute)
        subject = _refer(ref, i, rng)
        for value in rng.permutation([v for v in _values(attribute) if v != old]).tolist():
            target = _changed(rng, ref, i, attribute, value)
            if target is not None:
                return {"kind": kind, "object": i, "old": old, "new": value, "subject": subject}, target
        return None
    if kind == "add":
        if n >= 3:
            return None
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = float(rng.uniform(*SIZE_RADIUS[size]))
        pairs = [(s, c) for s in SHAPES for c in COLOURS if _pair_free(s, c, objs)]
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        for cell in rng.permutation(CELLS).tolist():
            pos = _place_in_cell(rng, cell, radius, objs)
            if pos is not None:
                new = WorldObject(shape=shape, colour=colour, size=size, x=pos[0], y=pos[1], radius=radius,
                                  rotation=float(rng.uniform(-12, 12)),
                                  tint=tuple(int(v) for v in rng.integers(-14, 15, size=3)))
                edit = {"kind": "add", "shape": shape, "colour": colour, "size": size, "cell": cell}
                return edit, replace(ref, objects=(*objs, new))
        return None
    if kind == "remove":
        if n < 2:
            return None
        i = int(rng.integers(n))
        edit = {"kind": "remove", "object": i, "subject": _refer(ref, i, rng)}
        return edit, replace(ref, objects=tuple(objs[:i] + objs[i + 1:]))
    if kind == "swap":
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and objs[i].cell != objs[j].cell]
        for p in rng.permutation(len(pairs)).tolist():
            i, j = pairs[p]
            a = replace(objs[i], x=objs[j].x, y=objs[j].y)
            b = replace(objs[j], x=objs[i].x, y=objs[i].y)
            rest = [o for k, o in enumerate(objs) if k not in (i, j)]
            if _fits(a.x, a.y, a.radius, [*rest, b]) and _fits(b.x, b.y, b.radius, rest):
                new = list(objs)
                new[i], new[j] = a, b
                edit = {"kind": "swap", "object": i, "other": j, "subject": _refer(ref, i, rng),
                        "other_subject": _refer(ref, j, rng)}
                return edit, replace(ref, objects=tuple(new))
        return None
    raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")


def _siblings(ref: Scene, target: Scene, edit: dict, rng: np.random.Generator, k: int,
              taken: set) -> list[Scene] | None:
    """``k`` scenes that each differ from ``target`` in one attribute of one object (the edited one first),
    none with the layout of ``ref``, of ``target``, of each other or in ``taken``; None when too few exist."""
    kind = edit["kind"]
    if kind == "add":
        focus = [len(target.objects) - 1]
    elif kind == "remove":
        focus = list(range(len(target.objects)))
    elif kind == "swap":
        focus = [edit["object"], edit["other"]]
    else:
        focus = [edit["object"]]
    seen = {ref.layout_key, target.layout_key}
    out: list[Scene] = []
    for tier in _SIBLING_TIERS[kind]:
        options = [(i, a, v) for i in focus for a in tier for v in _values(a)
                   if v != getattr(target.objects[i], a)]
        for p in rng.permutation(len(options)).tolist():
            i, a, v = options[p]
            scene = _changed(rng, target, i, a, v)
            if scene is None or scene.layout_key in seen or scene.layout_key in taken:
                continue
            seen.add(scene.layout_key)
            out.append(scene)
            if len(out) == k:
                return out
    return None


def _cell_to(cell: str) -> str:
    if cell == "center":
        return "to the center"
    return f"to the {cell} corner" if " " in cell else f"to the {cell}"


def modification_text(reference: Scene, edit: dict, family: str, rng: np.random.Generator) -> str:
    """The text of ``edit`` of ``reference`` in template ``family`` (wording choices drawn from ``rng``).

    ``edit`` is plain data: ``{"kind", "object", "old", "new", "subject"}`` for ``colour`` / ``shape`` /
    ``size`` / ``move`` (``move``'s values are cell names), ``{"kind", "shape", "colour", "size", "cell"}`` for
    ``add`` (the new object is the target's last), ``{"kind", "object", "subject"}`` for ``remove`` and
    ``{"kind", "object", "other", "subject", "other_subject"}`` for ``swap``; ``object`` / ``other`` index
    ``reference.objects`` and ``subject`` / ``other_subject`` are the phrases naming them."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"unknown modification-text family {family!r}; known: {tuple(TEXT_FAMILIES)}")
    kind = edit["kind"]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {EDIT_KINDS}")
    fields: dict[str, str] = {"obj": edit.get("subject", ""), "other": edit.get("other_subject", "")}
    if kind in ("colour", "shape", "size", "move"):
        o = reference.objects[edit["object"]]
        new = edit["new"]
        if kind == "move":
            fields.update(new=new, cell=new, where=CELL_PHRASES[new], to=_cell_to(new))
        else:
            size_word = _size_word(replace(o, size=new), rng) if kind == "size" else ""
            result = {"colour": f"{new} {o.shape}", "shape": f"{o.colour} {new}",
                      "size": f"{size_word} {o.colour} {o.shape}"}[kind]
            fields.update(new=new, new_a=_article(new), new_size=size_word, result_a=_article(result))
    elif kind == "add":
        word = _size_word(replace(_PROTO, size=edit["size"]), rng)
        item = f"{word} {edit['colour']} {edit['shape']}"
        fields.update(item=item, item_a=_article(item), cell=edit["cell"], where=CELL_PHRASES[edit["cell"]])
    options = TEXT_FAMILIES[family][kind]
    return options[int(rng.integers(len(options)))].format(**fields)


# ------------------------------------------------------------------------------------- splits

@dataclass
class CIRSplit:
    """Composed queries and their gallery.  Query ``q`` is (``references[q]``, ``texts[q]``); its target is
    gallery row ``target[q]``, its reference is gallery row ``reference_row[q]`` (removed from CIRR's
    rankings), and ``groups[q]`` are the gallery rows of its near-duplicate group (the target among them)."""

    name: str
    seed: int
    references: list[Scene]
    texts: list[str]
    families: list[str]
    edits: list[dict]
    gallery: list[Scene]
    target: np.ndarray  # int64 [n_queries]
    reference_row: np.ndarray  # int64 [n_queries]
    groups: np.ndarray  # int64 [n_queries, group_size]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.references)

    @property
    def targets(self) -> list[Scene]:
        """The target scene of each query."""
        return [self.gallery[r] for r in self.target.tolist()]

    def reference_images(self, indices: list[int] | None = None, domain: str = "source",
                         size: int | None = None) -> np.ndarray:
        """Render query references to uint8 [n, size, size, 3] (default the world's ``RENDER_SIZE``)."""
        idx = range(len(self.references)) if indices is None else indices
        return np.stack([render_scene(self.references[i], size, domain) for i in idx])

    def gallery_images(self, indices: list[int] | None = None, domain: str = "source",
                       size: int | None = None) -> np.ndarray:
        """Render gallery scenes to uint8 [n, size, size, 3] (default the world's ``RENDER_SIZE``)."""
        idx = range(len(self.gallery)) if indices is None else indices
        return np.stack([render_scene(self.gallery[i], size, domain) for i in idx])

    def family_texts(self, family: str, seed: int = 0) -> list[str]:
        """Every query's modification text rewritten in ``family`` (e.g. a held-out style), deterministic by
        (``seed``, query index, family)."""
        if family not in TEXT_FAMILIES:
            raise ValueError(f"unknown modification-text family {family!r}; known: {tuple(TEXT_FAMILIES)}")
        f = list(TEXT_FAMILIES).index(family)
        return [modification_text(r, e, family, np.random.default_rng([seed, i, f]))
                for i, (r, e) in enumerate(zip(self.references, self.edits))]

    def metric_inputs(self) -> dict[str, np.ndarray]:
        """``targets``, ``references`` and ``subsets`` for :func:`qshift.retrieval.cir_metrics.cirr_metrics`."""
        return {"targets": self.target, "references": self.reference_row, "subsets": self.groups}

    def subset(self, n_queries: int, name: str | None = None) -> "CIRSplit":
        """The first ``n_queries`` queries with only their own gallery rows (order kept)."""
        keep = np.unique(np.concatenate([self.reference_row[:n_queries], self.groups[:n_queries].ravel()]))
        new_row = np.full(len(self.gallery), -1, dtype=np.int64)
        new_row[keep] = np.arange(len(keep))
        return CIRSplit(name=name or f"{self.name}[:{n_queries}]", seed=self.seed,
                        references=self.references[:n_queries], texts=self.texts[:n_queries],
                        families=self.families[:n_queries], edits=self.edits[:n_queries],
                        gallery=[self.gallery[i] for i in keep.tolist()], target=new_row[self.target[:n_queries]],
                        reference_row=new_row[self.reference_row[:n_queries]],
                        groups=new_row[self.groups[:n_queries]], meta=dict(self.meta))

    def fingerprint(self) -> str:
        """SHA-256 over the scenes, texts and rows (no rendering): identifies the exact set."""
        h = hashlib.sha256()
        for part in (self.references, self.texts, self.families, self.edits, self.gallery):
            h.update(repr(part).encode())
        for arr in (self.target, self.reference_row, self.groups):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()


def generate_cir_world(seed: int, n_queries: int, name: str | None = None, group_size: int = GROUP_SIZE,
                       families: tuple[str, ...] = SOURCE_TEXT_FAMILIES, unique_block: int | None = None) -> CIRSplit:
    """``n_queries`` composed queries from ``seed``, texts from ``families``, and their gallery: each query's
    reference and a group of ``group_size`` near-duplicates around its target.

    Every target's layout is unique among the gallery rows of its block of ``unique_block`` consecutive
    queries (default: all of them).  Uniqueness rejects draws — mostly one-object targets, whose layouts
    are few (1,152) — so the mix of queries depends on the block size; blocks of one size give one mix."""
    if n_queries <= 0:
        raise ValueError(f"n_queries must be positive, got {n_queries}")
    block = n_queries if unique_block is None else unique_block
    if block <= 0:
        raise ValueError(f"unique_block must be positive, got {unique_block}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (the target and one near-duplicate), got {group_size}")
    unknown = [f for f in families if f not in TEXT_FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown or no modification-text families {unknown}; known: {tuple(TEXT_FAMILIES)}")
    refs: list[Scene] = []
    texts: list[str] = []
    fams: list[str] = []
    edits: list[dict] = []
    rows: list[list[Scene]] = []
    target_keys: set = set()
    gallery_keys: set = set()
    draw = 0
    while len(refs) < n_queries:
        if draw > 50 * n_queries + 1000:
            raise RuntimeError(f"could not draw {n_queries} composed queries from seed {seed}")
        rng = _rng(seed, draw)
        draw += 1
        kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
        counts = _OBJECT_COUNTS[kind]
        weights = np.array([_COUNT_P[n] for n in counts])
        ref = sample_scene(rng, int(rng.choice(counts, p=weights / weights.sum())))
        made = _make_edit(ref, kind, rng)
        if made is None:
            continue
        edit, target = made
        if target.layout_key in gallery_keys or ref.layout_key in target_keys:
            continue
        sibs = _siblings(ref, target, edit, rng, group_size - 1, target_keys)
        if sibs is None:
            continue
        family = families[int(rng.integers(len(families)))]
        texts.append(modification_text(ref, edit, family, rng))
        fams.append(family)
        refs.append(ref)
        edits.append(edit)
        rows.append([ref, target, *sibs])
        if len(refs) % block == 0:
            target_keys, gallery_keys = set(), set()
        else:
            target_keys.add(target.layout_key)
            gallery_keys.update(s.layout_key for s in rows[-1])
    per = group_size + 1
    order = np.random.default_rng([seed, n_queries, 1 << 32]).permutation(per * n_queries)
    gallery = [rows[i // per][i % per] for i in order.tolist()]
    row_of = np.empty(per * n_queries, dtype=np.int64)
    row_of[order] = np.arange(per * n_queries)
    slots = row_of.reshape(n_queries, per)
    return CIRSplit(name=name or f"cir_world(seed={seed})", seed=seed, references=refs, texts=texts, families=fams,
                    edits=edits, gallery=gallery, target=slots[:, 1].copy(), reference_row=slots[:, 0].copy(),
                    groups=np.sort(slots[:, 1:], axis=1),
                    meta={"draws": draw, "group_size": group_size, "unique_block": block})


_CIR_CACHE: dict[str, CIRSplit] = {}


def load_cir_split(name: str) -> CIRSplit:
    """A fixed split of :data:`CIR_SPLITS` (``train``, ``val``, ``test``), generated once per process."""
    if name not in CIR_SPLITS:
        raise ValueError(f"unknown CIR world split {name!r}; known: {sorted(CIR_SPLITS)}")
    if name not in _CIR_CACHE:
        spec = CIR_SPLITS[name]
        _CIR_CACHE[name] = generate_cir_world(spec["seed"], spec["n_queries"], name=name,
                                              unique_block=spec["unique_block"])
    return _CIR_CACHE[name]
