"""What evaluation ranks with: the model and every baseline behind one small interface.

A retriever answers one task's queries with item ids, best first:

    class Retriever(Protocol):
        name: str                                           # its row in eval.json and the tables
        def retrieve(self, queries: Queries, k: int) -> np.ndarray: ...   # [len(queries), k] ids

`raycg.eval.evaluate` builds the model's retriever and the baselines named in
`eval.baselines` (`build_baselines`) and scores them all on the same queries in the same way
(`score_retrievers`). A retriever that falls back to something else for some queries may
also have `coverage(queries) -> float` (the share it answers itself), reported in eval.json
under `als_coverage`. One whose queries share a few lists may also have
`shared(queries, k) -> (lists [R, k], list_of_query [len(queries)])`: scoring then looks each
positive up in its list instead of comparing [Q, k] rows (popularity: one list; per surface: three).
One that ranks the corpus itself (the model) may also have `retrieve_rows(queries, k)`: the same
lists as corpus rows, which scoring compares with the positives' rows.

Adding a baseline: a class with `name` and `retrieve` (the ranking itself can live in
raycg.eval.baselines), and an entry in `BASELINES`: name -> factory(`TrainingWindow`) ->
retriever. Then `eval.baselines=[popularity,<name>]` scores it next to the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import torch

from raycg.data.lookup import find_sorted
from raycg.eval.baselines import ALSBaseline, EventCounts, surface_popularity_rankings
from raycg.eval.recall import exact_top_k
from raycg.eval.reengagement import EngagementTimeline
from raycg.model.recent_boost import merge_recent, recent_scores
from raycg.logs import get_logger


@dataclass
class Queries:
    """One task's evaluation queries, as every retriever sees them."""

    task: str  # conversion | engagement (raycg.eval.queries.TASKS)
    table: pa.Table  # QUERY_KEYS + timestamp, one row per query (raycg.eval.queries.build_queries)
    users: np.ndarray
    times: np.ndarray
    surfaces: np.ndarray  # str

    @classmethod
    def of(cls, task: str, table: pa.Table) -> "Queries":
        return cls(task, table, users=table.column("user_id").to_numpy(),
                   times=table.column("timestamp").to_numpy(),
                   surfaces=table.column("surface").to_numpy(zero_copy_only=False).astype(str))

    def __len__(self) -> int:
        return self.table.num_rows


class Retriever(Protocol):
    name: str

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        """[len(queries), k] item ids (of the corpus), best first."""
        ...


@dataclass
class TrainingWindow:
    """What baselines are fitted on: the training split's events (user_id, item_id,
    event_type, surface), the item corpus (sorted ids), the action timeline (training and
    evaluation events; lookups only see the past) and the `eval` settings."""

    events: pa.Table
    corpus_ids: np.ndarray
    timeline: EngagementTimeline
    eval_cfg: dict
    seed: int = 0
    device: str = "cpu"  # of exact top-K searches (raycg.eval.recall.exact_top_k)
    log: Callable[[str], None] = get_logger("eval").info

    @cached_property
    def counts(self) -> EventCounts:
        """Per-item event counts for the popularity rankings, built on first use and shared."""
        return EventCounts(self.events, self.corpus_ids)


class ModelRetriever:
    """The two-tower model: each query embedded by `embed(queries.table)` (Ray Data batch
    inference in evaluation), exact inner-product top-K over the item embeddings."""

    name = "model"

    def __init__(self, corpus_ids: np.ndarray, item_emb: np.ndarray, embed: Callable[[pa.Table], np.ndarray],
                 batch_size: int, threads: int | None = None, device: str = "cpu",
                 new_users: tuple[Callable[[Queries], np.ndarray], np.ndarray] | None = None,
                 recent: tuple[Callable[[Queries], np.ndarray], float] | None = None):
        self.corpus_ids, self.item_emb, self.embed = corpus_ids, item_emb, embed
        self.batch_size, self.threads, self.device = batch_size, threads, device
        self.new_users = new_users  # (queries -> bool mask, the ranking they get): index.new_users=popularity
        # (queries -> [Q, N] corpus rows of their recent items, boost b): the recent-item boost
        # (raycg.model.recent_boost), as the served Retriever applies it; None or b = 0: off
        self.recent = recent if recent is not None and recent[1] > 0 else None
        self.search_s = 0.0  # exact search time so far (the embedding excluded)
        self.embed_s = 0.0  # query embedding time so far
        self.boost_s = 0.0  # recent-item lookups and merges so far
        self.served_popularity = {}  # task -> queries answered by the new-user ranking

    def _items(self, device: torch.device) -> torch.Tensor:
        """The item embeddings as a tensor on `device`, copied there once."""
        if getattr(self, "_items_on", None) is None or self._items_on.device != device:
            self._items_on = torch.from_numpy(np.asarray(self.item_emb, np.float32)).to(device)
        return self._items_on

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        rows = self.retrieve_rows(queries, k)
        top = self.corpus_ids[rows]
        if self.new_users is not None:
            top[self._new] = self.new_users[1][:top.shape[1]]
        return top

    def retrieve_rows(self, queries: Queries, k: int) -> np.ndarray:
        """`retrieve` as corpus rows (indices into `corpus_ids`; -1: an item outside the corpus in
        the new-user ranking). Scoring compares rows: no [Q, k] id gather (113M ids: ~2 s)."""
        t0 = time.perf_counter()
        q_emb = self.embed(queries.table)
        self.embed_s += time.perf_counter() - t0
        if self.recent is None:
            rows, secs = exact_top_k(self.item_emb, q_emb, k, self.batch_size, self.threads, self.device)
        else:
            rows, scores, secs = exact_top_k(self.item_emb, q_emb, k, self.batch_size, self.threads, self.device,
                                             with_scores=True)
            t0 = time.perf_counter()
            dev = torch.device(self.device)  # where the search ran: the merge runs there too
            recent_rows = torch.from_numpy(self.recent[0](queries)).to(dev)
            rec_s = recent_scores(torch.from_numpy(np.asarray(q_emb, np.float32)).to(dev), self._items(dev),
                                  recent_rows)
            rows = merge_recent(torch.from_numpy(rows).to(dev), torch.from_numpy(scores).to(dev), recent_rows,
                                rec_s, self.recent[1])[0].cpu().numpy()
            self.boost_s += time.perf_counter() - t0
        self.search_s += secs
        if self.new_users is not None:  # as the served Retriever does (raycg.retrieve.retriever)
            is_new, ranking = self.new_users
            self._new = is_new(queries)
            at, found = find_sorted(self.corpus_ids, ranking[:rows.shape[1]])
            rows[self._new] = np.where(found, at, -1)
            self.served_popularity[queries.task] = int(self._new.sum())
        return rows


class Popularity:
    """One global ranking by training-window count of the task's events."""

    name = "popularity"

    def __init__(self, window: TrainingWindow):
        self.window = window

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        lists, which = self.shared(queries, k)
        return np.broadcast_to(lists[0], (len(queries), lists.shape[1]))

    def shared(self, queries: Queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.window.counts.ranking(queries.task, k)[None, :], np.zeros(len(queries), np.int64)


class SurfacePopularity:
    """A popularity ranking per surface (search / home feed / related item)."""

    name = "popularity_surface"

    def __init__(self, window: TrainingWindow):
        self.window = window

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        lists, which = self.shared(queries, k)
        return lists[which]

    def shared(self, queries: Queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        per_surface = surface_popularity_rankings(self.window.events, queries.task, self.window.corpus_ids, k,
                                                  queries.surfaces, counts=self.window.counts)
        names = sorted(per_surface)
        return np.stack([per_surface[n] for n in names]), np.searchsorted(names, queries.surfaces)


class RecentEngaged:
    """Re-engagement: the user's distinct items among the last k actions before the query
    time (raycg.eval.reengagement), then the task's popularity ranking."""

    name = "recent_engaged"

    def __init__(self, window: TrainingWindow):
        self.window = window

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        w = self.window
        return w.timeline.recent_engaged(queries.users, queries.times, k,
                                         w.counts.ranking(queries.task, k))


class ALSRetriever:
    """Implicit ALS (raycg.eval.baselines.ALSBaseline) fitted on one kind of training events
    (`als_conversion`, `als_engagement`); users without such events get its popularity."""

    def __init__(self, window: TrainingWindow, kind: str):
        self.name = f"als_{kind}"
        t0 = time.perf_counter()
        self.als = ALSBaseline.fit(window.events, kind, window.corpus_ids, seed=window.seed,
                                   **window.eval_cfg["als"])
        window.log(f"eval: {self.name}: ALS on {self.als.n_interactions:,} training user-item pairs, "
                   f"{len(self.als.user_ids):,} users ({time.perf_counter() - t0:.1f}s)")
        self.batch_size, self.threads = window.eval_cfg["query_batch_size"], window.eval_cfg["faiss_threads"]
        self.device = window.device

    def retrieve(self, queries: Queries, k: int) -> np.ndarray:
        top, _ = self.als.top_k(queries.users, k, self.batch_size, self.threads, self.device)
        return top

    def coverage(self, queries: Queries) -> float:
        return self.als.coverage(queries.users)


# eval.baselines name -> factory; the order is the order of the error message's choices
BASELINES: dict[str, Callable[[TrainingWindow], Retriever]] = {
    "popularity": Popularity,
    "popularity_surface": SurfacePopularity,
    "recent_engaged": RecentEngaged,
    "als_engagement": lambda window: ALSRetriever(window, "engagement"),
    "als_conversion": lambda window: ALSRetriever(window, "conversion"),
}


def build_baselines(names: list[str], window: TrainingWindow) -> list[Retriever]:
    """The retrievers of `eval.baselines`, fitted on `window`, in the order named."""
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"eval.baselines: unknown {unknown}; choose from {list(BASELINES)}")
    return [BASELINES[name](window) for name in names]
