"""The Parquet event schema raycg accepts, and its validation.

One row per event. Required columns (documented in README "Event schema"):

    column            type      meaning
    user_id           int64     >= 0
    item_id           int64     >= 0, must exist in the item table
    advertiser_id     int64     >= 0, advertiser of the item
    surface           string    one of SURFACES
    event_type        string    one of EVENT_TYPES
    click_duration    float     seconds >= 0 (clicks); 0 for other events; never NaN
    timestamp         int64     unix seconds, 2000-01-01 .. 2100-01-01
    context_item_id   int64     subject item on the related surface, -1 otherwise
    query_id          int64     query (id or hashed text) on search, -1 otherwise

Optional column (all files of a split have it, or none):

    request_ts        int64     attribution: unix seconds of the request (the click) the event
                                is attributed to; -1 = the event is its own request. Offsite
                                conversions are reported later and belong to the request that
                                led to them: their features (history, ...) and evaluation
                                queries use this time and the row's surface/context, so that a
                                conversion never sees its own click. Must not be after
                                `timestamp`.

Schema problems are caught per file from the Parquet footer (cheap, on the driver);
value problems are caught per batch inside the pipeline. Both raise `EventSchemaError`
naming the file, the column, how many rows are bad and an example value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SURFACES = ("home", "related", "search")
EVENT_TYPES = ("impression", "click", "save", "add_to_cart", "checkout")
CONVERSION_EVENTS = ("add_to_cart", "checkout")
ENGAGEMENT_EVENTS = ("click", "save")

_INT, _FLOAT, _STR = "integer", "floating", "string"
# Plausible event times: 2000-01-01 .. 2100-01-01 (catches milliseconds and zero dates).
TIMESTAMP_MIN, TIMESTAMP_MAX = 946_684_800, 4_102_444_800


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # integer | floating | string
    arrow_type: pa.DataType
    min_value: int | None = None  # inclusive, integers only
    max_value: int | None = None  # inclusive, integers only
    allowed: tuple[str, ...] | None = None  # strings only


EVENT_COLUMNS: tuple[Column, ...] = (
    Column("user_id", _INT, pa.int64(), min_value=0),
    Column("item_id", _INT, pa.int64(), min_value=0),
    Column("advertiser_id", _INT, pa.int64(), min_value=0),
    Column("surface", _STR, pa.string(), allowed=SURFACES),
    Column("event_type", _STR, pa.string(), allowed=EVENT_TYPES),
    Column("click_duration", _FLOAT, pa.float32()),
    Column("timestamp", _INT, pa.int64(), min_value=TIMESTAMP_MIN, max_value=TIMESTAMP_MAX),
    Column("context_item_id", _INT, pa.int64(), min_value=-1),
    Column("query_id", _INT, pa.int64(), min_value=-1),
)
EVENT_SCHEMA = pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in EVENT_COLUMNS])
REQUEST_TS = Column("request_ts", _INT, pa.int64(), min_value=-1, max_value=TIMESTAMP_MAX)
OPTIONAL_EVENT_COLUMNS: tuple[Column, ...] = (REQUEST_TS,)


def event_columns(names) -> tuple[Column, ...]:
    """The required event columns plus the optional ones present in `names` (column names)."""
    names = set(names)
    return EVENT_COLUMNS + tuple(c for c in OPTIONAL_EVENT_COLUMNS if c.name in names)

# The item table: the retrieval corpus. content_emb is a fixed-size vector per item.
ITEM_COLUMNS: tuple[Column, ...] = (
    Column("item_id", _INT, pa.int64(), min_value=0),
    Column("advertiser_id", _INT, pa.int64(), min_value=0),
    Column("category_id", _INT, pa.int64(), min_value=0),
)


class EventSchemaError(ValueError):
    """Malformed input: names file, column, number of bad rows and an example."""


def _kind_ok(kind: str, t: pa.DataType) -> bool:
    if kind == _INT:
        return pa.types.is_integer(t)
    if kind == _FLOAT:
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)
    )


def check_schema(schema: pa.Schema, source: str, columns=EVENT_COLUMNS) -> None:
    """Fail if a required column is missing or has the wrong type."""
    names = set(schema.names)
    for col in columns:
        if col.name not in names:
            raise EventSchemaError(
                f"{source}: missing required column '{col.name}' ({col.kind}); "
                f"file has columns {sorted(names)}"
            )
        t = schema.field(col.name).type
        if not _kind_ok(col.kind, t):
            raise EventSchemaError(
                f"{source}: column '{col.name}' has type {t}, expected {col.kind} "
                f"({col.arrow_type})"
            )


def footer_rows(paths: list[str], columns=EVENT_COLUMNS) -> dict[str, int]:
    """Check every file's footer schema; return each file's row count (0 for an empty file,
    which Spark and others write routinely: callers skip and count those).

    Reads only metadata, so it is cheap even for many large shards.
    """
    if not paths:
        raise EventSchemaError("no Parquet files given")
    rows = {}
    for path in paths:
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except Exception as e:  # corrupt or not Parquet at all
            raise EventSchemaError(f"{path}: cannot read Parquet footer: {e}") from e
        check_schema(schema, path, columns)
        optional = [c for c in OPTIONAL_EVENT_COLUMNS if c.name in schema.names] if columns is EVENT_COLUMNS else []
        check_schema(schema, path, optional)
        if columns is EVENT_COLUMNS:
            present = tuple(c.name for c in optional)
            if rows and present != first_present:
                raise EventSchemaError(
                    f"{path}: optional columns {list(present) or 'none'} differ from {first_path}'s "
                    f"{list(first_present) or 'none'}; every file of a split must have the same columns")
            if not rows:
                first_path, first_present = path, present
        rows[path] = meta.num_rows
    return rows


def check_parquet_files(paths: list[str], columns=EVENT_COLUMNS) -> int:
    """Check every file's footer schema; return the total row count (an error if it is 0)."""
    total = sum(footer_rows(paths, columns).values())
    if total == 0:
        where = paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
        raise EventSchemaError(f"{where}: no rows (every file is empty)")
    return total


def _example(values: pa.Array, mask: np.ndarray) -> object:
    idx = int(np.flatnonzero(mask)[0])
    return values[idx].as_py()


def _where(source, mask: np.ndarray) -> str:
    """`source` is a file name, or a per-row array of file names (Ray's `path` column)."""
    if isinstance(source, str):
        return source
    return str(source[int(np.flatnonzero(mask)[0])])


@dataclass(frozen=True)
class Problem:
    """Rows of a batch that break one rule: `mask` marks them, `message` says what is wrong."""

    column: str
    reason: str  # short tag, e.g. "null", "below_min", "unknown_value"
    mask: np.ndarray
    message: str


def find_problems(table: pa.Table, columns=EVENT_COLUMNS, check_duplicates: bool = False) -> list[Problem]:
    """Every rule broken by some row: nulls, out-of-range ids/timestamps, unknown categories,
    negative/NaN/inf durations and (optionally) exact duplicate events within the batch."""
    n = table.num_rows
    problems = []
    for col in columns:
        arr = table.column(col.name).combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(pa.string())
        if arr.null_count:
            mask = np.asarray(arr.is_null())
            problems.append(Problem(col.name, "null", mask, (
                f"column '{col.name}' has {arr.null_count} null value(s) in a batch of {n} rows "
                f"(first at batch row {int(np.flatnonzero(mask)[0])})")))
            arr = arr.fill_null(col.allowed[0] if col.allowed else 0)
        if col.kind == _INT:
            values = arr.to_numpy(zero_copy_only=False)
            if col.min_value is not None and (bad := values < col.min_value).any():
                problems.append(Problem(col.name, "below_min", bad, (
                    f"column '{col.name}' has {int(bad.sum())} of {n} rows below {col.min_value}, "
                    f"e.g. {_example(arr, bad)}")))
            if col.max_value is not None and (bad := values > col.max_value).any():
                problems.append(Problem(col.name, "above_max", bad, (
                    f"column '{col.name}' has {int(bad.sum())} of {n} rows above {col.max_value}, "
                    f"e.g. {_example(arr, bad)}")))
        elif col.kind == _STR and col.allowed is not None:
            bad = ~np.asarray(pc.is_in(arr, value_set=pa.array(col.allowed)))
            if bad.any():
                problems.append(Problem(col.name, "unknown_value", bad, (
                    f"column '{col.name}' has {int(bad.sum())} of {n} rows with unknown value, "
                    f"e.g. {_example(arr, bad)!r}; allowed: {list(col.allowed)}")))
        elif col.kind == _FLOAT:
            values = arr.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isfinite(values) | (values < 0)
            if bad.any():
                ex = _example(arr, bad)
                ex = "NaN" if isinstance(ex, float) and math.isnan(ex) else ex
                problems.append(Problem(col.name, "bad_float", bad, (
                    f"column '{col.name}' has {int(bad.sum())} of {n} rows that are negative, NaN or "
                    f"infinite, e.g. {ex}")))
    if "request_ts" in table.column_names and "timestamp" in table.column_names:
        req = table.column("request_ts").fill_null(-1).to_numpy().astype(np.int64)
        ts = table.column("timestamp").fill_null(0).to_numpy().astype(np.int64)
        for bad, reason, what in (((req >= 0) & (req < TIMESTAMP_MIN), "below_min", "before 2000-01-01"),
                                  ((req >= 0) & (req > ts), "after_event", "after the event's own timestamp")):
            if bad.any():
                problems.append(Problem("request_ts", reason, bad, (
                    f"column 'request_ts' has {int(bad.sum())} of {n} rows {what} (attribution goes to an "
                    f"earlier request; -1 = none), e.g. {_example(table.column('request_ts'), bad)}")))
    if check_duplicates and n > 1:
        dup = duplicated_rows(table.select([c.name for c in columns]))
        if dup.any():
            first = int(np.flatnonzero(dup)[0])
            problems.append(Problem("*", "duplicate", dup, (
                f"{int(dup.sum())} of {n} rows repeat an earlier event of the batch exactly "
                f"(all columns equal), e.g. batch row {first}")))
    return problems


def duplicated_rows(table: pa.Table) -> np.ndarray:
    """bool per row: an earlier row has every column equal (pandas `duplicated(keep="first")`).

    Rows equal in every column have equal hashes of their numeric columns, so only rows whose
    hash repeats are compared in full: pandas on every row and column took ~0.1 s per 250k
    events (string columns become Python objects), the hash and a sort ~0.02 s."""
    numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    if not numeric or table.num_rows < 2:
        return table.to_pandas().duplicated(keep="first").to_numpy()
    h = np.zeros(table.num_rows, np.uint64)
    with np.errstate(over="ignore"):
        for name in numeric:
            v = table.column(name).fill_null(0).to_numpy()
            v = v.view(f"u{v.dtype.itemsize}").astype(np.uint64)  # floats by their bits
            h = (h ^ v) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
    order = np.argsort(h)
    same = h[order][1:] == h[order][:-1]
    maybe = np.zeros(table.num_rows, bool)
    maybe[order[1:][same]] = maybe[order[:-1][same]] = True
    maybe = np.flatnonzero(maybe)
    dup = np.zeros(table.num_rows, bool)
    if len(maybe):  # a row's earlier copies are among `maybe` too: keep="first" is unchanged
        dup[maybe] = table.take(pa.array(maybe)).to_pandas().duplicated(keep="first").to_numpy()
    return dup


def check_values(table: pa.Table, source, columns=EVENT_COLUMNS, check_duplicates: bool = False) -> None:
    """Fail on the first broken rule (see `find_problems`).

    `source` names the file, or is a per-row array of file names.
    """
    for problem in find_problems(table, columns, check_duplicates):
        raise EventSchemaError(f"{_where(source, problem.mask)}: {problem.message}")


def conform(table: pa.Table, columns=None) -> pa.Table:
    """Cast the event columns (required + optional present) to their canonical types (after checks)."""
    out = {}
    for col in columns or event_columns(table.column_names):
        arr = table.column(col.name)
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(pa.string())
        out[col.name] = arr.cast(col.arrow_type)
    return pa.table(out)
