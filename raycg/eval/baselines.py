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


class EventCounts:
    """The training window's positive events reduced once to what popularity rankings need:
    each event's corpus row, task (index into TASKS) and surface code. Rankings are then a
    bincount and a sort over the corpus, not a pass over the events' columns.

        counts = EventCounts(train_events, corpus_ids)
        counts.ranking("conversion", 100)                  # global top-100 item ids
        counts.ranking("conversion", 100, surface="search")
    """

    def __init__(self, train_events: pa.Table, corpus_ids: np.ndarray):
        self.corpus_ids = corpus_ids
        etype = pc.dictionary_encode(train_events.column("event_type")).combine_chunks()
        names = etype.dictionary.to_pylist()
        task_of_type = np.array([next((t for t, (_, types) in enumerate(TASKS.items()) if n in types), -1)
                                 for n in names] + [-1], dtype=np.int64)  # -1: not a positive event (or null)
        task = task_of_type[etype.indices.fill_null(len(names)).to_numpy()]
        positive = np.flatnonzero(task >= 0)  # impressions are most of a log: look up only the rest
        row, known = find_sorted(corpus_ids, train_events.column("item_id").to_numpy()[positive])
        keep = positive[known]
        row = row[known]
        if "surface" in train_events.column_names:  # of the kept events only
            surface = pc.dictionary_encode(train_events.column("surface").take(pa.array(keep))).combine_chunks()
            self.surfaces = [str(x) for x in surface.dictionary.to_pylist()]
            codes = surface.indices.fill_null(len(self.surfaces)).to_numpy()
        else:  # global rankings only
            self.surfaces, codes = [], np.zeros(len(keep), np.int64)
        self.row, self.task, self.surface = row, task[keep], codes
        self._cache: dict = {}

    def ranking(self, task: str, k: int, surface: str | None = None) -> np.ndarray:
        """Top-k corpus item ids by count of the task's events (on `surface` only, if given; a
        surface with no training event gets the global ranking). Ties break by all-positive
        count, then item id."""
        if surface is not None and surface not in self.surfaces:
            surface = None
        key = (task, surface)
        if key not in self._cache or len(self._cache[key]) < min(k, len(self.corpus_ids)):
            on = np.ones(len(self.row), bool) if surface is None else self.surface == self.surfaces.index(surface)
            n = len(self.corpus_ids)
            task_count = np.bincount(self.row[on & (self.task == list(TASKS).index(task))], minlength=n)
            any_count = np.bincount(self.row[on], minlength=n)
            self._cache[key] = self.corpus_ids[np.lexsort((self.corpus_ids, -any_count, -task_count))[:k]]
        return self._cache[key][:k]


def popularity_ranking(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k corpus item ids by training-window count of the task's positive events.

    Ties (e.g. items with no conversions) break by all-positive count, then item id.
    """
    return EventCounts(train_events, corpus_ids).ranking(task, k)


def surface_popularity_rankings(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int,
                                surfaces, counts: EventCounts | None = None) -> dict[str, np.ndarray]:
    """{surface: top-k item ids} counting only that surface's training events (same tie
    breaks as `popularity_ranking`); a surface absent from training gets the global ranking.
    `counts`: an EventCounts of these events, to reuse."""
    counts = counts or EventCounts(train_events, corpus_ids)
    return {str(s): counts.ranking(task, k, str(s)) for s in np.unique(np.asarray(surfaces, dtype=str))}


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
