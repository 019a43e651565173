"""Re-engagement: what a user had already engaged with before a query.

Retrieval that shows users what they just clicked looks good on recall and adds little. Two
tools keep evaluation honest about it, both on the action timeline of the training and
evaluation splits (click, save, add_to_cart, checkout; raycg.data.history.HistoryIndex):

- `repeat_masks`: for each query (user u, time t) and positive item i, is i *repeat* (u acted
  on i strictly before t) or *novel*? Recall is reported for both parts separately.
- `recent_engaged`: a baseline that retrieves u's distinct items among the last N actions
  before t, most recent first, then the task's popularity ranking (items not already in).

Example: u clicked items 7 (t=10) and 9 (t=20); a query of u at t=15 with positives {7, 9}:
7 is repeat, 9 is novel; recent_engaged at t=25 starts [9, 7, <popular items>...].
"""
from __future__ import annotations

import numpy as np

from raycg.data.history import HistoryIndex
from raycg.data.lookup import find_sorted

NEVER = np.iinfo(np.int64).max


class EngagementTimeline:
    """First action time of every (user, item) pair, and the most recent actions per user."""

    def __init__(self, history: HistoryIndex):
        self.history = history
        counts = np.diff(history.offsets)
        user_rank = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.items = np.unique(history.item_ids)
        key = user_rank * max(len(self.items), 1) + find_sorted(self.items, history.item_ids)[0]
        # the history is sorted by (user, time): a stable sort by (user, item) keeps each pair's
        # actions in time order (the lexsort by (key, time) it replaces took 10x longer)
        order = np.argsort(key, kind="stable")
        key, ts = key[order], history.timestamps[order]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        self.pair_key, self.pair_first_ts = key[first], ts[first]

    def first_time(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Earliest action time of each (user, item) pair; NEVER where there is none."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        out = np.full(len(users), NEVER, dtype=np.int64)
        if len(self.pair_key) == 0 or len(users) == 0:
            return out
        u, user_known = find_sorted(self.history.users, users)
        i, item_known = find_sorted(self.items, items)
        key = u * len(self.items) + i
        j, pair_known = find_sorted(self.pair_key, key)
        ok = user_known & item_known & pair_known
        out[ok] = self.pair_first_ts[j[ok]]
        return out

    def repeat_masks(self, users: np.ndarray, times: np.ndarray, positives: list[np.ndarray]) -> list[np.ndarray]:
        """Per query, a bool per positive: True if the user acted on it strictly before the query time."""
        lengths = np.array([len(p) for p in positives], dtype=np.int64)
        if lengths.sum() == 0:
            return [np.zeros(0, bool) for _ in positives]
        rep = self.repeat_flags(users, times, lengths, np.concatenate(positives))
        return np.split(rep, np.cumsum(lengths)[:-1])

    def repeat_flags(self, users: np.ndarray, times: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """`repeat_masks` on flat arrays: `flat` holds every query's positives, `lengths[q]` of them for query q."""
        return self.first_time(np.repeat(users, lengths), np.asarray(flat, np.int64)) < np.repeat(times, lengths)

    def recent_engaged(self, users: np.ndarray, times: np.ndarray, k: int, fallback: np.ndarray,
                       chunk: int = 4096) -> np.ndarray:
        """[Q, k] item ids: the user's distinct items among the last k actions before the query
        time (most recent first), then `fallback` (a popularity ranking) without repeats."""
        k = min(k, len(fallback))
        out = np.empty((len(users), k), dtype=np.int64)
        for s in range(0, len(users), chunk):
            items, actions = self.history.lookup(np.asarray(users[s:s + chunk], np.int64),
                                                 np.asarray(times[s:s + chunk], np.int64), k)
            for r, (row, act) in enumerate(zip(items, actions)):
                seen = row[act != 0][::-1]  # most recent first
                _, first = np.unique(seen, return_index=True)
                recent = seen[np.sort(first)][:k]
                head = fallback[:k + len(recent)]
                rest = head[~np.isin(head, recent)][:k - len(recent)]
                out[s + r, :len(recent)] = recent
                out[s + r, len(recent):] = rest
        return out
