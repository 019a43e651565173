"""The feature tables an export carries, so that `<run>/export/` alone turns raw ids into
tower inputs (raycg.retrieve.requests) and re-embeds the corpus:

    <export>/items.parquet   item_id, item_cat (list<int64>), item_dense (list<float32>): the
                             item-tower inputs of every corpus item (ItemTable.pack), sorted by
                             item_id; the first `content_dim` values of item_dense are the
                             content embedding, which the user tower reads for a context item
    <export>/users.parquet   user_id, user_dense (training-window stats), user_cat (the
                             users-table attributes, e.g. age_range), sorted by user_id

Matrices are stored as list columns (one list per row, equal lengths); widths and names are
in index.json (raycg.retrieve.build).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycg.data.batches import FeatureStore, ItemTable
from raycg.data.features import UserTable

ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"


def matrix_column(m: np.ndarray) -> pa.Array:
    """[N, W] -> a list column of N lists of W values (W may be 0)."""
    n, w = m.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * w)
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(m).reshape(-1)))


def column_matrix(table: pa.Table, name: str, width: int, dtype) -> np.ndarray:
    """A list column of `width` values per row -> [N, width]."""
    col = table.column(name).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    return np.array(values, dtype=dtype).reshape(table.num_rows, width)  # a writable copy (torch.from_numpy)


def write_tables(store: FeatureStore, out_dir: str) -> dict:
    """items.parquet + users.parquet of `store` -> `out_dir`; returns their layout for index.json."""
    items, users = store.items, store.users
    pq.write_table(pa.table({"item_id": pa.array(items.item_id, pa.int64()),
                             "item_cat": matrix_column(items.cat.astype(np.int64)),
                             "item_dense": matrix_column(items.dense.astype(np.float32))}),
                   os.path.join(out_dir, ITEMS_FILE))
    pq.write_table(pa.table({"user_id": pa.array(users.user_id, pa.int64()),
                             "user_dense": matrix_column(users.dense.astype(np.float32)),
                             "user_cat": matrix_column(users.cat.astype(np.int64))}),
                   os.path.join(out_dir, USERS_FILE))
    return {"item_cat_names": list(items.cat_names), "item_dense": int(items.dense_dim),
            "content_dim": int(items.content_dim), "user_cat_names": list(users.cat_names),
            "user_dense": int(users.dense.shape[1])}


def read_items(export_dir: str, layout: dict) -> ItemTable:
    table = pq.read_table(os.path.join(export_dir, ITEMS_FILE))
    return ItemTable(item_id=table.column("item_id").to_numpy().astype(np.int64),
                     cat=column_matrix(table, "item_cat", len(layout["item_cat_names"]), np.int64),
                     dense=column_matrix(table, "item_dense", layout["item_dense"], np.float32),
                     source=os.path.join(export_dir, ITEMS_FILE), content_dim=layout["content_dim"],
                     cat_names=tuple(layout["item_cat_names"]))


def read_users(export_dir: str, layout: dict) -> UserTable:
    table = pq.read_table(os.path.join(export_dir, USERS_FILE))
    return UserTable(user_id=table.column("user_id").to_numpy().astype(np.int64),
                     dense=column_matrix(table, "user_dense", layout["user_dense"], np.float32),
                     cat=column_matrix(table, "user_cat", len(layout["user_cat_names"]), np.int64),
                     cat_names=tuple(layout["user_cat_names"]))
