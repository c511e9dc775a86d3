"""The task / direction table (src/qshift/data/task.py), median rank, and that no module branches on
direction strings."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from qshift.bench import evaluate, families
from qshift.data import task as T
from qshift.errors import UserError
from qshift.models.load import load_custom, load_model
from qshift.retrieval.metrics import median_rank, retrieval_metrics, summarise

SRC = Path(__file__).resolve().parents[1] / "src" / "qshift"


def test_every_direction_belongs_to_exactly_one_task():
    owners = {}
    for task in T.TASKS.values():
        for d in task.directions:
            assert d.name not in owners, f"{d.name} is in {owners.get(d.name)} and {task.name}"
            owners[d.name] = task.name
            assert d.task == task.name
    assert owners == {n: d.task for n, d in T.DIRECTIONS.items()}
    assert set(T.DIRECTIONS) == {"i2t", "t2i", "v2a", "a2v", "cir"}
    assert {t: T.directions_of(t) for t in T.TASKS} == {
        "image-text": ("i2t", "t2i"), "video-audio": ("v2a", "a2v"), "composed": ("cir",)}


def test_the_table_is_well_formed():
    for task in T.TASKS.values():
        assert task.relevance in T.RELEVANCE_RULES and task.description
        assert set(task.pending_metrics) <= set(task.metrics)
        assert len(set(task.metrics)) == len(task.metrics)
        for d in task.directions:
            assert d.query in T.MODALITIES and d.gallery in T.MODALITIES and d.description
    assert T.TASKS["image-text"].relevance == "many" and T.TASKS["video-audio"].relevance == "one"
    assert T.TASKS["image-text"].metrics == evaluate.REPORTED  # what `qshift eval` prints
    assert "MedR" in T.TASKS["video-audio"].metrics and "MedR" not in T.TASKS["image-text"].metrics
    assert T.DIRECTIONS["cir"].query == "image+text" and T.DIRECTIONS["cir"].gallery == "image"
    with pytest.raises(AttributeError):
        T.DIRECTIONS["i2t"].query = "text"  # frozen


@pytest.mark.parametrize("a,b", [("i2t", "t2i"), ("v2a", "a2v")])
def test_reverse_directions_swap_modalities(a, b):
    da, db = T.DIRECTIONS[a], T.DIRECTIONS[b]
    assert (da.query, da.gallery) == (db.gallery, db.query) and da.task == db.task
    assert T.reverse_of(a) == b and T.reverse_of(b) == a


def test_reverses_are_symmetric_and_within_a_task():
    for name in T.DIRECTIONS:
        rev = T.reverse_of(name)
        if rev is not None:
            assert T.reverse_of(rev) == name and T.DIRECTIONS[rev].task == T.DIRECTIONS[name].task
    assert T.reverse_of("cir") is None


def test_helpers_read_the_table():
    assert T.query_modality("i2t") == "image" and T.gallery_modality("i2t") == "text"
    assert T.query_modality("t2i") == "text" and T.gallery_modality("t2i") == "image"
    assert T.query_modality("a2v") == "audio" and T.gallery_modality("v2a") == "audio"
    assert T.task_of("v2a") is T.TASKS["video-audio"] and T.task_of("cir").name == "composed"
    assert T.get_direction("t2i") is T.DIRECTIONS["t2i"]


@pytest.mark.parametrize("fn", [T.query_modality, T.gallery_modality, T.task_of, T.get_direction, T.reverse_of])
def test_unknown_direction_lists_the_known_ones(fn):
    with pytest.raises(ValueError, match=r"unknown direction 'x2y'; expected one of i2t, t2i, v2a, a2v, cir"):
        fn("x2y")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'audio'; expected one of image-text, video-audio, composed"):
        T.directions_of("audio")


def test_check_served():
    assert T.check_served("t2i", ["image-text"], "X").name == "t2i"
    with pytest.raises(ValueError, match=r"direction 'v2a' belongs to the video-audio task, which X does not serve "
                                         r"\(it serves i2t, t2i\)"):
        T.check_served("v2a", ["image-text"], "X")
    with pytest.raises(ValueError, match=r"unknown direction 'x'; X serves i2t, t2i \(directions of other tasks: "
                                         r"v2a, a2v, cir\)"):
        T.check_served("x", ["image-text"], "X")


def test_existing_commands_offer_only_image_text_directions():
    assert families.DIRECTIONS == ("i2t", "t2i") and evaluate.DIRECTIONS == ("i2t", "t2i")


#: the directions each built-in backbone serves (src/qshift/models/load.py's SERVED_TASKS)
SERVES = {"world": "i2t, t2i, cir, v2a, a2v", "openclip:ViT-B-32": "i2t, t2i, cir", "hf-clip:/nowhere": "i2t, t2i, cir",
          "hf-blip:/nowhere": "i2t, t2i"}


@pytest.mark.parametrize("spec, direction", [(s, d) for s in SERVES for d in ("v2a", "a2v", "cir")
                                              if d not in SERVES[s].split(", ")])
def test_builtin_backbones_name_the_task_they_do_not_serve(spec, direction):
    task = T.DIRECTIONS[direction].task
    with pytest.raises(UserError, match=rf"direction '{direction}' belongs to the {task} task, which backbone "
                                        rf"{spec} does not serve \(it serves {SERVES[spec]}\)"):
        load_model(spec, direction)


def test_an_unknown_direction_is_still_a_direction_error():
    with pytest.raises(UserError, match="--direction must be one of i2t, t2i, cir, v2a, a2v, got 'x2y'"):
        load_model("world", "x2y")
    with pytest.raises(UserError, match="unknown direction 'x2y'"):
        load_custom("nosuch", "build", "x2y")


def test_the_world_evaluation_names_the_task_it_does_not_serve():
    with pytest.raises(ValueError, match="direction 'v2a' belongs to the video-audio task, which the embedded world"):
        evaluate.evaluate_world_split(None, None, ("i2t", "v2a"))


# ------------------------------------------------------------------------------- median rank

@pytest.mark.parametrize("ranks", [[0], [3, 0, 7], [0, 1], [5, 0, 2, 9], [4, 4, 1, 0, 12, 3], list(range(11))])
def test_median_rank_is_numpys_median_of_one_based_ranks(ranks):
    assert median_rank(torch.tensor(ranks)) == float(np.median(np.asarray(ranks) + 1))


def test_median_rank_even_count_averages_the_middle_two():
    assert median_rank(torch.tensor([0, 1])) == 1.5
    assert median_rank(torch.tensor([9, 0, 2, 4])) == 4.0  # 1-based 1, 3, 5, 10 -> (3 + 5) / 2
    with pytest.raises(ValueError, match="no queries"):
        median_rank(torch.tensor([], dtype=torch.int64))


def test_summarise_default_keys_are_unchanged_and_medr_is_opt_in():
    ranks = torch.tensor([0, 3, 12, 1, 0])
    aps = torch.tensor([1.0, 0.25, 0.05, 0.5, 1.0], dtype=torch.float64)
    base = summarise(ranks, aps)
    assert list(base) == ["R@1", "R@5", "R@10", "mAP", "R-mean"]
    assert base["R@1"] == 40.0 and base["R@5"] == 80.0 and base["R@10"] == 80.0
    with_medr = summarise(ranks, aps, metrics=T.TASKS["video-audio"].metrics)
    assert list(with_medr) == [*base, "MedR"] and with_medr["MedR"] == 2.0  # 1-based 1, 1, 2, 4, 13
    assert {k: with_medr[k] for k in base} == base
    assert summarise(ranks, aps, metrics=T.TASKS["image-text"].metrics) == base


def test_summarise_computes_every_metric_a_task_declares_except_the_pending_ones():
    ranks, aps = torch.tensor([0, 30, 60, 2]), torch.full((4,), 0.5, dtype=torch.float64)
    subset_ranks = torch.tensor([0, 1, 4, 2])
    for task in T.TASKS.values():
        done = [m for m in task.metrics if m not in task.pending_metrics]
        out = summarise(ranks, aps, metrics=done, subset_ranks=subset_ranks)
        assert set(done) <= set(out)
        for m in task.pending_metrics:
            with pytest.raises(ValueError, match=f"cannot compute '{m}'"):
                summarise(ranks, aps, metrics=[m])
    assert summarise(ranks, aps, metrics=["R@50"])["R@50"] == 75.0
    assert summarise(ranks, aps, metrics=["R_s@2"], subset_ranks=subset_ranks)["R_s@2"] == 50.0
    with pytest.raises(ValueError, match="subset_ranks"):
        summarise(ranks, aps, metrics=["R_s@1"])


def test_retrieval_metrics_passes_metrics_through():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.9, 0.1]])
    ids = torch.arange(3)
    plain = retrieval_metrics(scores, ids, ids)
    m = retrieval_metrics(scores, ids, ids, metrics=("MedR",))
    assert m == {**plain, "MedR": 2.0}  # 1-based ranks 1, 3, 2


# ------------------------------------------------------------------------------- no direction ladders

_DIRECTION_NAMES = frozenset(T.DIRECTIONS)


def _is_direction_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in _DIRECTION_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_direction_literal(e) for e in node.elts)
    return False


def _direction_comparisons(source: str, label: str) -> list[str]:
    """``label:line`` of each comparison (==, !=, in, not in, match/case) against a direction literal."""
    hits = []
    for node in ast.walk(ast.parse(source, label)):
        if isinstance(node, ast.Compare) and any(_is_direction_literal(x) for x in [node.left, *node.comparators]):
            hits.append(f"{label}:{node.lineno}")
        elif isinstance(node, ast.MatchValue) and _is_direction_literal(node.value):
            hits.append(f"{label}:{node.lineno}")
    return hits


def test_the_scan_finds_a_ladder():
    source = ('if d == "i2t":\n    pass\nelif "v2a" != d or d in ("t2i", "cir"):\n    pass\n'
              'match d:\n    case "a2v":\n        pass\nif d == "image" or x == {"i2t": 1}:\n    pass\n')
    assert sorted(_direction_comparisons(source, "x.py")) == ["x.py:1", "x.py:3", "x.py:3", "x.py:6"]


def test_no_module_compares_a_direction_to_a_string_literal():
    hits = [h for path in sorted(SRC.rglob("*.py")) if path != SRC / "data" / "task.py"
            for h in _direction_comparisons(path.read_text(), str(path.relative_to(SRC.parent)))]
    assert hits == [], f"read qshift.data.task's table instead of comparing direction names: {hits}"
