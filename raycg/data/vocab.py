"""Id vocabularies: which raw ids get an embedding row of their own.

For each id feature, the ids seen at least `min_count` times in the training window (events
of every kind, counted by Ray Data with the user/item statistics), the `max_size` most
frequent ones when capped, as a sorted int64 array. Ids outside it share a few hashed OOV
rows (raycg.model.towers.VocabEmbedding), so a table has exactly 1 + oov_buckets + len(vocab)
rows whatever the ids look like (sparse 64-bit ids included).

    counts = {"item": (np.array([7, 9, 2**40]), np.array([5, 1, 3]))}
    build_vocabularies(counts, min_count=2)   # {"item": array([7, 2**40])}

Item attributes (advertiser, category, extra item columns) count the training events of
their items; user attributes (e.g. age_range) the events of their users.
"""
from __future__ import annotations

import numpy as np

from raycg.data.lookup import find_sorted


def select(ids: np.ndarray, counts: np.ndarray, min_count: int = 1, max_size: int | None = None) -> np.ndarray:
    """Sorted ids with count >= min_count (ids < 0 mean "missing" and never enter), the
    `max_size` most frequent (ties: the smaller id) when given."""
    ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int64)
    keep = (counts >= max(min_count, 1)) & (ids >= 0)
    ids, counts = ids[keep], counts[keep]
    if max_size is not None and len(ids) > max_size:
        order = np.lexsort((ids, -counts))[:max_size]
        ids = ids[order]
    return np.sort(ids)


def counts_by_attribute(keys: np.ndarray, key_counts: np.ndarray, table_keys: np.ndarray,
                        table_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event counts of an attribute: each key's count goes to its value in the (sorted) table
    (e.g. items -> their advertiser). Keys missing from the table are ignored."""
    if not len(keys) or not len(table_keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos, hit = find_sorted(table_keys, keys)
    values, inv = np.unique(table_values[pos[hit]], return_inverse=True)
    return values, np.bincount(inv.reshape(-1), weights=key_counts[hit]).astype(np.int64)


def build_vocabularies(counts: dict[str, tuple[np.ndarray, np.ndarray]], min_count: int = 1,
                       max_size: int | None = None) -> dict[str, np.ndarray]:
    """{feature: (ids, counts)} -> {feature: sorted vocabulary ids}."""
    return {name: select(ids, c, min_count, max_size) for name, (ids, c) in counts.items()}


def store_counts(store, context_counts=None, query_counts=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The id counts of a FeatureStore's training window, per feature name of the towers:
    user, item, context_item, query, advertiser, category and the extra categorical columns."""
    items, users = store.items, store.users
    out = {"user": store.user_counts, "item": store.item_counts}
    item_ids, item_n = store.item_counts
    for j, name in enumerate(items.cat_names):
        if j > 0:  # 0 is the item id itself
            out[name] = counts_by_attribute(item_ids, item_n, items.item_id, items.cat[:, j])
    user_ids, user_n = store.user_counts
    for j, name in enumerate(users.cat_names):
        out[name] = counts_by_attribute(user_ids, user_n, users.user_id, users.cat[:, j])
    if context_counts is not None:
        out["context_item"] = context_counts
    if query_counts is not None:
        out["query"] = query_counts
    return out
