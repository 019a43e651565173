"""Evaluation queries from the held-out split.

A query is a request context (user_id, surface, context_item_id, query_id); its positives
are the distinct items of that task it had in the eval window:
conversion = add_to_cart/checkout, engagement = click/save. The query's `timestamp` is its
first positive event's: time-dependent features (history) only see events before it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raycg.data.pipeline import event_files
from raycg.data.schema import CONVERSION_EVENTS, ENGAGEMENT_EVENTS, check_parquet_files

QUERY_KEYS = ["user_id", "surface", "context_item_id", "query_id"]
TASKS = {"conversion": CONVERSION_EVENTS, "engagement": ENGAGEMENT_EVENTS}


def read_event_columns(path: str, columns: list[str]) -> pa.Table:
    files = event_files(path)
    check_parquet_files(files)
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def build_queries(events: pa.Table, task: str) -> tuple[pa.Table, list[np.ndarray]]:
    """(query feature table with QUERY_KEYS columns, positives per query)."""
    etype = events.column("event_type")
    pos = events.filter(pc.is_in(etype, value_set=pa.array(TASKS[task])))
    if pos.num_rows == 0:
        return pa.table({k: pa.array([], type=events.schema.field(k).type) for k in QUERY_KEYS + ["timestamp"]}), []
    grouped = pos.group_by(QUERY_KEYS).aggregate([("item_id", "distinct"), ("timestamp", "min")])
    keys = grouped.select(QUERY_KEYS + ["timestamp_min"]).rename_columns(QUERY_KEYS + ["timestamp"])
    positives = [np.asarray(v, dtype=np.int64) for v in grouped.column("item_id_distinct").to_pylist()]
    return keys, positives
