"""Feature tables computed from the training window, and the feature spec the towers read.

Aggregates (Ray Data map -> Arrow hash aggregation in the tasks and on the driver, over the
*training* split only, so nothing from the evaluation window can leak into a feature):

    per user and per item: counts of impressions, clicks, saves, conversions ->
    dense stats [6] = log1p(n_imp), log1p(n_click), log1p(n_save), log1p(n_conv),
                      click rate n_click / (n_imp + n_click + 1), conversion rate n_conv / (n_click + 1)

Tower inputs (see raycg.data.batches):

    user_dense = [user stats (6), content embedding of the context (subject) item (D; zeros without one)]
    item_dense = [item content embedding (D), item stats (6)]

Normalisation statistics (mean, std of every dense column over the packed training
examples) are computed by Ray Data too, kept in `FeatureSpec` (raycg.data.spec), and become
buffers of the towers, so checkpoints and exports carry them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raycg.data.lookup import find_sorted
from raycg.data.schema import CONVERSION_EVENTS

N_STATS = 6
COUNT_KINDS = ("impression", "click", "save", "conversion")


def stats_from_counts(counts: np.ndarray) -> np.ndarray:
    """[N, 4] counts (impression, click, save, conversion) -> [N, 6] float32 dense stats."""
    counts = counts.astype(np.float64)
    imp, click, save, conv = counts.T
    out = np.stack([
        np.log1p(imp), np.log1p(click), np.log1p(save), np.log1p(conv),
        click / (imp + click + 1.0), conv / (click + 1.0),
    ], axis=1)
    return out.astype(np.float32)


KIND_COLUMNS = tuple(f"n_{k}" for k in COUNT_KINDS)


def kind_indicators(table: pa.Table) -> dict[str, pa.Array]:
    """{n_impression, n_click, n_save, n_conversion}: an int64 0/1 per event row (CONVERSION_EVENTS
    count as conversions)."""
    etype = table.column("event_type").combine_chunks()
    if pa.types.is_dictionary(etype.type):
        etype = etype.cast(pa.string())
    is_kind = [pc.equal(etype, "impression"), pc.equal(etype, "click"), pc.equal(etype, "save"),
               pc.is_in(etype, value_set=pa.array(CONVERSION_EVENTS))]
    return {name: pc.cast(m, pa.int64()) for name, m in zip(KIND_COLUMNS, is_kind)}


def sum_kinds_by(table: pa.Table, keys: list[str]) -> pa.Table:
    """The KIND_COLUMNS of `table` summed per distinct `keys` (Arrow's hash aggregation, on all
    cores: several times faster than sorting the ids, which matters at hundreds of millions of
    partial rows)."""
    out = table.group_by(keys).aggregate([(c, "sum") for c in KIND_COLUMNS])
    return out.rename_columns([c.removesuffix("_sum") for c in out.column_names])


def partial_counts(table: pa.Table, key: str) -> pa.Table:
    """Per-batch counts by `key` (the map step of the aggregation): a table of `id` + KIND_COLUMNS."""
    ids = pc.cast(table.column(key), pa.int64())
    return sum_kinds_by(pa.table({"id": ids, **kind_indicators(table)}), ["id"])


def _ids_and_counts(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    table = table.sort_by("id")
    counts = [table.column(c).to_numpy().astype(np.int64) for c in KIND_COLUMNS]
    return table.column("id").to_numpy().astype(np.int64), np.stack(counts, axis=1).reshape(-1, len(COUNT_KINDS))


def combine_counts(parts: list[pa.Table]) -> tuple[np.ndarray, np.ndarray]:
    """The reduce step: sum partial counts by id -> (sorted ids, counts [N, 4])."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, len(COUNT_KINDS)), np.int64)
    return _ids_and_counts(sum_kinds_by(pa.concat_tables(parts), ["id"]))


def aggregate_counts_by(ds, keys: list[str], before_ts: int | None = None,
                        compact_rows: int = 32_000_000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (sorted ids, counts [N, 4])} for several keys in ONE pass over a Ray dataset of
    events (map in Ray Data, combine on the driver); with `before_ts`, only events strictly
    before it (the training part of a split). One pass, not one per key: each Ray Data pass
    re-reads and re-decodes the split and pays the pipeline start again.

    Each map task sums a whole block (a user's events mostly share a file, so its partial rows
    are few); the driver sums the partial rows as they arrive, whenever more than `compact_rows`
    are pending, so its memory stays bounded by the distinct ids, not the events."""
    keys = list(keys)

    def counts(t):
        if before_ts is not None:
            t = t.filter(pc.less(t.column("timestamp"), before_ts))
        kinds = kind_indicators(t)
        parts = []
        for i, k in enumerate(keys):
            part = sum_kinds_by(pa.table({"id": pc.cast(t.column(k), pa.int64()), **kinds}), ["id"])
            parts.append(part.add_column(0, "key", pa.array(np.full(part.num_rows, i, np.int32))))
        return pa.concat_tables(parts)

    mapped = ds.map_batches(counts, batch_format="pyarrow", batch_size=None)
    pending, rows, limit = [], 0, compact_rows
    for b in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(b)
        rows += b.num_rows
        if rows > limit:
            pending = [sum_kinds_by(pa.concat_tables(pending), ["key", "id"])]
            rows = pending[0].num_rows
            limit = max(compact_rows, 2 * rows)  # distinct ids alone may fill it: grow, stay linear
    total = sum_kinds_by(pa.concat_tables(pending), ["key", "id"]) if pending else None
    out = {}
    for i, k in enumerate(keys):
        if total is None:
            out[k] = combine_counts([])
        else:
            out[k] = _ids_and_counts(total.filter(pc.equal(total.column("key"), i)).drop_columns(["key"]))
    return out


def aggregate_counts(ds, key: str, before_ts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts per `key` (aggregate_counts_by for one key)."""
    return aggregate_counts_by(ds, [key], before_ts)[key]


@dataclass
class UserTable:
    """Per-user dense stats (training window) and optional categorical attributes (e.g.
    demographics from a users table); unknown users get zero stats and -1 (missing) ids."""

    user_id: np.ndarray
    dense: np.ndarray  # float32 [U, 6]
    cat: np.ndarray | None = None  # int64 [U, k], aligned with user_id
    cat_names: tuple = ()
    rows_quarantined: int = 0  # users-table rows set aside (data.on_bad_rows=quarantine)

    def __post_init__(self):
        if self.cat is None:
            self.cat = np.zeros((len(self.user_id), 0), dtype=np.int64)

    def with_attributes(self, table: pa.Table, columns: list[str], source: str,
                        quarantine_dir: str | None = None) -> "UserTable":
        """Join integer attribute columns of a users table (user_id + columns) onto the stats.

        Rows that break a rule (null, negative) or repeat an earlier row's user_id fail with an
        error naming the file, or go to `quarantine_dir/users.parquet` (with a `quarantine_reason`,
        counted in `rows_quarantined`)."""
        import os

        import pyarrow.parquet as pq

        from raycg.data.schema import Column, EventSchemaError, check_schema, find_problems

        cols = (Column("user_id", "integer", pa.int64(), min_value=0),) + tuple(
            Column(c, "integer", pa.int64(), min_value=0) for c in columns)
        check_schema(table.schema, source, cols)
        table = table.select([c.name for c in cols])
        problems = find_problems(table, cols)
        user_ids = table.column("user_id").fill_null(-1).to_numpy().astype(np.int64)
        _, first = np.unique(user_ids, return_index=True)
        dup = np.ones(len(user_ids), bool)
        dup[first] = False
        if dup.any():
            from raycg.data.schema import Problem

            problems.append(Problem("user_id", "duplicate", dup, (
                f"column 'user_id' has {int(dup.sum())} of {len(dup)} rows repeating an earlier user, "
                f"e.g. {int(user_ids[dup][0])}")))
        n_bad = 0
        if problems and quarantine_dir is None:
            raise EventSchemaError(f"{source}: {problems[0].message}")
        if problems:
            reason = np.full(table.num_rows, "", dtype=object)
            for p in problems:
                reason[(reason == "") & p.mask] = f"{p.column}:{p.reason}"
            bad = reason != ""
            n_bad = int(bad.sum())
            os.makedirs(quarantine_dir, exist_ok=True)
            pq.write_table(table.filter(pa.array(bad)).append_column(
                "quarantine_reason", pa.array(reason[bad].tolist())), os.path.join(quarantine_dir, "users.parquet"))
            table = table.filter(pa.array(~bad))
        ids = table.column("user_id").to_numpy().astype(np.int64)
        attrs = np.stack([table.column(c).to_numpy().astype(np.int64) for c in columns], axis=1)
        all_ids = np.union1d(self.user_id, ids)
        dense = np.zeros((len(all_ids), self.dense.shape[1]), np.float32)
        dense[np.searchsorted(all_ids, self.user_id)] = self.dense
        cat = np.full((len(all_ids), len(columns)), -1, np.int64)
        cat[np.searchsorted(all_ids, ids)] = attrs
        return UserTable(all_ids, dense, cat, tuple(columns), rows_quarantined=n_bad)

    def _gather(self, values: np.ndarray, user_ids: np.ndarray, missing) -> np.ndarray:
        """Rows of `values` (aligned with user_id) for each id; `missing` where unknown."""
        out = np.full((len(user_ids), values.shape[1]), missing, dtype=values.dtype)
        if len(self.user_id) == 0:
            return out
        pos, hit = find_sorted(self.user_id, user_ids)
        out[hit] = values[pos[hit]]
        return out

    def lookup_cat(self, user_ids: np.ndarray) -> np.ndarray:
        return self._gather(self.cat, user_ids, -1)

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        return self._gather(self.dense, user_ids, 0.0)

    def has_events(self, user_ids: np.ndarray) -> np.ndarray:
        """bool [B]: the user has a training-window event (the first four stats are log1p counts;
        a user only in an attributes table has zero stats)."""
        return self.lookup(np.asarray(user_ids, dtype=np.int64))[:, :4].sum(axis=1) > 0


def dense_moments(ds, columns: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Mean and std of each packed dense column over a Ray dataset (map: sums; reduce: numpy)."""

    def moments(batch: dict) -> dict:
        out = {}
        for c in columns:
            x = batch[c].astype(np.float64)
            out[f"{c}_n"] = np.array([len(x)])
            out[f"{c}_s"] = x.sum(0, keepdims=True)
            out[f"{c}_ss"] = (x * x).sum(0, keepdims=True)
        return out

    totals: dict[str, np.ndarray] = {}
    for b in ds.map_batches(moments, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            totals[k] = totals.get(k, 0) + v.sum(0)
    result = {}
    for c in columns:
        n = max(float(totals.get(f"{c}_n", 0)), 1.0)
        mean = totals[f"{c}_s"] / n
        var = np.maximum(totals[f"{c}_ss"] / n - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < 1e-6, 1.0, std)  # constant columns pass through centred
        result[c] = (mean.astype(np.float32).tolist(), std.astype(np.float32).tolist())
    return result
