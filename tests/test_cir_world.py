"""The embedded composed-image-retrieval world (qshift.data.cir_world)."""
import math
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from qshift.data import cir_world as cw
from qshift.data.world import COLOURS, IMAGE_SIZE, SHAPES, SIZE_RADIUS, SIZES
from qshift.retrieval.cir_metrics import cirr_metrics

SIZE_WORDS = {"small": {"small", "little"}, "large": {"large", "big"}}
CELL_RE = re.compile(r"\b(top left|top right|bottom left|bottom right|top|bottom|left|right|center)\b")
FAMILY_MARKERS = {
    "imperative": r"^(make|paint|turn|replace|add|put|remove|delete|move|swap) ",
    "descriptive": r"( now$|has turned|has become|^there is also|is gone$|has disappeared$|have traded places$)",
    "terse": r"( -> | <-> |^\+ |^- )",
    "relative": r"^has ",
    "question": r"^what if .*\?$",
    "formal": r"( is changed to | is added | is removed | is relocated | are exchanged$)",
}


@pytest.fixture(scope="module")
def test_split():
    return cw.load_cir_split("test")


@pytest.fixture(scope="module")
def small():
    return cw.generate_cir_world(7, 300)


def expected_layout(ref, edit):
    """The target's layout, worked out from the reference and the edit's plain description alone."""
    objs = [[o.shape, o.colour, o.size, o.cell] for o in ref.objects]
    kind = edit["kind"]
    if kind in ("shape", "colour", "size", "move"):
        objs[edit["object"]][cw.ATTRIBUTES.index("cell" if kind == "move" else kind)] = edit["new"]
    elif kind == "add":
        objs.append([edit["shape"], edit["colour"], edit["size"], edit["cell"]])
    elif kind == "remove":
        objs.pop(edit["object"])
    else:
        i, j = edit["object"], edit["other"]
        objs[i][3], objs[j][3] = objs[j][3], objs[i][3]
    return tuple(sorted(tuple(o) for o in objs))


def attrs(o):
    return (o.shape, o.colour, o.size, o.cell)


def check_edit(ref, tgt, edit):
    r, t = list(ref.objects), list(tgt.objects)
    assert (tgt.background, tgt.noise_seed) == (ref.background, ref.noise_seed)
    kind = edit["kind"]
    if kind in ("shape", "colour"):
        i = edit["object"]
        assert edit["old"] == getattr(r[i], kind) != edit["new"]
        assert t[i] == replace(r[i], **{kind: edit["new"]})
        assert t[:i] + t[i + 1:] == r[:i] + r[i + 1:]
    elif kind in ("size", "move"):
        i = edit["object"]
        attr = "cell" if kind == "move" else "size"
        assert edit["old"] == getattr(r[i], attr) != edit["new"]
        assert getattr(t[i], attr) == edit["new"]
        keep = ("shape", "colour", "rotation", "tint") + (("cell",) if kind == "size" else ("size", "radius"))
        assert all(getattr(t[i], k) == getattr(r[i], k) for k in keep)
        if kind == "size":
            lo, hi = SIZE_RADIUS[edit["new"]]
            assert lo <= t[i].radius <= hi
        assert t[:i] + t[i + 1:] == r[:i] + r[i + 1:]
    elif kind == "add":
        assert len(r) <= 2 and t[:-1] == r
        assert attrs(t[-1]) == (edit["shape"], edit["colour"], edit["size"], edit["cell"])
    elif kind == "remove":
        i = edit["object"]
        assert len(r) >= 2 and t == r[:i] + r[i + 1:]
    elif kind == "swap":
        i, j = edit["object"], edit["other"]
        assert i != j and r[i].cell != r[j].cell
        assert t[i] == replace(r[i], x=r[j].x, y=r[j].y) and t[j] == replace(r[j], x=r[i].x, y=r[i].y)
        assert [o for k, o in enumerate(t) if k not in (i, j)] == [o for k, o in enumerate(r) if k not in (i, j)]
    else:
        pytest.fail(f"unknown edit kind {kind}")
    assert tgt.layout_key == expected_layout(ref, edit)


def check_scene_rules(scene):
    objs = scene.objects
    assert 1 <= len(objs) <= 3
    assert len({(o.shape, o.colour) for o in objs}) == len(objs), "two objects share shape and colour"
    for o in objs:
        assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
        lo, hi = SIZE_RADIUS[o.size]
        assert lo <= o.radius <= hi
        assert o.radius + 2 <= o.x <= IMAGE_SIZE - o.radius - 2 and o.radius + 2 <= o.y <= IMAGE_SIZE - o.radius - 2
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            oa, ob = objs[a], objs[b]
            assert math.hypot(oa.x - ob.x, oa.y - ob.y) > oa.radius + ob.radius + 4, "objects overlap"


def named_objects(scene, phrase):
    """The objects of ``scene`` that every attribute word of ``phrase`` fits."""
    words = phrase.split()
    assert words and words[-1] in SHAPES, phrase
    want = {"shape": words[-1]}
    for w in words[:-1]:
        if w in COLOURS:
            want["colour"] = w
        else:
            want["size"] = next(s for s, ws in SIZE_WORDS.items() if w in ws)
    return [k for k, o in enumerate(scene.objects) if all(getattr(o, a) == v for a, v in want.items())]


def check_text(ref, edit, text, family):
    assert re.search(FAMILY_MARKERS[family], text), (family, text)
    words = set(re.findall(r"[a-z]+", text))
    kind = edit["kind"]
    if kind != "add":
        assert edit["subject"] in text
        assert named_objects(ref, edit["subject"]) == [edit["object"]], (text, ref.objects)
    if kind == "swap":
        assert edit["other_subject"] in text
        assert named_objects(ref, edit["other_subject"]) == [edit["other"]]
    if kind in ("colour", "shape"):
        assert edit["new"] in words
    if kind == "size":
        assert words & SIZE_WORDS[edit["new"]], text
    if kind == "move":
        assert CELL_RE.findall(text) == [edit["new"]], text
    if kind == "add":
        assert {edit["shape"], edit["colour"]} <= words and words & SIZE_WORDS[edit["size"]], text
        assert CELL_RE.findall(text) == [edit["cell"]], text
    if kind == "remove":
        assert CELL_RE.findall(text) == []


def test_same_seed_same_world_other_seed_other_world():
    a, b = cw.generate_cir_world(5, 60), cw.generate_cir_world(5, 60)
    assert a.fingerprint() == b.fingerprint() and a.texts == b.texts
    assert cw.generate_cir_world(6, 60).fingerprint() != a.fingerprint()
    prefix = cw.generate_cir_world(5, 20)
    assert prefix.texts == a.texts[:20] and prefix.edits == a.edits[:20] and prefix.references == a.references[:20]
    assert a.family_texts("question", seed=1) == b.family_texts("question", seed=1)


def test_split_sizes(test_split):
    assert cw.CIR_SPLITS["test"]["n_queries"] >= 2000 and len(cw.CIR_SPLITS) == 3
    assert len({s["seed"] for s in cw.CIR_SPLITS.values()}) == 3
    q = len(test_split)
    assert q == cw.CIR_SPLITS["test"]["n_queries"] >= 2000
    assert len(test_split.texts) == len(test_split.families) == len(test_split.edits) == q
    assert len(test_split.gallery) == q * (cw.GROUP_SIZE + 1)
    assert test_split.groups.shape == (q, cw.GROUP_SIZE)
    assert test_split.target.shape == test_split.reference_row.shape == (q,)
    assert cw.load_cir_split("test") is test_split
    with pytest.raises(ValueError, match="unknown CIR world split"):
        cw.load_cir_split("test1k")


def test_every_target_is_its_reference_with_exactly_the_declared_edit(test_split):
    kinds = Counter()
    for ref, tgt, edit in zip(test_split.references, test_split.targets, test_split.edits):
        check_edit(ref, tgt, edit)
        kinds[edit["kind"]] += 1
    assert set(kinds) == set(cw.EDIT_KINDS)
    assert min(kinds.values()) > 0.08 * len(test_split)


def test_every_gallery_scene_follows_the_world_rules(test_split):
    for scene in test_split.gallery:
        check_scene_rules(scene)


def test_texts_name_the_edited_object_and_the_new_value(test_split, small):
    for ref, edit, text, fam in zip(test_split.references, test_split.edits, test_split.texts, test_split.families):
        check_text(ref, edit, text, fam)
    for fam in cw.TEXT_FAMILIES:
        for ref, edit, text in zip(small.references, small.edits, small.family_texts(fam)):
            check_text(ref, edit, text, fam)


def test_text_families_and_held_out_styles():
    assert len(cw.TEXT_FAMILIES) >= 4 and len(cw.SOURCE_TEXT_FAMILIES) >= 4 and cw.HELD_OUT_TEXT_FAMILIES
    assert set(cw.SOURCE_TEXT_FAMILIES) | set(cw.HELD_OUT_TEXT_FAMILIES) == set(cw.TEXT_FAMILIES)
    assert not set(cw.SOURCE_TEXT_FAMILIES) & set(cw.HELD_OUT_TEXT_FAMILIES)
    for fam, table in cw.TEXT_FAMILIES.items():
        assert set(table) == set(cw.EDIT_KINDS), fam
    with pytest.raises(ValueError, match="unknown modification-text family"):
        cw.modification_text(None, {"kind": "remove"}, "poetic", np.random.default_rng(0))


def test_held_out_families_are_absent_from_the_splits(test_split):
    spec = cw.CIR_SPLITS["train"]
    train_head = cw.generate_cir_world(spec["seed"], 400, unique_block=spec["unique_block"])
    for split in (train_head, test_split):
        used = Counter(split.families)
        assert set(used) == set(cw.SOURCE_TEXT_FAMILIES), used
        assert not any(re.search(FAMILY_MARKERS[f], t) for f in cw.HELD_OUT_TEXT_FAMILIES for t in split.texts)


def test_reference_edit_pairs_and_target_layouts_are_unique_in_test(test_split):
    def edit_key(ref, edit):
        named = {k: attrs(ref.objects[edit[k]])[:2] for k in ("object", "other") if k in edit}
        rest = {k: v for k, v in edit.items() if k not in ("object", "other", "subject", "other_subject")}
        return ref.layout_key, tuple(sorted(rest.items())), tuple(sorted(named.items()))

    keys = [edit_key(r, e) for r, e in zip(test_split.references, test_split.edits)]
    assert len(set(keys)) == len(keys)
    gallery_layouts = Counter(s.layout_key for s in test_split.gallery)
    assert all(gallery_layouts[t.layout_key] == 1 for t in test_split.targets), "a target's layout is ambiguous"


def test_gallery_rows_of_target_and_reference(test_split):
    for q, (ref, edit) in enumerate(zip(test_split.references, test_split.edits)):
        assert test_split.gallery[test_split.target[q]].layout_key == expected_layout(ref, edit)
        assert test_split.gallery[test_split.reference_row[q]] is ref
    assert len(set(test_split.target.tolist())) == len(test_split)
    order = test_split.target[:200]
    assert not np.array_equal(order, np.sort(order)), "gallery rows are not shuffled"


def test_groups_are_the_target_and_near_duplicates_one_attribute_away(test_split):
    g = test_split.groups
    assert ((g >= 0) & (g < len(test_split.gallery))).all()
    assert (g == test_split.target[:, None]).sum(1).tolist() == [1] * len(test_split)
    assert not (g == test_split.reference_row[:, None]).any()
    assert all(len(set(row)) == cw.GROUP_SIZE for row in g.tolist())
    changed = Counter()
    for q, row in enumerate(g.tolist()):
        tgt = test_split.gallery[test_split.target[q]]
        layouts = {test_split.gallery[r].layout_key for r in row}
        assert len(layouts) == cw.GROUP_SIZE and test_split.references[q].layout_key not in layouts
        for r in row:
            if r == test_split.target[q]:
                continue
            member = test_split.gallery[r]
            assert len(member.objects) == len(tgt.objects)
            diffs = [(k, a) for k, (m, t) in enumerate(zip(member.objects, tgt.objects))
                     for a, mv, tv in zip(cw.ATTRIBUTES, attrs(m), attrs(t)) if mv != tv]
            assert len(diffs) == 1, (diffs, member.objects, tgt.objects)
            kind = test_split.edits[q]["kind"]
            if kind in ("colour", "shape", "move"):
                changed[diffs[0][1] == ("cell" if kind == "move" else kind)] += 1
    assert changed[True] > 0.9 * sum(changed.values()), "groups should mostly vary the edited attribute"


def test_perfect_scores_give_100_and_random_scores_chance(test_split, small):
    gallery_ids: dict = {}
    gid = torch.tensor([gallery_ids.setdefault(s.layout_key, len(gallery_ids)) for s in test_split.gallery])
    want = torch.tensor([gallery_ids.get(expected_layout(r, e), -1)
                         for r, e in zip(test_split.references, test_split.edits)])
    perfect = (gid[None, :] == want[:, None]).to(torch.uint8)
    m = cirr_metrics(perfect, **test_split.metric_inputs())
    assert m["R@1"] == 100.0 and m["R_s@1"] == 100.0

    copy_reference = torch.zeros(len(test_split), len(test_split.gallery), dtype=torch.uint8)
    copy_reference[torch.arange(len(test_split)), torch.as_tensor(test_split.reference_row)] = 1
    assert cirr_metrics(copy_reference, **test_split.metric_inputs())["R@1"] == 0.0

    g = torch.Generator().manual_seed(0)
    rand = cirr_metrics(torch.rand(len(small), len(small.gallery), generator=g), **small.metric_inputs())
    assert rand["R@1"] < 2 and rand["R@50"] < 8
    assert 100 / cw.GROUP_SIZE - 8 < rand["R_s@1"] < 100 / cw.GROUP_SIZE + 8


def test_images_render_on_demand(small):
    refs = small.reference_images([0, 1], size=96)
    assert refs.shape == (2, 96, 96, 3) and refs.dtype == np.uint8
    same = small.gallery_images([int(small.reference_row[0])], size=96)
    np.testing.assert_array_equal(same[0], refs[0])
    target = small.gallery_images([int(small.target[0])], size=96)
    assert not np.array_equal(target[0], refs[0])
    assert not np.array_equal(small.reference_images([0], size=96, domain="sketch")[0], refs[0])


def test_subset_keeps_each_query_with_its_own_rows(small):
    sub = small.subset(40)
    assert len(sub) == 40 and len(sub.gallery) == 40 * (cw.GROUP_SIZE + 1)
    assert [s.layout_key for s in sub.targets] == [s.layout_key for s in small.targets[:40]]
    assert all(sub.gallery[r] is ref for r, ref in zip(sub.reference_row.tolist(), sub.references))
    for q in range(40):
        assert ({sub.gallery[r].layout_key for r in sub.groups[q].tolist()}
                == {small.gallery[r].layout_key for r in small.groups[q].tolist()})


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_queries"):
        cw.generate_cir_world(0, 0)
    with pytest.raises(ValueError, match="families"):
        cw.generate_cir_world(0, 5, families=("poetic",))
    with pytest.raises(ValueError, match="group_size"):
        cw.generate_cir_world(0, 5, group_size=1)
