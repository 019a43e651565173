"""A retrieval request: a user's raw context, as in the event schema (raycg.data.schema).

    column               type                 meaning
    user_id              int64 >= 0           required
    surface              string               required; one of SURFACES (home, related, search)
    context_item_id      int64 >= -1          subject item on `related`; -1 / null / absent = none
    query_id             int64 >= -1          query on `search`; -1 / null / absent = none
    recent_item_ids      list<int64 >= 0>     the user's recent actions, most recent last
    recent_event_types   list<string>         their event types: click, save, add_to_cart, checkout

One request is a dict of these (`request_table([...])`), a batch a Parquet file or an Arrow
table with these columns. Malformed values (a string or float id, a negative user id, an
unknown surface or event type, recent lists of different lengths) raise `RequestError` naming
the column, the number of bad rows and an example: never a silently different answer.
Unknown but well-formed ids are fine: a new user or item is what the OOV rows are for.
"""
from __future__ import annotations

import numbers

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycg.data.history import ACTION_CODES
from raycg.data.schema import SURFACES, Column, EventSchemaError, check_schema, check_values

REQUIRED = (Column("user_id", "integer", pa.int64(), min_value=0),
            Column("surface", "string", pa.string(), allowed=SURFACES))
OPTIONAL = (Column("context_item_id", "integer", pa.int64(), min_value=-1),
            Column("query_id", "integer", pa.int64(), min_value=-1))
RECENT = ("recent_item_ids", "recent_event_types")
FIELDS = tuple(c.name for c in REQUIRED + OPTIONAL) + RECENT


class RequestError(ValueError):
    """A malformed retrieval request; names the column, count of bad rows and an example."""


def _id(value, name: str, optional: bool):
    if value is None and optional:
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(f"request: {name}={value!r} is not an integer id")
    return int(value)


def request_table(requests: list[dict]) -> pa.Table:
    """Python requests (dicts with FIELDS) -> an Arrow table; ids must be Python/numpy integers."""
    rows = []
    for r in requests:
        unknown = set(r) - set(FIELDS)
        if unknown:
            raise RequestError(f"request: unknown field(s) {sorted(unknown)}; fields: {list(FIELDS)}")
        if "user_id" not in r or "surface" not in r:
            raise RequestError(f"request: user_id and surface are required, got {sorted(r)}")
        if not isinstance(r["surface"], str):
            raise RequestError(f"request: surface={r['surface']!r} is not a string; one of {list(SURFACES)}")
        items = [_id(v, "recent_item_ids", False) for v in r.get("recent_item_ids") or ()]
        types = list(r.get("recent_event_types") or ())
        if any(not isinstance(t, str) for t in types):
            raise RequestError(f"request: recent_event_types={types!r} must be strings of {list(ACTION_CODES)}")
        rows.append({"user_id": _id(r["user_id"], "user_id", False), "surface": r["surface"],
                     "context_item_id": _id(r.get("context_item_id"), "context_item_id", True),
                     "query_id": _id(r.get("query_id"), "query_id", True),
                     "recent_item_ids": items, "recent_event_types": types})
    schema = pa.schema([("user_id", pa.int64()), ("surface", pa.string()), ("context_item_id", pa.int64()),
                        ("query_id", pa.int64()), ("recent_item_ids", pa.list_(pa.int64())),
                        ("recent_event_types", pa.list_(pa.string()))])
    return pa.Table.from_pylist(rows, schema=schema)


def check_requests(table: pa.Table, source: str = "request") -> pa.Table:
    """The request columns of `table`, checked and in canonical types (absent optional ids = -1)."""
    n = table.num_rows
    try:
        check_schema(table.schema, source, REQUIRED)
        present = tuple(c for c in OPTIONAL if c.name in table.column_names)
        check_schema(table.schema, source, present)
        out = {c.name: table.column(c.name) for c in REQUIRED}
        for c in OPTIONAL:
            out[c.name] = (table.column(c.name).fill_null(-1) if c.name in table.column_names
                           else pa.array(np.full(n, -1, np.int64)))
        out = pa.table(out)
        check_values(out, source, REQUIRED + OPTIONAL)
    except EventSchemaError as e:
        raise RequestError(str(e)) from e
    cols = {c.name: out.column(c.name).cast(c.arrow_type) for c in REQUIRED + OPTIONAL}
    has = [c in table.column_names for c in RECENT]
    if any(has) and not all(has):
        raise RequestError(f"{source}: recent actions need both columns {list(RECENT)}")
    if all(has):
        items, types = (table.column(c).combine_chunks() for c in RECENT)
        for name, arr, kind in ((RECENT[0], items, pa.types.is_integer), (RECENT[1], types, pa.types.is_string)):
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not kind(arr.type.value_type):
                raise RequestError(f"{source}: column '{name}' has type {arr.type}, expected a list of "
                                   f"{'int64' if name == RECENT[0] else 'string'}")
        items = items.fill_null(pa.scalar([], items.type))
        types = types.fill_null(pa.scalar([], types.type))
        lengths = np.asarray(pc.list_value_length(items)), np.asarray(pc.list_value_length(types))
        if (bad := lengths[0] != lengths[1]).any():
            row = int(np.flatnonzero(bad)[0])
            raise RequestError(f"{source}: {int(bad.sum())} of {n} rows have recent_item_ids and recent_event_types "
                               f"of different lengths, e.g. row {row} ({lengths[0][row]} vs {lengths[1][row]})")
        flat_items = items.flatten()
        if flat_items.null_count or (len(flat_items) and pc.min(flat_items).as_py() < 0):
            raise RequestError(f"{source}: column 'recent_item_ids' has null or negative item ids; ids are >= 0")
        flat_types = types.flatten()
        code = pc.index_in(flat_types, value_set=pa.array(list(ACTION_CODES)))
        if code.null_count:
            bad = flat_types.filter(code.is_null())[0].as_py()
            raise RequestError(f"{source}: column 'recent_event_types' has {code.null_count} unknown event type(s), "
                               f"e.g. {bad!r}; allowed: {list(ACTION_CODES)}")
        cols["recent_item_ids"], cols["recent_event_types"] = items.cast(pa.list_(pa.int64())), types
    return pa.table(cols)


def has_recent_actions(table: pa.Table) -> np.ndarray:
    """bool [B]: the checked request carries at least one recent action."""
    if "recent_item_ids" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return np.asarray(pc.list_value_length(table.column("recent_item_ids").combine_chunks())
                      .fill_null(0).to_numpy(zero_copy_only=False)) > 0


def recent_actions(table: pa.Table, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(item ids [B, L], action codes [B, L]) of checked requests: the last `length` recent
    actions, most recent last, left-padded with item -1 / action 0 (as HistoryIndex.lookup)."""
    b = table.num_rows
    items = np.full((b, length), -1, dtype=np.int64)
    actions = np.zeros((b, length), dtype=np.int64)
    if length == 0 or "recent_item_ids" not in table.column_names or b == 0:
        return items, actions
    lists = table.column("recent_item_ids").combine_chunks()
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]  # a sliced array's offsets start where flatten() starts
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    types = table.column("recent_event_types").combine_chunks().flatten()
    codes = np.asarray(pc.index_in(types, value_set=pa.array(list(ACTION_CODES))).to_numpy(zero_copy_only=False),
                       dtype=np.int64) + 1
    start, end = offsets[:-1], offsets[1:]
    idx = end[:, None] - length + np.arange(length)[None, :]
    valid = idx >= start[:, None]
    items[valid] = values[idx[valid]]
    actions[valid] = codes[idx[valid]]
    return items, actions
