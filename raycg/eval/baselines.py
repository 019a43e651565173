"""Baselines that need no neural net, scored on the same split and queries as the model.

- `popularity_ranking`: one global top-K by training-window count of the task's events.
- `surface_popularity_rankings`: a top-K per surface (search / home feed / related item).
- `ALSBaseline`: implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) with the
  `implicit` package's ALS, fitted on one task's user x item interaction counts. It ranks by
  the user's factors only (ALS has no request context); users without training interactions
  of that kind fall back to that kind's global popularity.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from raycg.data.lookup import find_sorted
from raycg.eval.queries import TASKS
from raycg.eval.recall import exact_top_k


def _task_rows(train_events: pa.Table, event_types, corpus_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of events of these types whose item is in the corpus, corpus row of every event)."""
    items = train_events.column("item_id").to_numpy()
    row, known = find_sorted(corpus_ids, items)
    mask = np.asarray(pc.is_in(train_events.column("event_type"), value_set=pa.array(list(event_types)))) & known
    return mask, row


def _rank_by_counts(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int,
                    subset: np.ndarray | None = None) -> np.ndarray:
    task_mask, row = _task_rows(train_events, TASKS[task], corpus_ids)
    any_mask, _ = _task_rows(train_events, sum(TASKS.values(), ()), corpus_ids)
    if subset is not None:
        task_mask, any_mask = task_mask & subset, any_mask & subset
    task_count = np.bincount(row[task_mask], minlength=len(corpus_ids))
    any_count = np.bincount(row[any_mask], minlength=len(corpus_ids))
    order = np.lexsort((corpus_ids, -any_count, -task_count))
    return corpus_ids[order[:k]]


def popularity_ranking(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k corpus item ids by training-window count of the task's positive events.

    Ties (e.g. items with no conversions) break by all-positive count, then item id.
    """
    return _rank_by_counts(train_events, task, corpus_ids, k)


def surface_popularity_rankings(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int,
                                surfaces) -> dict[str, np.ndarray]:
    """{surface: top-k item ids} counting only that surface's training events (same tie
    breaks as `popularity_ranking`); a surface absent from training gets the global ranking."""
    train_surface = train_events.column("surface").to_numpy(zero_copy_only=False).astype(str)
    out = {}
    for s in np.unique(np.asarray(surfaces, dtype=str)):
        subset = train_surface == s
        out[str(s)] = (_rank_by_counts(train_events, task, corpus_ids, k, subset) if subset.any()
                       else popularity_ranking(train_events, task, corpus_ids, k))
    return out


class ALSBaseline:
    """ALS on the training window's user x item counts of one task's events.

    Confidence follows `implicit`: C_ui = 1 + alpha * count_ui. Example::

        als = ALSBaseline.fit(train_events, "conversion", corpus_ids, factors=64, seed=0)
        top_ids = als.top_k(query_user_ids, 100)          # [Q, 100] corpus item ids
    """

    def __init__(self, task: str, user_ids: np.ndarray, user_factors: np.ndarray, item_factors: np.ndarray,
                 corpus_ids: np.ndarray, fallback: np.ndarray, n_interactions: int):
        self.task, self.user_ids, self.user_factors = task, user_ids, user_factors
        self.item_factors, self.corpus_ids, self.fallback = item_factors, corpus_ids, fallback
        self.n_interactions = n_interactions

    @classmethod
    def fit(cls, train_events: pa.Table, task: str, corpus_ids: np.ndarray, factors: int = 64,
            iterations: int = 15, regularization: float = 0.05, alpha: float = 10.0, seed: int = 0,
            threads: int = 0, fallback_k: int = 1000) -> "ALSBaseline":
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        mask, row = _task_rows(train_events, TASKS[task], corpus_ids)
        users = train_events.column("user_id").to_numpy()[mask]
        user_ids, user_row = np.unique(users, return_inverse=True)
        matrix = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (user_row, row[mask])),
                               shape=(len(user_ids), len(corpus_ids)))
        matrix.sum_duplicates()  # repeated (user, item) events add up to the count
        fallback = popularity_ranking(train_events, task, corpus_ids, fallback_k)
        if matrix.nnz == 0:
            raise ValueError(f"ALS baseline: the training split has no {task} events ({TASKS[task]}) "
                             f"on corpus items")
        with threadpool_limits(1, "blas"):  # implicit parallelises itself; nested BLAS threads thrash
            model = AlternatingLeastSquares(factors=factors, iterations=iterations, regularization=regularization,
                                            alpha=alpha, random_state=seed, num_threads=threads)
            model.fit(matrix, show_progress=False)
        return cls(task, user_ids, np.asarray(model.user_factors), np.asarray(model.item_factors),
                   corpus_ids, fallback, int(matrix.nnz))

    def top_k(self, query_user_ids: np.ndarray, k: int, batch_size: int = 4096,
              threads: int | None = None, device: str = "cpu") -> tuple[np.ndarray, float]:
        """([Q, k] item ids, search seconds): exact inner-product search of the user factors."""
        query_user_ids = np.asarray(query_user_ids)
        k = min(k, len(self.corpus_ids))
        row, known = find_sorted(self.user_ids, query_user_ids)
        out = np.broadcast_to(self.fallback[:k], (len(query_user_ids), k)).copy()
        secs = 0.0
        if known.any():
            top_rows, secs = exact_top_k(self.item_factors, self.user_factors[row[known]], k, batch_size, threads,
                                         device)
            out[known] = self.corpus_ids[top_rows]
        return out, secs

    def coverage(self, query_user_ids: np.ndarray) -> float:
        """Fraction of queries whose user has factors (the rest get popularity)."""
        return float(np.isin(np.asarray(query_user_ids), self.user_ids).mean()) if len(query_user_ids) else 0.0
