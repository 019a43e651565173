"""The packed batch format: a few dense tensors per batch, built without per-row Python.

A naive pipeline hands the trainer one tensor per column and stacks them on the worker
(many small copies per step). raycg packs rows *inside Ray Data* (`map_batches`, vectorised
numpy), so each training batch is a handful of packed tensors:

    user_cat    int64   [B, 4]   user_id, surface code, context_item_id, query_id (-1 = none)
    user_dense  float32 [B, Du]  user stats (6) + context item content embedding (D)
    item_cat    int64   [B, 3]   item_id, advertiser_id, category_id   (from the item table)
    item_dense  float32 [B, Di]  item content embedding (D) + item stats (6)
    signals     float32 [B, 4]   is_conversion, is_click, is_save, click_duration (s)
    hard_rows   int64   [B, H]   item-table rows of impression hard negatives (-1 = none);
                                 only when loss.hard_negatives = H > 0

The item tower reads only the item table (+ its training-window stats), so the corpus is
embedded by exactly the same code at evaluation time (`ItemTable.pack`); the user tower
reads `FeatureStore.pack_users`, used for training rows and evaluation queries alike.
Stats come from raycg.data.features (training window only).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycg.data.lookup import find_sorted
from raycg.data.schema import (
    CONVERSION_EVENTS,
    ITEM_COLUMNS,
    SURFACES,
    Column,
    EventSchemaError,
    check_schema,
    check_values,
    event_columns,
    find_problems,
)

USER_CAT = ("user_id", "surface", "context_item_id", "query_id")
ITEM_CAT = ("item_id", "advertiser_id", "category_id")
SIGNALS = ("is_conversion", "is_click", "is_save", "click_duration")


def surface_codes(surface: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(surface.type):
        surface = surface.cast(pa.string())
    return np.asarray(pc.index_in(surface, value_set=pa.array(SURFACES)).fill_null(-1), dtype=np.int64)


@dataclass
class ItemTable:
    """The item corpus as arrays, sorted by item_id for vectorised lookup."""

    item_id: np.ndarray  # int64 [N], sorted
    cat: np.ndarray  # int64 [N, 3]
    dense: np.ndarray  # float32 [N, D (+ 6 stats once with_stats)]
    source: str = "items"
    content_dim: int = -1  # width of the content embedding at the start of `dense`
    cat_names: tuple = ("item", "advertiser", "category")  # bucket names of the `cat` columns

    def __post_init__(self):
        if self.content_dim < 0:
            self.content_dim = self.dense.shape[1]

    @property
    def dense_dim(self) -> int:
        return self.dense.shape[1]

    def with_stats(self, ids: np.ndarray, counts: np.ndarray) -> "ItemTable":
        """Append training-window stats (raycg.data.features) to the dense block; items with
        no training events get the stats of zero counts."""
        from raycg.data.features import COUNT_KINDS, stats_from_counts

        full = np.zeros((len(self.item_id), len(COUNT_KINDS)), dtype=np.int64)
        if len(ids):
            pos, hit = find_sorted(self.item_id, ids)
            full[pos[hit]] = counts[hit]
        dense = np.concatenate([self.dense[:, :self.content_dim], stats_from_counts(full)], axis=1)
        return ItemTable(self.item_id, self.cat, dense, self.source, self.content_dim, self.cat_names)

    def popular(self, k: int, conversion_weight: float = 1.0, engagement_weight: float = 1.0) -> np.ndarray:
        """The k item ids with the highest conversion_weight x conversions + engagement_weight x
        (clicks + saves) in the training window (the `with_stats` block), most first, ties by
        id. With the loss's two weights this is the popularity the training objective weighs."""
        log_counts = self.dense[:, self.content_dim + 1:self.content_dim + 4].astype(np.float64)
        if log_counts.shape[1] != 3:
            raise ValueError("ItemTable.popular: the table has no training-window stats (with_stats)")
        click, save, conversion = np.rint(np.expm1(log_counts)).T
        score = conversion_weight * conversion + engagement_weight * (click + save)
        return self.item_id[np.lexsort((self.item_id, -score))[:k]]

    def content_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Content embedding [B, D] of each id; zeros for -1 or ids not in the table."""
        out = np.zeros((len(item_ids), self.content_dim), dtype=np.float32)
        pos, hit = find_sorted(self.item_id, item_ids)
        out[hit] = self.dense[pos[hit], :self.content_dim]
        return out

    @classmethod
    def from_arrow(cls, table: pa.Table, source: str = "items", extra_cat: tuple = ()) -> "ItemTable":
        """`extra_cat`: further integer item columns (e.g. "tier") used as categorical features."""
        columns = ITEM_COLUMNS + tuple(Column(c, "integer", pa.int64(), min_value=0) for c in extra_cat)
        check_schema(table.schema, source, columns)
        check_values(table, source, columns)
        table = table.sort_by("item_id")
        ids = table.column("item_id").to_numpy()
        if len(ids) > 1 and (np.diff(ids) == 0).any():
            dup = ids[1:][np.diff(ids) == 0]
            raise EventSchemaError(f"{source}: column 'item_id' has {len(dup)} duplicate ids, e.g. {dup[0]}")
        # content_emb is optional: without it the item tower uses ids and stats only
        emb = table.column("content_emb").combine_chunks() if "content_emb" in table.column_names else None
        if emb is None:
            dim = 0
        elif isinstance(emb, pa.ListArray):
            lengths = np.asarray(pc.list_value_length(emb))
            if len(lengths) and (lengths != lengths[0]).any():
                bad = np.flatnonzero(lengths != lengths[0])[0]
                raise EventSchemaError(
                    f"{source}: column 'content_emb' is ragged: row {bad} has length "
                    f"{lengths[bad]}, row 0 has {lengths[0]}")
            dim = int(lengths[0]) if len(lengths) else 0
        else:
            dim = emb.type.list_size
        dense = (np.zeros((len(ids), 0), np.float32) if emb is None else
                 np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), dim))
        if not np.isfinite(dense).all():
            raise EventSchemaError(f"{source}: column 'content_emb' has NaN or infinite values")
        cat = np.stack([table.column(c).to_numpy().astype(np.int64) for c in ITEM_CAT + tuple(extra_cat)], axis=1)
        return cls(item_id=ids.astype(np.int64), cat=cat, dense=dense, source=source,
                   cat_names=("item", "advertiser", "category") + tuple(extra_cat))

    @classmethod
    def read(cls, path: str, extra_cat: tuple = ()) -> "ItemTable":
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise EventSchemaError(f"{path}: cannot read item table: {e}") from e
        return cls.from_arrow(table, source=path, extra_cat=tuple(extra_cat))

    def rows(self, item_ids: np.ndarray, source: str) -> np.ndarray:
        """Row index of each id; unknown ids are an input error."""
        pos, found = find_sorted(self.item_id, item_ids)
        missing = ~found
        if missing.any():
            raise EventSchemaError(
                f"{source}: column 'item_id' has {int(missing.sum())} of {len(item_ids)} rows "
                f"not in the item table {self.source}, e.g. {int(item_ids[missing][0])}")
        return pos

    def pack(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Item-tower inputs for the given rows (all items when None)."""
        if rows is None:
            return {"item_cat": self.cat, "item_dense": self.dense}
        return {"item_cat": self.cat[rows], "item_dense": self.dense[rows]}


def query_time(table: pa.Table) -> np.ndarray:
    """When each row's request happened: `request_ts` where the row is attributed to an earlier
    request (a conversion to its click), else its own `timestamp`. Time-dependent features
    (the action history) only see events strictly before it."""
    ts = table.column("timestamp").to_numpy().astype(np.int64)
    if "request_ts" not in table.column_names:
        return ts
    req = table.column("request_ts").fill_null(-1).to_numpy().astype(np.int64)
    return np.where(req >= 0, req, ts)


def pack_user_cat(table: pa.Table) -> np.ndarray:
    """Categorical user/query-tower inputs: int64 [B, 4]."""
    return np.stack(
        [
            table.column("user_id").to_numpy().astype(np.int64),
            surface_codes(table.column("surface").combine_chunks()),
            table.column("context_item_id").to_numpy().astype(np.int64),
            table.column("query_id").to_numpy().astype(np.int64),
        ],
        axis=1,
    )


@dataclass
class FeatureStore:
    """Everything the packers need to turn rows into tower inputs (shipped via the object store)."""

    items: ItemTable
    users: "UserTable"  # noqa: F821  (raycg.data.features.UserTable)
    history: object = None  # raycg.data.history.HistoryIndex or None
    history_length: int = 0
    # training-window event counts per id (ids, totals): the vocabularies are built from them
    user_counts: tuple = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    item_counts: tuple = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    context_counts: tuple | None = None  # context_item_id and query_id: counted when vocabularies are on
    query_counts: tuple | None = None
    vocab: dict | None = None  # {feature: sorted ids} (raycg.data.vocab), read by the model's embeddings

    def new_users(self, requests: pa.Table, has_recent_actions: np.ndarray) -> np.ndarray:
        """bool [B]: requests (user_id, context_item_id, query_id) that give the model nothing to
        go on (`index.new_users`): a user with no training-window event, no recent action and
        no context (no subject item, no query)."""
        blank = ~self.users.has_events(requests.column("user_id").to_numpy()) & ~np.asarray(has_recent_actions, bool)
        for col in ("context_item_id", "query_id"):
            blank &= requests.column(col).to_numpy() < 0
        return blank

    def pack_users(self, table: pa.Table) -> dict[str, np.ndarray]:
        """User/query-tower inputs for event or query rows."""
        user_cat = pack_user_cat(table)
        if self.users.cat.shape[1]:
            user_cat = np.concatenate([user_cat, self.users.lookup_cat(user_cat[:, 0])], axis=1)
        user_dense = np.concatenate(
            [self.users.lookup(user_cat[:, 0]), self.items.content_of(user_cat[:, 2])], axis=1)
        out = {"user_cat": user_cat, "user_dense": user_dense}
        if self.history is not None and self.history_length > 0:
            items, actions = self.history.lookup(user_cat[:, 0], query_time(table), self.history_length)
            out["hist_items"], out["hist_actions"] = items, actions
        return out


def quarantine_rows(table: pa.Table, store: FeatureStore, quarantine_dir: str,
                    check_duplicates: bool = True) -> pa.Table:
    """Move rows that break a rule (or name an item missing from the item table) to a side
    Parquet dataset under `quarantine_dir`, with a `quarantine_reason` column; return the rest.

    File names are a hash of the quarantined rows, so re-executing a batch rewrites the same file.
    """
    problems = find_problems(table, event_columns(table.column_names), check_duplicates)
    reason = np.full(table.num_rows, "", dtype=object)
    for p in problems:
        reason[(reason == "") & p.mask] = f"{p.column}:{p.reason}"
    item_ids = table.column("item_id").fill_null(-1).to_numpy().astype(np.int64)
    _, known = find_sorted(store.items.item_id, item_ids)
    reason[(reason == "") & ~known] = "item_id:not_in_item_table"
    bad = reason != ""
    if not bad.any():
        return table
    rejected = table.filter(pa.array(bad)).append_column("quarantine_reason", pa.array(reason[bad].tolist()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rejected.schema) as writer:
        writer.write_table(rejected)
    name = hashlib.sha1(sink.getvalue().to_pybytes()).hexdigest()[:20]
    os.makedirs(quarantine_dir, exist_ok=True)
    pq.write_table(rejected, os.path.join(quarantine_dir, f"part-{name}.parquet"))
    return table.filter(pa.array(~bad))


def pack_events(table: pa.Table, store: FeatureStore, validate: bool = True, impressions=None,
                num_hard: int = 0, seed: int = 0, quarantine_dir: str | None = None,
                check_duplicates: bool = True, before_ts: int | None = None) -> dict[str, np.ndarray]:
    """Event rows -> packed training batch. Keeps positives (conversion, click, save).

    With an `ImpressionIndex` and num_hard > 0, also draws `hard_rows` per positive.
    Bad rows fail the batch with an `EventSchemaError` naming file, column, count and an
    example; with `quarantine_dir` they are written there instead (see `quarantine_rows`).

    Impression-only rows are not training positives in this loss; they are dropped
    here and counted by the caller (rows in - rows out - rows quarantined).
    """
    source = table.column("path").to_numpy(zero_copy_only=False) if "path" in table.column_names else "events"
    if quarantine_dir is not None:
        table = quarantine_rows(table, store, quarantine_dir, check_duplicates)
        source = table.column("path").to_numpy(zero_copy_only=False) if "path" in table.column_names else "events"
    elif validate:
        check_values(table, source, event_columns(table.column_names), check_duplicates)
    etype = table.column("event_type").combine_chunks()
    if pa.types.is_dictionary(etype.type):
        etype = etype.cast(pa.string())
    is_conv = np.asarray(pc.is_in(etype, value_set=pa.array(CONVERSION_EVENTS)))
    is_click = np.asarray(pc.equal(etype, "click"))
    is_save = np.asarray(pc.equal(etype, "save"))
    keep = is_conv | is_click | is_save
    if before_ts is not None:  # the validation window (checked above) is not trained on
        keep &= table.column("timestamp").to_numpy() < before_ts
    table = table.filter(pa.array(keep))
    where = source if isinstance(source, str) else (str(source[0]) if len(source) else "events")
    rows = store.items.rows(table.column("item_id").to_numpy().astype(np.int64), where)
    out = store.items.pack(rows)
    out.update(store.pack_users(table))
    out["signals"] = np.stack(
        [is_conv[keep], is_click[keep], is_save[keep],
         table.column("click_duration").to_numpy().astype(np.float32)],
        axis=1,
    ).astype(np.float32)
    if num_hard > 0 and impressions is not None:
        # seeded by the batch's content so a re-run packs the same negatives
        rng = np.random.default_rng([seed, int(out["user_cat"][:, 0].sum()) if len(rows) else 0, len(rows)])
        out["hard_rows"] = impressions.sample(out["user_cat"][:, 0], num_hard, rng)
    return out
