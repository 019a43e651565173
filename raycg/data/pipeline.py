"""Ray Data pipelines: event shards -> packed training batches.

    read_parquet (footers checked on the driver first)
      -> map_batches(pack_events)   vectorised validation + item-table join + packing
      -> [materialize]              optional: keep packed blocks in the object store so
                                    later epochs skip decode/pack (fast when it fits)
"""
from __future__ import annotations

import glob
import os

import pyarrow as pa
import ray

from raycg.data.batches import ItemTable, pack_events
from raycg.data.schema import EVENT_COLUMNS, EventSchemaError, check_parquet_files


def event_files(path: str) -> list[str]:
    """All *.parquet files under `path` (a file or a directory), sorted."""
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise EventSchemaError(f"{path}: no Parquet files found")
    return files


def read_events(path: str) -> tuple[ray.data.Dataset, int]:
    """Events as a Ray dataset (with a `path` column for error messages) + row count."""
    files = event_files(path)
    n_rows = check_parquet_files(files)
    ds = ray.data.read_parquet(
        files, columns=[c.name for c in EVENT_COLUMNS], include_paths=True
    )
    return ds, n_rows


def packed_training_dataset(
    events_path: str, items: ItemTable, *, batch_size: int = 8192, materialize: bool = True
) -> tuple[ray.data.Dataset, dict]:
    """Packed positives for training and the row accounting for the log."""
    ds, rows_read = read_events(events_path)
    items_ref = ray.put(items)

    def pack(batch: pa.Table) -> dict:
        return pack_events(batch, ray.get(items_ref))

    ds = ds.map_batches(pack, batch_format="pyarrow", batch_size=batch_size)
    stats = {"rows_read": rows_read}
    if materialize:
        ds = ds.materialize()
        stats["rows_used"] = ds.count()
        stats["rows_not_positive"] = rows_read - stats["rows_used"]
    return ds, stats
