"""Feature tables computed from the training window, and the feature spec the towers read.

Aggregates (Ray Data map -> numpy combine, over the *training* split only, so nothing from
the evaluation window can leak into a feature):

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


def partial_counts(table: pa.Table, key: str) -> dict:
    """Per-batch counts by `key` (the map step of the aggregation)."""
    etype = table.column("event_type").combine_chunks()
    if pa.types.is_dictionary(etype.type):
        etype = etype.cast(pa.string())
    kinds = np.stack([
        np.asarray(pc.equal(etype, "impression")), np.asarray(pc.equal(etype, "click")),
        np.asarray(pc.equal(etype, "save")), np.asarray(pc.is_in(etype, value_set=pa.array(CONVERSION_EVENTS))),
    ], axis=1).astype(np.int64)
    ids = table.column(key).to_numpy().astype(np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    counts = np.zeros((len(uniq), len(COUNT_KINDS)), dtype=np.int64)
    np.add.at(counts, inv, kinds)
    return {"id": uniq, "counts": counts}


def combine_counts(parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The reduce step: sum partial counts by id -> (sorted ids, counts [N, 4])."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, len(COUNT_KINDS)), np.int64)
    ids = np.concatenate([p["id"] for p in parts])
    counts = np.concatenate([p["counts"] for p in parts])
    uniq, inv = np.unique(ids, return_inverse=True)
    out = np.zeros((len(uniq), len(COUNT_KINDS)), dtype=np.int64)
    np.add.at(out, inv, counts)
    return uniq, out


def aggregate_counts_by(ds, keys: list[str], before_ts: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (sorted ids, counts [N, 4])} for several keys in ONE pass over a Ray dataset of
    events (map in Ray Data, combine on the driver); with `before_ts`, only events strictly
    before it (the training part of a split). One pass, not one per key: each Ray Data pass
    re-reads and re-decodes the split and pays the pipeline start again."""
    keys = list(keys)

    def counts(t):
        if before_ts is not None:
            t = t.filter(pc.less(t.column("timestamp"), before_ts))
        parts = [partial_counts(t, k) for k in keys]
        return {"key": np.concatenate([np.full(len(p["id"]), i, np.int64) for i, p in enumerate(parts)]),
                "id": np.concatenate([p["id"] for p in parts]),
                "counts": np.concatenate([p["counts"] for p in parts])}

    mapped = ds.map_batches(counts, batch_format="pyarrow", batch_size=65536)
    per_key: dict[str, list[dict]] = {k: [] for k in keys}
    for b in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        for i, k in enumerate(keys):
            mine = b["key"] == i
            per_key[k].append({"id": b["id"][mine], "counts": b["counts"][mine]})
    return {k: combine_counts(parts) for k, parts in per_key.items()}


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
