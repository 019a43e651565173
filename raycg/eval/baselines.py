"""Baselines that need no neural net."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycg.eval.queries import TASKS


def popularity_ranking(train_events: pa.Table, task: str, corpus_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k corpus item ids by training-window count of the task's positive events.

    Ties (e.g. items with no conversions) break by all-positive count, then item id.
    """
    etype = train_events.column("event_type")
    items = train_events.column("item_id").to_numpy()
    row = np.searchsorted(corpus_ids, items).clip(0, len(corpus_ids) - 1)
    known = corpus_ids[row] == items
    task_mask = np.asarray(pc.is_in(etype, value_set=pa.array(TASKS[task]))) & known
    any_mask = np.asarray(pc.is_in(etype, value_set=pa.array(sum(TASKS.values(), ())))) & known
    task_count = np.bincount(row[task_mask], minlength=len(corpus_ids))
    any_count = np.bincount(row[any_mask], minlength=len(corpus_ids))
    order = np.lexsort((corpus_ids, -any_count, -task_count))
    return corpus_ids[order[:k]]
