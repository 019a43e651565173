"""recall@K, exact faiss search and the popularity baseline."""
import numpy as np
import pyarrow as pa
import pytest

from raycg.eval.baselines import popularity_ranking
from raycg.eval.recall import exact_top_k, recall_at_k


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
