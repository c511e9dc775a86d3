import numpy as np
import pytest

from qshift.data.streams import QuerySet, mixed_stream, sequential_stream, single_stream


def sets():
    a = QuerySet("A", np.arange(150)[:, None, None, None].repeat(2, 1).astype(np.uint8), np.arange(150))
    b = QuerySet("B", [f"t{i}" for i in range(70)], np.arange(70) + 1000)
    c = QuerySet("C", [f"u{i}" for i in range(30)], np.arange(30) + 2000)
    return a, b, c


def test_single_stream_batches_and_determinism():
    a, _, _ = sets()
    s = single_stream(a, batch_size=64, seed=0)
    batches = list(s)
    assert [len(b) for b in batches] == [64, 64, 22]
    seen = np.concatenate([b.ids for b in batches])
    assert sorted(seen.tolist()) == list(range(150)) and not np.array_equal(seen, np.arange(150))
    assert np.array_equal(seen, np.concatenate([b.ids for b in single_stream(a, 64, seed=0)]))
    assert not np.array_equal(seen, np.concatenate([b.ids for b in single_stream(a, 64, seed=1)]))
    # items travel with their ids
    for b in batches:
        assert np.array_equal(b.items[:, 0, 0, 0], b.ids.astype(np.uint8))


def test_sequential_stream_keeps_domains_contiguous_and_unmixed():
    _, b, c = sets()
    s = sequential_stream([b, c], batch_size=32, seed=3, domain_order=[1, 0])
    batches = list(s)
    assert [len(x) for x in batches] == [30, 32, 32, 6]
    assert all(len(set(x.domains)) == 1 for x in batches)
    assert [x.domains[0] for x in batches] == ["C", "B", "B", "B"]
    for x in batches:
        assert all(t == f"{'t' if d == 'B' else 'u'}{i % 1000}" for t, d, i in zip(x.items, x.domains, x.ids))
    with pytest.raises(ValueError, match="permutation"):
        sequential_stream([b, c], domain_order=[0, 0])


def test_mixed_streams_cover_every_query_once():
    _, b, c = sets()
    for mode in ("interleaved", "segments"):
        s = mixed_stream([b, c], batch_size=16, seed=0, mode=mode, segment=10)
        ids = np.concatenate([x.ids for x in s])
        assert sorted(ids.tolist()) == sorted(list(b.ids) + list(c.ids))
        doms = s.domains()
        switches = sum(d1 != d2 for d1, d2 in zip(doms, doms[1:]))
        assert switches >= 3
    seg = mixed_stream([b, c], batch_size=16, seed=0, mode="segments", segment=10).domains()
    runs = [len(r) for r in "".join(d for d in seg).replace("BC", "B|C").replace("CB", "C|B").split("|")]
    assert all(r % 10 == 0 for r in runs)
    with pytest.raises(ValueError, match="mode"):
        mixed_stream([b], mode="zigzag")


def test_query_set_validation():
    with pytest.raises(ValueError, match="ids"):
        QuerySet("x", ["a", "b"], [1])
    with pytest.raises(ValueError, match="empty"):
        QuerySet("x", [], [])
