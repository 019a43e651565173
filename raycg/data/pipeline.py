"""Ray Data pipelines: event shards -> packed training batches.

    read_parquet (footers checked on the driver first)
      -> map_batches(pack_events)   vectorised validation + item-table join + packing
      -> [random_shuffle]           data.shuffle=once: rows mixed across files, one seeded pass
      -> [materialize]              optional: keep packed blocks in the object store so
                                    later epochs skip decode/pack (fast when it fits)
      -> [random_shuffle]           data.shuffle=epoch: a new seeded permutation every epoch

Why shuffle: training batches are consecutive rows of the files as read, and their in-batch
negatives are the other rows' items. A file that holds one slice of users (the scale-out
simulator writes one file per block of 10,000 users) or one stretch of time (logs partitioned
by hour, sessions in order) puts a user's other positives in the same batch as unmasked false
negatives: on the 10x simulator, 2.89 other rows of the same user per row in a batch of 8,192
read in file order, against 0.15 after a global shuffle (benchmarks/batch_users.py).
"""
from __future__ import annotations

import glob
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import RandomSeedConfig

from raycg.data.batches import FeatureStore, ItemTable, pack_events, quarantine_rows
from raycg.data.features import UserTable, aggregate_counts_by, stats_from_counts
from raycg.data.schema import EventSchemaError, check_values, conform, event_columns, footer_rows

SHUFFLES = ("none", "once", "epoch")


def event_files(path: str) -> list[str]:
    """All *.parquet files under `path` (a file or a directory), sorted."""
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise EventSchemaError(f"{path}: no Parquet files found")
    return files


def nonempty_event_files(path: str) -> tuple[list[str], int, list[str]]:
    """(files with rows, their total rows, empty files) of a split; footers checked. Empty
    shards are skipped and counted, not fatal; a split with no rows at all is an error."""
    rows = footer_rows(event_files(path))
    total = sum(rows.values())
    if total == 0:
        raise EventSchemaError(f"{path}: no rows (all {len(rows)} Parquet files are empty)")
    return [f for f, n in rows.items() if n], total, [f for f, n in rows.items() if not n]


def split_columns(files: list[str]) -> list[str]:
    """Event columns to read from a split: the required ones + the optional ones its files have
    (footer_rows has checked that every file agrees)."""
    return [c.name for c in event_columns(pq.read_schema(files[0]).names)]


def read_events(path: str) -> tuple[ray.data.Dataset, int]:
    """Events as a Ray dataset (with a `path` column for error messages) + row count."""
    files, n_rows, _ = nonempty_event_files(path)
    ds = ray.data.read_parquet(files, columns=split_columns(files), include_paths=True)
    return ds, n_rows


def checked_events(path: str, store: FeatureStore, *, quarantine_dir: str | None = None,
                   check_duplicates: bool = True) -> tuple[pa.Table, dict]:
    """Every event of a split (e.g. the evaluation split), read file by file and checked with
    the training split's rules (raycg.data.schema) plus item-table membership.

    Without `quarantine_dir` the first problem raises an `EventSchemaError` naming file, column,
    count and an example; with it, bad rows go there (`quarantine_rows`) and the rest is kept.
    Returns (the kept events, {"rows_read", "rows_quarantined", "rows_used", "files_empty"}).
    """
    files, rows_read, empty = nonempty_event_files(path)
    names = split_columns(files)
    if quarantine_dir is not None and os.path.isdir(quarantine_dir):
        shutil.rmtree(quarantine_dir)  # recount from scratch (e.g. a resumed run)

    def checked(f: str) -> pa.Table:
        table = pq.read_table(f, columns=names)
        if quarantine_dir is not None:
            table = quarantine_rows(table, store, quarantine_dir, check_duplicates)
        else:
            check_values(table, f, event_columns(table.column_names), check_duplicates)
            store.items.rows(table.column("item_id").to_numpy().astype(np.int64), f)
        return conform(table)  # one schema for every file (types, nullability)

    # files in threads (Parquet decoding and Arrow's checks release the GIL): 10-13 s -> a few on
    # 16 cores at 50M evaluation events; in file order, so the first bad file in order is the
    # one an error names, and quarantine files are named by their rows' hash, so none collide
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(files))) as pool:
        kept = list(pool.map(checked, files))
    table = pa.concat_tables(kept)
    stats = {"rows_read": rows_read, "rows_quarantined": rows_read - table.num_rows, "rows_used": table.num_rows,
             "files_empty": len(empty)}
    return table, stats


def build_feature_store(train_path: str, items_path: str, history_length: int = 0,
                        history_paths: list[str] | None = None, item_categorical=(),
                        users_path: str | None = None, user_categorical=(),
                        users_quarantine_dir: str | None = None, before_ts: int | None = None,
                        count_context_ids: bool = False) -> FeatureStore:
    """Item table + user/item stats from the training split (Ray Data) [+ history index]
    [+ categorical item columns and user attributes from a users table].

    `history_paths`: event files the history index is built from (default: the training
    split; evaluation passes train + eval, since lookups only ever see strictly earlier events).
    `count_context_ids`: also count context_item_id and query_id (for their vocabularies).
    """
    items = ItemTable.read(items_path, extra_cat=tuple(item_categorical))
    ds, _ = read_events(train_path)
    keys = ["item_id", "user_id"] + (["context_item_id", "query_id"] if count_context_ids else [])
    counts = aggregate_counts_by(ds, keys, before_ts)  # stats: the training part only; one pass
    item_ids, item_counts = counts["item_id"]
    user_ids, user_counts = counts["user_id"]
    context = query = None
    if count_context_ids:
        context, query = ((ids, c.sum(axis=1)) for ids, c in (counts["context_item_id"], counts["query_id"]))
    history = None
    if history_length > 0:
        from raycg.data.history import HistoryIndex

        history = HistoryIndex.build(history_paths or event_files(train_path))
    users = UserTable(user_ids, stats_from_counts(user_counts))
    if user_categorical:
        if not users_path:
            raise ValueError(f"data.user_categorical={list(user_categorical)} needs data.users_path")
        try:
            table = pq.read_table(users_path)
        except Exception as e:
            raise EventSchemaError(f"{users_path}: cannot read users table: {e}") from e
        users = users.with_attributes(table, list(user_categorical), users_path, users_quarantine_dir)
    return FeatureStore(items=items.with_stats(item_ids, item_counts), users=users,
                        history=history, history_length=history_length,
                        user_counts=(user_ids, user_counts.sum(axis=1)), item_counts=(item_ids, item_counts.sum(axis=1)),
                        context_counts=context, query_counts=query)


def feature_store_from_config(data_cfg: dict, history_length: int = 0,
                              history_paths: list[str] | None = None, quarantine_dir: str | None = None,
                              before_ts: int | None = None, count_context_ids: bool = False) -> FeatureStore:
    """`quarantine_dir` (with data.on_bad_rows=quarantine): where bad users-table rows go;
    `before_ts`: stats from the training split's events before it (validation_cutoff)."""
    quarantine = quarantine_dir if data_cfg["on_bad_rows"] == "quarantine" else None
    return build_feature_store(
        data_cfg["train_path"], data_cfg["items_path"], history_length, history_paths,
        item_categorical=data_cfg["item_categorical"], users_path=data_cfg["users_path"],
        user_categorical=data_cfg["user_categorical"], users_quarantine_dir=quarantine,
        before_ts=before_ts, count_context_ids=count_context_ids)


def validation_cutoff(train_path: str, fraction: float, sample_per_file: int = 20_000) -> int | None:
    """The start of the validation window: the timestamp from which about the last `fraction`
    of the training split's events lie at or after it (a quantile of event times, so a few
    stray early timestamps cannot stretch the window over the whole split), or None for
    fraction 0. Training uses the events before it; validation queries come from the events
    at or after it, never from the evaluation split.

    Each file contributes its own event times, or `sample_per_file` evenly spaced order
    statistics of them (weighted by its row count) when it has more: only the timestamp column
    is read."""
    if not fraction:
        return None
    if not 0 < fraction < 1:
        raise ValueError(f"data.validation_fraction={fraction}: expected 0 (off) or a number in (0, 1)")
    values, weights = [], []
    for path in nonempty_event_files(train_path)[0]:
        ts = np.sort(pq.read_table(path, columns=["timestamp"]).column("timestamp").to_numpy())
        if len(ts) > sample_per_file:
            w = len(ts) / sample_per_file
            ts = ts[np.linspace(0, len(ts) - 1, sample_per_file).round().astype(np.int64)]
        else:
            w = 1.0
        values.append(ts)
        weights.append(np.full(len(ts), w))
    ts, inverse = np.unique(np.concatenate(values), return_inverse=True)  # distinct times, ascending
    w = np.bincount(inverse.reshape(-1), weights=np.concatenate(weights))
    if len(ts) < 2:
        raise ValueError(f"{train_path}: every training event has the same timestamp; a validation window "
                         "needs at least two (data.validation_fraction=0 turns it off)")
    at_or_after = np.cumsum(w[::-1])[::-1] / w.sum()  # share of events at/after ts[k]
    k = 1 + int(np.argmin(np.abs(at_or_after[1:] - fraction)))  # the share closest to `fraction`
    return int(ts[k])


def packed_training_dataset(
    events_path: str, store: FeatureStore, *, batch_size: int = 8192, materialize: bool = True,
    hard_negatives: int = 0, seed: int = 0, quarantine_dir: str | None = None, check_duplicates: bool = True,
    preserve_order: bool = False, before_ts: int | None = None, shuffle: str = "none",
) -> tuple[ray.data.Dataset, dict]:
    """Packed positives (+ impression hard negatives) for training, and the row accounting:

        rows_read = rows_used (positives) + rows_not_positive (impressions)
                    + rows_quarantined + rows_validation (at/after `before_ts`, checked)

    With `quarantine_dir` bad rows go there instead of failing the run; that needs
    `materialize` (the quarantine is written once, by the materialising pass).

    `shuffle` (module docstring): "none" keeps the files' row order; "once" permutes all rows
    across files with `seed` before materialising (every epoch then reads the same order);
    "epoch" permutes them again before every pass (seeded by `seed` and the pass: reproducible,
    an all-to-all exchange per epoch).
    """
    if shuffle not in SHUFFLES:
        raise ValueError(f"data.shuffle={shuffle!r}: expected one of {', '.join(SHUFFLES)}")
    if quarantine_dir is not None and not materialize:
        raise ValueError("data.on_bad_rows=quarantine needs data.materialize=true")
    if quarantine_dir is not None and os.path.isdir(quarantine_dir):
        shutil.rmtree(quarantine_dir)  # recount from scratch (e.g. a resumed run)
    files, rows_read, empty = nonempty_event_files(events_path)
    ds = ray.data.read_parquet(files, columns=split_columns(files), include_paths=True)
    items = store.items
    store_ref = ray.put(store)
    stats = {"rows_read": rows_read, "files_empty": len(empty), "shuffle": str(shuffle)}
    imp_ref = None
    if hard_negatives > 0:
        from raycg.data.negatives import ImpressionIndex

        index = ImpressionIndex.build(event_files(events_path), items, before_ts)
        stats["impressions_indexed"] = len(index)
        imp_ref = ray.put(index)

    def pack(batch: pa.Table) -> dict:
        return pack_events(batch, ray.get(store_ref), impressions=ray.get(imp_ref) if imp_ref else None,
                           num_hard=hard_negatives, seed=seed, quarantine_dir=quarantine_dir,
                           check_duplicates=check_duplicates, before_ts=before_ts)

    ds = ds.map_batches(pack, batch_format="pyarrow", batch_size=batch_size)
    if preserve_order:  # blocks in file order, whatever order the tasks finish in (deterministic runs)
        ds.context.execution_options.preserve_order = True
    if shuffle == "once":
        ds = ds.random_shuffle(seed=seed)
    if materialize:
        ds = ds.materialize()
        stats["rows_used"] = ds.count()
        stats["rows_quarantined"] = 0
        if quarantine_dir is not None and os.path.isdir(quarantine_dir):
            stats["rows_quarantined"] = sum(pq.read_metadata(f).num_rows for f in event_files(quarantine_dir))
            stats["quarantine_dir"] = quarantine_dir
        stats["rows_validation"] = 0
        if before_ts is not None:  # checked rows at/after the cutoff (a footer-statistics-free count)
            stats["rows_validation"] = int(ds_validation_rows(files, before_ts, quarantine_dir))
        stats["rows_not_positive"] = (rows_read - stats["rows_used"] - stats["rows_quarantined"]
                                      - stats["rows_validation"])
    if shuffle == "epoch":
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds, stats


def ds_validation_rows(files: list[str], before_ts: int, quarantine_dir: str | None) -> int:
    """Rows at/after `before_ts` that were not quarantined (those are counted as quarantined)."""
    import pyarrow.dataset as pads

    n = pads.dataset(files, format="parquet").count_rows(filter=pc.field("timestamp") >= before_ts)
    if quarantine_dir is not None and os.path.isdir(quarantine_dir):
        q = pads.dataset(event_files(quarantine_dir), format="parquet")
        n -= q.count_rows(filter=pc.field("timestamp") >= before_ts)
    return n


def footer_max(files: list[str], column: str, cast=float, empty=-math.inf):
    """Largest value of a numeric column from Parquet row-group statistics (no data read; a
    file without statistics is read), as `cast` (int keeps 64-bit ids exact); `empty` when every
    file is empty."""
    best = empty
    for path in files:
        meta = pq.read_metadata(path)
        if meta.num_rows == 0:  # an empty shard has nothing to say
            continue
        idx = meta.schema.to_arrow_schema().get_field_index(column)
        for rg in range(meta.num_row_groups):
            stats = meta.row_group(rg).column(idx).statistics
            if stats is None or not stats.has_min_max:
                return max(best, cast(pq.read_table(path, columns=[column]).column(column).to_numpy().max()))
            best = max(best, cast(stats.max))
    return best


def max_from_footers(files: list[str], column: str) -> float:
    """Largest value of a numeric column (footer statistics); -inf when every file is empty."""
    return footer_max(files, column, float, -math.inf)


def max_id_from_footers(files: list[str], column: str) -> int:
    """Largest value of an integer column (footer statistics); -1 when every file is empty."""
    return footer_max(files, column, int, -1)


def auto_buckets(buckets: dict, max_buckets: int, events_path: str, items: ItemTable, users=None) -> dict:
    """Fill null (or absent) bucket counts from the data: max id + 2 (row 0 is 'missing'), capped."""
    extra = {name: (lambda i=i: int(items.cat[:, i].max())) for i, name in enumerate(items.cat_names) if i >= 3}
    if users is not None:
        extra.update({name: (lambda i=i: int(users.cat[:, i].max())) for i, name in enumerate(users.cat_names)})
    buckets = dict(buckets)
    for name in extra:
        buckets.setdefault(name, None)
    out = dict(buckets)
    files = event_files(events_path)
    sources = {
        "user": lambda: max_id_from_footers(files, "user_id"),
        "context_item": lambda: max(max_id_from_footers(files, "context_item_id"), int(items.item_id.max())),
        "query": lambda: max_id_from_footers(files, "query_id"),
        "item": lambda: int(items.cat[:, 0].max()),
        "advertiser": lambda: int(items.cat[:, 1].max()),
        "category": lambda: int(items.cat[:, 2].max()),
        **extra,
    }
    for name, value in buckets.items():
        if value is None:
            if name not in sources:
                raise ValueError(f"model.buckets.{name}: cannot size from data; set a number")
            out[name] = int(min(max(sources[name]() + 2, 2), max_buckets))
    return out
