"""Recall@K + mAP at COCO scale: a per-row numpy argsort loop (as TCR's ``itm_eval``), the old
qshift implementation and the current one, side by side in one process.

    python benchmarks/metrics_speed.py                        # 5,000 images x 25,000 captions
    python benchmarks/metrics_speed.py --loop-rows 1000       # time the loops on 1,000 rows, extrapolate
    python benchmarks/metrics_speed.py --threads 2            # torch on 2 threads (default 1, like the loop)
    python benchmarks/metrics_speed.py --device cuda          # the current implementation on a GPU too

One seeded score matrix ``S`` (images x captions, float32: noise plus a boost on the positives, so
R@1 is around 40-50 %) serves both directions: i2t scores ``S`` (5 positives per image), t2i scores
``S.T`` (1 positive per caption).  For each direction it times

  (a) ``loop``: for each row, ``np.argsort`` the scores and take the position of the best positive
      (R@1/5/10), then two full sorts for the AP (negatives first, then a stable descending sort by
      score, so ties count against the query);
  (b) ``old``: qshift's ``per_query_ranks_and_ap`` before issue 23 (copied below verbatim);
  (c) ``new``: ``qshift.retrieval.metrics.per_query_ranks_and_ap``;

asserts that the three give the same ranks (exactly) and APs (allclose), and that ``summarise``
gives the same R@K (exactly) and mAP (to 1e-6), then prints seconds and speed-ups.  ``np.argsort``
breaks ties arbitrarily, so rows where a negative scores exactly the best positive's score are left
out of the loop's rank comparison (their count is printed; old and new are compared on every row).
With ``--loop-rows`` / ``--old-rows`` the loop / old code runs on the first rows only and its time is
extrapolated linearly to all rows (printed as such).  The new code is timed as the median of
``--repeats`` runs (it is cheap); the loop and the old code once.

Torch runs on ``--threads`` threads (default 1, so all three use one core, as the numpy loop does).
On a shared machine more threads can be much slower: the new code issues many small cache-sized
operations, and each waits at a barrier for a descheduled thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from qshift.retrieval.metrics import _check_shapes, per_query_ranks_and_ap, summarise


# ---- (b) the old qshift implementation, copied verbatim (names prefixed ``old_``) ----------------

def old_check(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> None:
    _check_shapes(scores, query_ids, gallery_ids)  # the shape checks did not change (shared, not copied)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")


def old_first_positive_rank(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best-ranked relevant gallery item (ties counted against it)."""
    old_check(scores, query_ids, gallery_ids)
    rel = query_ids[:, None] == gallery_ids[None, :]
    if not rel.any(1).all():
        missing = int((~rel.any(1)).nonzero()[0])
        raise ValueError(f"query {missing} (id {int(query_ids[missing])}) has no relevant gallery item")
    best = scores.masked_fill(~rel, float("-inf")).amax(1, keepdim=True)
    above = (scores > best).sum(1)
    tied_neg = ((scores == best) & ~rel).sum(1)
    return above + tied_neg


def old_average_precision(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> torch.Tensor:
    """Per-query average precision over all relevant items (ties ranked against the query)."""
    old_check(scores, query_ids, gallery_ids)
    rel = query_ids[:, None] == gallery_ids[None, :]
    n_rel = rel.sum(1)
    if (n_rel == 0).any():
        missing = int((n_rel == 0).nonzero()[0])
        raise ValueError(f"query {missing} (id {int(query_ids[missing])}) has no relevant gallery item")
    # negatives first, then a stable descending sort by score: among equal scores negatives lead
    order0 = torch.argsort(rel.to(torch.int8), dim=1, stable=True)
    s0 = torch.gather(scores, 1, order0)
    order1 = torch.argsort(s0, dim=1, descending=True, stable=True)
    rel_sorted = torch.gather(torch.gather(rel, 1, order0), 1, order1).to(scores.dtype if scores.is_floating_point() else torch.float32)
    hits = rel_sorted.cumsum(1)
    positions = torch.arange(1, scores.shape[1] + 1, dtype=hits.dtype, device=scores.device)
    return (hits / positions * rel_sorted).sum(1) / n_rel.to(hits.dtype)


def old_per_query_ranks_and_ap(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                               chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's first-positive rank and average precision (for online scoring batch by batch)."""
    query_ids, gallery_ids = torch.as_tensor(query_ids), torch.as_tensor(gallery_ids)
    ranks, aps = [], []
    for s in range(0, scores.shape[0], chunk):
        block = scores[s:s + chunk].detach()
        block = block if block.is_floating_point() else block.float()
        ranks.append(old_first_positive_rank(block, query_ids[s:s + chunk], gallery_ids))
        aps.append(old_average_precision(block, query_ids[s:s + chunk], gallery_ids))
    return torch.cat(ranks), torch.cat(aps)


# ---- (a) the per-row numpy loop, written the way TCR's itm_eval scores a direction ---------------

def loop_ranks_and_ap(scores: np.ndarray, positives: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: argsort for the best positive's rank; two full sorts for the AP."""
    n_q, n_g = scores.shape
    ranks = np.empty(n_q, dtype=np.int64)
    aps = np.empty(n_q, dtype=np.float64)
    positions = np.arange(1, n_g + 1)
    for i, score in enumerate(scores):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for p in positives[i]:
            tmp = np.where(inds == p)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[i] = rank
        rel = np.zeros(n_g, dtype=bool)
        rel[positives[i]] = True
        order0 = np.argsort(rel, kind="stable")              # negatives first
        order1 = np.argsort(-score[order0], kind="stable")   # then by score, descending, stable
        rel_sorted = rel[order0][order1]
        aps[i] = (np.cumsum(rel_sorted) / positions)[rel_sorted].mean()
    return ranks, aps


# ---- driver -------------------------------------------------------------------------------------

def make_scores(n_images: int, per_image: int, seed: int, boost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``[n_images, n_images * per_image]`` float32 scores and the captions' image ids."""
    g = torch.Generator().manual_seed(seed)
    caption_image = torch.randperm(n_images * per_image, generator=g) % n_images
    scores = torch.randn(n_images, n_images * per_image, generator=g)
    scores[caption_image, torch.arange(len(caption_image))] += boost
    return scores, caption_image


def timed(fn, *args, repeats: int = 1):
    """``fn(*args)`` and the median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def run_direction(name: str, scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                  loop_rows: int | None, old_rows: int | None, device: str, repeats: int) -> None:
    n_q, n_g = scores.shape
    print(f"\n{name}: {n_q:,} queries x {n_g:,} gallery items, "
          f"{int((gallery_ids == query_ids[0]).sum())} positive(s) for query 0")
    order = torch.argsort(gallery_ids, stable=True)
    bounds = torch.searchsorted(gallery_ids[order], torch.arange(int(gallery_ids.max()) + 2))
    positives = [order[bounds[q]:bounds[q + 1]].numpy() for q in query_ids.tolist()]

    (new_r, new_a), t_new = timed(per_query_ranks_and_ap, scores, query_ids, gallery_ids, repeats=repeats)

    m_loop = n_q if loop_rows is None else min(loop_rows, n_q)
    (loop_r, loop_a), t = timed(loop_ranks_and_ap, scores[:m_loop].numpy(), positives[:m_loop])
    t_loop = t * n_q / m_loop
    m_old = n_q if old_rows is None else min(old_rows, n_q)
    (old_r, old_a), t = timed(old_per_query_ranks_and_ap, scores[:m_old], query_ids[:m_old], gallery_ids)
    t_old = t * n_q / m_old

    # identical numbers: old and new on every row; the loop on its rows (argsort ties aside)
    assert torch.equal(old_r, new_r[:m_old]), "old and new ranks differ"
    assert torch.allclose(old_a.double(), new_a[:m_old].double(), rtol=1e-5, atol=1e-6), "old and new APs differ"
    pos_scores = [scores[i, positives[i]].max() for i in range(m_loop)]
    tied = np.array([bool(((scores[i] == pos_scores[i]).sum() > 1)) for i in range(m_loop)])
    keep = torch.as_tensor(~tied)
    assert torch.equal(torch.as_tensor(loop_r)[keep], new_r[:m_loop][keep]), "loop and new ranks differ"
    assert np.allclose(loop_a, new_a[:m_loop].double().numpy(), rtol=1e-5, atol=1e-6), "loop and new APs differ"
    if m_old == n_q:
        s_old, s_new = summarise(old_r, old_a), summarise(new_r, new_a)
        assert all(s_old[k] == s_new[k] for k in ("R@1", "R@5", "R@10", "R-mean")), (s_old, s_new)
        assert abs(s_old["mAP"] - s_new["mAP"]) < 1e-6, (s_old, s_new)
    s_new = summarise(new_r, new_a)
    print("  new: " + ", ".join(f"{k} {v:.4f}" for k, v in s_new.items()))
    print(f"  checked: ranks identical (loop: {m_loop - int(tied.sum()):,} rows, {int(tied.sum())} left out "
          f"for an argsort tie; old: {m_old:,} rows), APs allclose")

    def note(m: int) -> str:
        return "" if m == n_q else f"   <- measured on {m:,} rows, extrapolated linearly to {n_q:,}"
    print(f"  (a) loop (numpy argsort per row)  {t_loop:9.3f} s{note(m_loop)}")
    print(f"  (b) old qshift                    {t_old:9.3f} s{note(m_old)}")
    print(f"  (c) new qshift                    {t_new:9.3f} s   (median of {repeats})")
    print(f"  speed-up new vs loop: {t_loop / t_new:7.1f}x   new vs old: {t_old / t_new:7.1f}x   "
          f"old vs loop: {t_loop / t_old:5.2f}x")
    if device != "cpu":
        dev_scores = scores.to(device)

        def on_device() -> tuple[torch.Tensor, torch.Tensor]:
            out = per_query_ranks_and_ap(dev_scores, query_ids, gallery_ids)
            if dev_scores.is_cuda:
                torch.cuda.synchronize(dev_scores.device)
            return out
        on_device()  # warm-up
        (g_r, g_a), t_gpu = timed(on_device, repeats=repeats)
        assert torch.equal(g_r.cpu(), new_r) and torch.allclose(g_a.cpu(), new_a)
        print(f"  (c) new qshift on {device:<14s}  {t_gpu:9.3f} s   (median of {repeats}; same numbers as on CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boost", type=float, default=3.0, help="added to the positives' scores")
    ap.add_argument("--loop-rows", type=int, default=None, help="time the numpy loop on this many rows only")
    ap.add_argument("--old-rows", type=int, default=None, help="time the old qshift code on this many rows only")
    ap.add_argument("--device", default="cpu", help="also time the new code on this device (e.g. cuda)")
    ap.add_argument("--directions", default="i2t,t2i")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the numpy loop uses one core)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the new code (median reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
          f"seed {args.seed}")
    scores, caption_image = make_scores(args.n_images, args.per_image, args.seed, args.boost)
    image_ids = torch.arange(args.n_images)
    for d in args.directions.split(","):
        if d == "i2t":
            run_direction("i2t", scores, image_ids, caption_image, args.loop_rows, args.old_rows, args.device,
                          args.repeats)
        elif d == "t2i":
            run_direction("t2i", scores.T.contiguous(), caption_image, image_ids, args.loop_rows, args.old_rows,
                          args.device, args.repeats)
        else:
            raise SystemExit(f"unknown direction {d!r}; expected i2t or t2i")


if __name__ == "__main__":
    main()
