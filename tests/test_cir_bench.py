"""Composed retrieval in the core: the engine's reference removal and subset ranks, and the CIR benchmark
families (built on a small CIR split so that rendering stays cheap)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qshift.bench import cir_families
from qshift.bench.registry import build_benchmark, describe, list_benchmarks
from qshift.data import cir_world
from qshift.data.task import QueryRelevance
from qshift.engine import batch_ranks
from qshift.retrieval.cir_metrics import cir_ranks


class _Whole:
    last_cols = None


class _TopK:
    def __init__(self, cols):
        self.last_cols = cols


def _relevance_case(q=12, n=40, s=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    targets, refs = perm[:q], perm[q:2 * q]
    others = perm[2 * q:]
    subsets = torch.stack([torch.cat([targets[i:i + 1], others[torch.randperm(len(others), generator=g)[:s - 1]]])
                           for i in range(q)])
    subsets[0, -1] = -1  # a shorter group
    gallery_ids = torch.full((n,), -1, dtype=torch.long)
    gallery_ids[targets] = torch.arange(q)
    scores = torch.randn(q, n, generator=g)
    scores[:, refs] += 3.0  # the reference would win if it were not removed
    rel = QueryRelevance(exclude=refs.numpy(), subsets=subsets.numpy())
    return scores, targets, refs, subsets, gallery_ids, rel


def test_batch_ranks_remove_the_reference_and_rank_within_the_group_like_cirr():
    scores, targets, refs, subsets, gids, rel = _relevance_case()
    labels = torch.arange(len(targets))
    ranks, aps, sub = batch_ranks(_Whole(), scores, labels, gids, rel)
    want, want_sub = cir_ranks(scores, targets, refs, subsets)
    assert torch.equal(ranks, want) and torch.equal(sub, want_sub)
    assert torch.allclose(aps, 1.0 / (want.double() + 1))  # one positive: AP is 1 / (rank + 1)
    plain, _, none = batch_ranks(_Whole(), scores, labels, gids)
    assert none is None and bool((plain >= ranks).all()) and bool((plain > ranks).any())
    # top-K mode with every row a candidate (columns in another order) gives the same ranks
    order = torch.stack([torch.randperm(scores.shape[1]) for _ in range(len(labels))])
    ranks_k, _, sub_k = batch_ranks(_TopK(order), scores.gather(1, order), labels, gids, rel)
    assert torch.equal(ranks_k, want) and torch.equal(sub_k, want_sub)


def test_a_group_without_its_positive_is_an_error():
    scores, targets, refs, subsets, gids, _ = _relevance_case()
    bad = subsets.clone()
    bad[3, 0] = refs[3]
    with pytest.raises(ValueError, match="group"):
        batch_ranks(_Whole(), scores, torch.arange(len(targets)), gids, QueryRelevance(subsets=bad.numpy()))


@pytest.fixture(scope="module")
def small_cir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("QSHIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    split = cir_world.generate_cir_world(cir_world.CIR_SPLITS["test"]["seed"], 24, name="test")
    mp.setattr(cir_families.cir_world, "load_cir_split", lambda name: split)
    yield split
    mp.undo()


def _check_task(task, split, n=24):
    assert task.direction == "cir" and task.query_modality == "image+text" and task.gallery_modality == "image"
    assert len(task.gallery) == len(split.gallery) and task.gallery.dtype == np.uint8
    positives = np.flatnonzero(task.gallery_ids >= 0)
    assert sorted(positives.tolist()) == sorted(split.target.tolist())
    assert np.array_equal(task.gallery_ids[split.target], np.arange(len(split)))
    assert np.array_equal(task.relevance.exclude, split.reference_row)
    assert np.array_equal(task.relevance.subsets, split.groups)
    for qs in task.query_sets:
        image, text = qs.items[0]
        assert image.dtype == np.uint8 and image.ndim == 3 and isinstance(text, str) and text
    assert task.n_queries == n * len(task.query_sets) or task.stream_kind.startswith("mixed")


def test_cir_families_build_queries_from_either_half(small_cir):
    clean = build_benchmark("world-cir/clean")
    _check_task(clean, small_cir)
    c_img, c_txt = clean.query_sets[0].items[0]
    assert c_txt == small_cir.texts[0]
    image = build_benchmark("world-cir-c/image/gaussian_noise/5")
    _check_task(image, small_cir)
    i_img, i_txt = image.query_sets[0].items[0]
    assert i_txt == c_txt and np.abs(i_img.astype(int) - c_img.astype(int)).mean() > 10
    text = build_benchmark("world-cir-c/text/keyboard/6")
    _check_task(text, small_cir)
    changed = [t != small_cir.texts[k] for k, (_, t) in enumerate(text.query_sets[0].items)]
    assert np.array_equal(text.query_sets[0].items[0][0], c_img) and np.mean(changed) > 0.8
    both = build_benchmark("world-cir-c/both/defocus_blur/4")
    _check_task(both, small_cir)
    b_img, _ = both.query_sets[0].items[0]
    assert not np.array_equal(b_img, c_img)
    assert np.mean([t != small_cir.texts[k] for k, (_, t) in enumerate(both.query_sets[0].items)]) > 0.5
    style = build_benchmark("world-cir-style/question")
    assert [t for _, t in style.query_sets[0].items] == small_cir.family_texts("question")
    qgs = build_benchmark("world-cir-qgs/outline")
    dom = build_benchmark("world-cir-domain/outline")
    assert np.array_equal(qgs.query_sets[0].items[0][0], dom.query_sets[0].items[0][0])
    assert not np.array_equal(qgs.gallery, clean.gallery) and np.array_equal(dom.gallery, clean.gallery)
    assert qgs.meta["gallery_domain"] == "outline"


def test_cir_streams_and_names(small_cir):
    diverse = build_benchmark("world-cir-diverse/mix8/order1")
    _check_task(diverse, small_cir)
    assert [q.domain for q in diverse.query_sets] == list(cir_families.DIVERSE_MIX8)
    assert diverse.domain_order == list(range(8))[::-1] and diverse.stream_kind == "sequential"
    mixed = build_benchmark("world-cir-mixed/image-c16-s5/interleaved")
    assert sum(len(q) for q in mixed.query_sets) == len(small_cir)
    sub = build_benchmark("world-cir/clean", max_queries=10)
    assert sub.n_queries == 10 and len(sub.gallery) == len(small_cir.gallery)
    names = list_benchmarks()
    assert "world-cir/clean" in names and "world-cir-c/image/gaussian_noise/5" in names
    assert "world-cir-c/text/keyboard/6" in names and "world-cir-diverse/mix8/order0" in names
    assert describe("world-cir-c/image/fog/5")["summary"] == "CIR image s5"
    with pytest.raises(ValueError):
        build_benchmark("world-cir/clean", split="test1k")
