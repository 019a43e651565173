"""Distributed batch inference with Ray Data: corpus items and eval queries -> embeddings.

Both run as `map_batches` over an actor that loads the checkpoint once; features come from
the same `FeatureStore` the training rows were packed with (shipped via the object store).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from raycg.train.checkpoint import load_model


class ItemEmbedder:
    """map_batches callable: item-table rows -> {item_id, embedding}."""

    def __init__(self, checkpoint_dir: str, store_ref: list):
        torch.set_num_threads(1)
        self.model, _ = load_model(checkpoint_dir)
        self.items = ray.get(store_ref[0]).items

    def __call__(self, batch: pa.Table) -> dict:
        ids = batch.column("item_id").to_numpy().astype(np.int64)
        packed = self.items.pack(self.items.rows(ids, "items"))
        with torch.no_grad():
            emb = self.model.embed_items({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()})
        return {"item_id": ids, "embedding": emb.numpy()}


class QueryEmbedder:
    """map_batches callable: query rows (user_id, surface, context_item_id, query_id, timestamp) -> embedding."""

    def __init__(self, checkpoint_dir: str, store_ref: list):
        torch.set_num_threads(1)
        self.model, _ = load_model(checkpoint_dir)
        self.store = ray.get(store_ref[0])

    def __call__(self, batch: pa.Table) -> dict:
        packed = self.store.pack_users(batch)
        with torch.no_grad():
            emb = self.model.embed_users({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()})
        return {"row": batch.column("row").to_numpy(), "embedding": emb.numpy()}


def _collect(ds: ray.data.Dataset, key: str) -> tuple[np.ndarray, np.ndarray]:
    keys, embs = [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keys.append(b[key])
        embs.append(b["embedding"])
    return np.concatenate(keys), np.concatenate(embs).astype(np.float32)


def embed_corpus(items_path: str, checkpoint_dir: str, store_ref: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(item ids sorted ascending, embeddings [N, d]) for the whole item table."""
    ds = ray.data.read_parquet(items_path, columns=["item_id"]).map_batches(
        ItemEmbedder, fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "store_ref": store_ref},
        batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1),
    )
    ids, emb = _collect(ds, "item_id")
    order = np.argsort(ids)
    return ids[order], emb[order]


def embed_queries(queries: pa.Table, checkpoint_dir: str, store_ref: list, batch_size: int) -> np.ndarray:
    """Embeddings [Q, d] in the row order of `queries`."""
    table = queries.append_column("row", pa.array(np.arange(queries.num_rows, dtype=np.int64)))
    ds = ray.data.from_arrow(table).map_batches(
        QueryEmbedder, fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "store_ref": store_ref},
        batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1),
    )
    rows, emb = _collect(ds, "row")
    out = np.empty_like(emb)
    out[rows] = emb
    return out
