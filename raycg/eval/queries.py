"""Evaluation queries from the held-out split.

A query is a request context (user_id, surface, context_item_id, query_id) at a time; its
positives are the distinct items of that task:

- conversion (add_to_cart/checkout): one query per attributed request, i.e. per
  (context, `query_time`) where query_time is the conversion's `request_ts` (its click) when
  the data carries attribution, else its own timestamp. Retrieval happens at the request,
  before the click that led to the conversion, so the query never sees that click.
- engagement (click/save): one query per context, at its first positive's time.

The query's `timestamp` is that time: time-dependent features (history) only see events
strictly before it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raycg.data.batches import query_time
from raycg.data.pipeline import event_files
from raycg.data.schema import CONVERSION_EVENTS, ENGAGEMENT_EVENTS, check_parquet_files

QUERY_KEYS = ["user_id", "surface", "context_item_id", "query_id"]
TASKS = {"conversion": CONVERSION_EVENTS, "engagement": ENGAGEMENT_EVENTS}


def read_event_columns(path: str, columns: list[str]) -> pa.Table:
    files = event_files(path)
    check_parquet_files(files)
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def build_queries(events: pa.Table, task: str) -> tuple[pa.Table, list[np.ndarray]]:
    """(query feature table: QUERY_KEYS + timestamp, positives per query); module docstring."""
    etype = events.column("event_type")
    pos = events.filter(pc.is_in(etype, value_set=pa.array(TASKS[task])))
    if pos.num_rows == 0:
        return pa.table({k: pa.array([], type=events.schema.field(k).type) for k in QUERY_KEYS + ["timestamp"]}), []
    pos = pos.append_column("query_ts", pa.array(query_time(pos), pa.int64()))
    by = QUERY_KEYS + (["query_ts"] if task == "conversion" else [])
    grouped = pos.group_by(by).aggregate([("item_id", "distinct"), ("query_ts", "min")])
    keys = grouped.select(QUERY_KEYS + ["query_ts_min"]).rename_columns(QUERY_KEYS + ["timestamp"])
    positives = [np.asarray(v, dtype=np.int64) for v in grouped.column("item_id_distinct").to_pylist()]
    return keys, positives
