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


def read_event_columns(path: str, columns: list[str], dictionary: tuple[str, ...] = ()) -> pa.Table:
    """`columns` of a split's events; the string columns named in `dictionary` are read as
    dictionary arrays (codes: no string per row; 12.6M events: 0.8 -> 0.4 s)."""
    files = event_files(path)
    check_parquet_files(files)
    fmt = pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=list(dictionary)))
    return pads.dataset(files, format=fmt).to_table(columns=columns)


def build_queries(events: pa.Table, task: str) -> tuple[pa.Table, list[np.ndarray]]:
    """(query feature table: QUERY_KEYS + timestamp, positives per query); module docstring."""
    etype = events.column("event_type")
    pos = events.filter(pc.is_in(etype, value_set=pa.array(TASKS[task])))
    if pos.num_rows == 0:
        return pa.table({k: pa.array([], type=events.schema.field(k).type) for k in QUERY_KEYS + ["timestamp"]}), []
    pos = pos.append_column("query_ts", pa.array(query_time(pos), pa.int64()))
    by = QUERY_KEYS + (["query_ts"] if task == "conversion" else [])
    grouped = pos.group_by(by).aggregate([("item_id", "distinct"), ("query_ts", "min")])
    # one order: pyarrow's threaded group_by returns the groups in a different order from call to
    # call, and the order moved the mean recall's last bit and the bootstrap intervals
    grouped = grouped.sort_by([(k, "ascending") for k in by])
    keys = grouped.select(QUERY_KEYS + ["query_ts_min"]).rename_columns(QUERY_KEYS + ["timestamp"])
    # sorted: "distinct" lists a group's items in the order its threads met them
    lists = grouped.column("item_id_distinct").combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]  # a sliced array's offsets start past 0; flatten() starts at its first list
    items = lists.flatten().to_numpy().astype(np.int64)
    group = np.repeat(np.arange(len(lists)), np.diff(offsets))
    items = items[np.lexsort((items, group))]
    return keys, np.split(items, offsets[1:-1])


def sample_queries(queries: pa.Table, positives: list[np.ndarray], max_queries: int | None, seed: int = 0,
                   ) -> tuple[pa.Table, list[np.ndarray]]:
    """At most `max_queries` of the queries, drawn uniformly without replacement with `seed`
    (kept in their order); all of them when `max_queries` is None or not smaller."""
    if max_queries is None or len(positives) <= max_queries:
        return queries, positives
    if max_queries < 1:
        raise ValueError(f"max_queries={max_queries}: expected a positive number of queries or null (all)")
    rows = np.sort(np.random.default_rng(seed).choice(len(positives), max_queries, replace=False))
    return queries.take(pa.array(rows)), [positives[r] for r in rows]


def drop_cold_positives(queries: pa.Table, positives: list[np.ndarray], known_items: np.ndarray,
                        ) -> tuple[pa.Table, list[np.ndarray], dict]:
    """Keep only positives on `known_items` (items with events before the query window) and the
    queries that still have one; returns (queries, positives, {"positives": dropped,
    "queries": dropped}).

    For an item table derived from the log itself (raycg.convert), an item with no earlier
    event is in the corpus *because* it is engaged later: "rank never-seen items first" would
    score there and nowhere else (a real catalogue holds many items nobody engages)."""
    kept = [p[np.isin(p, known_items)] for p in positives]
    mask = np.array([len(p) > 0 for p in kept], dtype=bool)
    dropped = {"positives": int(sum(len(p) for p in positives) - sum(len(p) for p in kept)),
               "queries": int((~mask).sum())}
    return queries.filter(pa.array(mask)), [p for p, m in zip(kept, mask) if m], dropped


def corpus_from_log(items_path: str) -> bool:
    """True when the item table was derived from the log itself (written by raycg.convert,
    which records "corpus": "log" in the data directory's meta.json)."""
    import json
    import os

    meta = os.path.join(os.path.dirname(os.path.abspath(items_path)), "meta.json")
    if not os.path.isfile(meta):
        return False
    with open(meta) as f:
        return json.load(f).get("corpus") == "log"


def drop_cold(policy: str, items_path: str) -> bool:
    """eval.cold_items: drop | keep | auto (drop for an item table derived from the log)."""
    if policy not in ("auto", "drop", "keep"):
        raise ValueError(f"eval.cold_items={policy!r}: expected auto, drop or keep")
    return policy == "drop" or (policy == "auto" and corpus_from_log(items_path))

