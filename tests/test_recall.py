"""recall@K, exact faiss search and the popularity baseline."""
import numpy as np
import pyarrow as pa
import pytest

from raycg.eval.baselines import popularity_ranking
from raycg.eval.recall import exact_top_k, recall_at_k, torch_top_k


def test_recall_golden_values():
    top = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    positives = [np.array([3, 9]), np.array([5])]
    # query 0: k=2 -> 0/2, k=4 -> 1/2; query 1: 1/1 at both
    assert recall_at_k(top, positives, [2, 4]) == {2: pytest.approx(0.5), 4: pytest.approx(0.75)}


def test_exact_top_k_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    top, secs = exact_top_k(items, queries, k=10, batch_size=8)
    ref = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    assert (top == ref).mean() > 0.99  # allow float ties at the boundary
    assert secs >= 0.0
    top_all, _ = exact_top_k(items, queries, k=5000)
    assert top_all.shape == (37, 500)  # k is capped at the corpus size


@pytest.mark.parametrize("block_elements", [1 << 28, 3 * 700])   # one block; many query x item blocks
def test_torch_top_k_returns_the_faiss_neighbours(block_elements):
    # the GPU evaluation path (torch matmul + topk, blockwise merge) run on the CPU against faiss
    rng = np.random.default_rng(3)
    items = rng.standard_normal((2_000, 16)).astype(np.float32)
    queries = rng.standard_normal((301, 16)).astype(np.float32)
    want, _ = exact_top_k(items, queries, 50, batch_size=64)             # faiss IndexFlatIP
    got = torch_top_k(items, queries, 50, device="cpu", block_elements=block_elements)
    np.testing.assert_array_equal(got, want)
    # with scores (the recent-item boost merges by them): the inner products of those neighbours
    rows, scores = torch_top_k(items, queries, 50, device="cpu", block_elements=block_elements, with_scores=True)
    faiss_rows, faiss_scores, _ = exact_top_k(items, queries, 50, batch_size=64, with_scores=True)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_array_equal(faiss_rows, want)
    direct = np.take_along_axis(queries @ items.T, want, axis=1)
    np.testing.assert_allclose(scores.numpy(), direct, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(faiss_scores, direct, rtol=1e-4, atol=1e-4)
    # k larger than the corpus is clipped, as in faiss
    assert torch_top_k(items[:7], queries[:3], 50, device="cpu").shape == (3, 7)


def test_popularity_ranking_counts_task_events():
    events = pa.table({
        "item_id": pa.array([1, 1, 2, 2, 2, 3, 3, 3, 3], pa.int64()),
        "event_type": ["checkout", "add_to_cart", "checkout", "click", "click",
                       "click", "click", "click", "impression"],
    })
    corpus = np.array([1, 2, 3, 4], dtype=np.int64)
    # conversions: item 1 -> 2, item 2 -> 1; item 3 none but most engaged, item 4 nothing
    assert popularity_ranking(events, "conversion", corpus, 4).tolist() == [1, 2, 3, 4]
    assert popularity_ranking(events, "engagement", corpus, 2).tolist() == [3, 2]


def test_bootstrap_interval_and_groups():
    from raycg.eval.recall import bootstrap_ci, recall_report

    lo, hi = bootstrap_ci(np.r_[np.zeros(500), np.ones(500)], n_boot=500)
    assert lo < 0.5 < hi and hi - lo < 0.1  # ~ +-1.96 * sqrt(0.25/1000) = 0.031
    assert bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    top = np.array([[1, 2], [3, 4], [5, 6]])
    report = recall_report(top, [np.array([1]), np.array([9]), np.array([6])], [2], groups=np.array(["a", "b", "a"]))
    assert report[2]["mean"] == pytest.approx(2 / 3)
    assert report[2]["by_group"] == {"a": 1.0, "b": 0.0}


def test_positive_ranks_golden():
    from raycg.eval.recall import positive_ranks

    ranks = positive_ranks(np.array([[7, 3, 5], [1, 2, 4]]), [np.array([5, 9, 7]), np.array([4])])
    assert ranks[0].tolist() == [2, 3, 0] and ranks[1].tolist() == [2]  # 3 = absent (K)
    with pytest.raises(ValueError, match="no positives"):
        recall_at_k(np.array([[1, 2]]), [np.array([], dtype=np.int64)], [1])


def test_surface_popularity_counts_only_that_surface():
    from raycg.eval.baselines import surface_popularity_rankings

    events = pa.table({
        "item_id": pa.array([1, 1, 1, 2, 2, 3], pa.int64()),
        "event_type": ["click"] * 6,
        "surface": ["search", "search", "search", "home_feed", "home_feed", "home_feed"],
    })
    corpus = np.array([1, 2, 3], dtype=np.int64)
    ranks = surface_popularity_rankings(events, "engagement", corpus, 2, ["search", "home_feed", "related_item"])
    assert ranks["home_feed"].tolist() == [2, 3]           # item 1 is globally top, but not here
    assert ranks["search"].tolist() == [1, 2]              # tie between 2 and 3 breaks by all-surface count
    assert ranks["related_item"].tolist() == [1, 2]        # unseen surface -> global popularity


def _block_interactions(n_users=60, n_items=40, seed=0):
    """Users 0..29 only touch items 0..19, users 30..59 only items 20..39 (two taste blocks)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        block = 0 if u < n_users // 2 else n_items // 2
        for i in rng.choice(n_items // 2, size=6, replace=False):
            users.append(u)
            items.append(block + i)
    users.append(0)
    items.append(39)  # one off-block checkout makes item 39 the most converted item
    etype = ["click"] * (len(users) - 1) + ["checkout"]
    users += [1, 2]
    items += [39, 39]
    etype += ["checkout", "checkout"]
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
                     "event_type": etype})


def test_als_recovers_taste_blocks_and_falls_back_to_popularity():
    from raycg.eval.baselines import ALSBaseline

    events = _block_interactions()
    corpus = np.arange(40, dtype=np.int64)
    als = ALSBaseline.fit(events, "engagement", corpus, factors=4, iterations=20, regularization=0.01,
                          alpha=10.0, seed=0, threads=1)
    assert als.n_interactions == 60 * 6  # the checkouts are not engagement
    top, _ = als.top_k(np.array([5, 45]), 10)
    assert (top[0] < 20).mean() >= 0.9 and (top[1] >= 20).mean() >= 0.9  # each user's own block
    # conversion ALS knows only users 0, 1, 2; anyone else gets conversion popularity (item 39 first)
    conv = ALSBaseline.fit(events, "conversion", corpus, factors=2, iterations=5, seed=0, threads=1)
    top, _ = conv.top_k(np.array([1, 50]), 5)
    assert top[1].tolist() == popularity_ranking(events, "conversion", corpus, 5).tolist()
    assert top[1][0] == 39 and top[0][0] == 39
    assert conv.coverage(np.array([1, 50, 51, 2])) == 0.5
    with pytest.raises(ValueError, match="no conversion events"):
        ALSBaseline.fit(events.filter(pa.compute.equal(events["event_type"], "click")), "conversion", corpus)


def test_vectorised_ranks_and_one_bootstrap_draw_agree_with_the_per_query_definitions():
    from raycg.eval.recall import bootstrap_ci, bootstrap_cis, flat_positive_ranks, recall_report

    rng = np.random.default_rng(5)
    top = rng.integers(0, 60, size=(300, 20))  # repeats inside a row: the first rank counts
    positives = [rng.integers(0, 80, size=rng.integers(1, 5)) for _ in range(300)]
    ranks, lengths = flat_positive_ranks(top, positives)
    want = []
    for row, pos in zip(top, positives):  # the definition, one query at a time
        for p in pos:
            hit = np.flatnonzero(row == p)
            want.append(hit[0] if len(hit) else 20)
    assert ranks.tolist() == want and lengths.tolist() == [len(p) for p in positives]
    # one list for every query (a broadcast view, as the popularity baselines return) takes a lookup
    shared = np.broadcast_to(top[0], top.shape)
    ranks, _ = flat_positive_ranks(shared, positives)
    assert ranks.tolist() == [(np.flatnonzero(top[0] == p)[:1].tolist() or [20])[0] for pos in positives for p in pos]
    # a few lists shared by the queries (one per surface): each positive looked up in its query's list
    from raycg.eval.recall import shared_positive_ranks

    which = rng.integers(0, 3, size=len(positives))
    ranks, lengths = shared_positive_ranks(top[:3], which, positives)
    assert ranks.tolist() == flat_positive_ranks(top[:3][which], positives)[0].tolist()
    assert lengths.tolist() == [len(p) for p in positives]
    report = recall_report(top, positives, [5, 20], n_boot=200)
    per_query = {k: np.array([np.isin(p, row[:k]).mean() for row, p in zip(top, positives)]) for k in (5, 20)}
    for k in (5, 20):
        assert report[k]["mean"] == pytest.approx(per_query[k].mean())
        lo, hi = report[k]["ci95"]
        assert lo < per_query[k].mean() < hi


def _resampling_bootstrap(values: np.ndarray, n_boot: int, seed: int) -> list[tuple[float, float]]:
    """The textbook bootstrap, written out: draw Q query indices with replacement, take each row's mean."""
    rng = np.random.default_rng(seed)
    means = np.stack([values[:, rng.integers(0, values.shape[1], values.shape[1])].mean(axis=1)
                      for _ in range(n_boot)], axis=1)
    return [tuple(np.quantile(m, [0.025, 0.975])) for m in means]


@pytest.mark.parametrize("continuous", [False, True])
def test_bootstrap_intervals_match_resampling_queries(continuous):
    """Few distinct recall values (class counts drawn as one multinomial per replicate) and many
    (index draws): both give the textbook bootstrap's interval, up to Monte Carlo error."""
    from raycg.eval.recall import bootstrap_cis

    rng = np.random.default_rng(11)
    if continuous:
        v5 = rng.random(600)
    else:  # recall of 1-2 positives: 0, 1/2 or 1
        v5 = rng.choice([0.0, 0.5, 1.0], size=2000, p=[0.6, 0.15, 0.25])
    v20 = np.maximum(v5, rng.choice([0.0, 0.5, 1.0], size=len(v5)))
    values = np.stack([v5, v20])
    got = bootstrap_cis(values, n_boot=4000, seed=1)
    want = _resampling_bootstrap(values, n_boot=4000, seed=2)
    for (lo, hi), (wlo, whi), v in zip(got, want, values):
        half = 1.96 * v.std() / np.sqrt(len(v))  # the normal approximation's half-width
        assert lo == pytest.approx(wlo, abs=0.12 * half) and hi == pytest.approx(whi, abs=0.12 * half)
        assert lo == pytest.approx(v.mean() - half, abs=0.15 * half)
    # one draw for every row: a row shifted by a constant gets the same interval, shifted
    shifted = bootstrap_cis(np.stack([v5, v5 + 0.25]), n_boot=300)
    assert shifted[1] == pytest.approx((shifted[0][0] + 0.25, shifted[0][1] + 0.25), abs=1e-12)


def test_distinct_columns_are_np_unique_of_the_queries():
    from raycg.eval.recall import _distinct_columns

    rng = np.random.default_rng(2)
    values = rng.integers(0, 4, size=(3, 5000)) / 4  # recall at 3 Ks of 5,000 queries
    classes, inverse = _distinct_columns(values)
    want, want_inverse = np.unique(values.T, axis=0, return_inverse=True)
    assert classes.tolist() == want.tolist() and inverse.tolist() == want_inverse.ravel().tolist()
    assert (classes[inverse].T == values).all()
