"""The data-directory layout on disk, shared by every data source (the simulator and the log
converters write it; the pipeline reads it):

    <dir>/items.parquet  <dir>/users.parquet  <dir>/events/{train,eval}/part-*.parquet  <dir>/meta.json

Here: the time split into train and eval events and the writing of event shards.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def time_split(events: pa.Table, cutoff_ts: int) -> tuple[pa.Table, pa.Table]:
    """Train = events strictly before the cutoff; eval = at or after it."""
    ts = events.column("timestamp").to_numpy()
    return events.filter(pa.array(ts < cutoff_ts)), events.filter(pa.array(ts >= cutoff_ts))


def clear_shards(out_dir: str) -> None:
    """This layout is ours: drop the event shards of an earlier simulation in `out_dir`."""
    for split in ("train", "eval"):
        d = os.path.join(out_dir, "events", split)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.startswith("part-") and (f.endswith(".parquet") or f.endswith(".parquet.tmp")):
                os.remove(os.path.join(d, f))


def write_shards(table: pa.Table, directory: str, num_shards: int, seed: int) -> list[str]:
    """Shuffle rows (so in-batch negatives are not all one user's session) and shard."""
    os.makedirs(directory, exist_ok=True)
    perm = np.random.default_rng(seed).permutation(table.num_rows)
    table = table.take(pa.array(perm))
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), num_shards)):
        path = os.path.join(directory, f"part-{i:05d}.parquet")
        pq.write_table(table.slice(int(chunk[0]), len(chunk)) if len(chunk) else table.slice(0, 0), path)
        paths.append(path)
    return paths


def write_atomic(table: pa.Table, path: str) -> None:
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a retried or killed task never leaves a half-written shard
