"""Distributed batch inference with Ray Data: corpus items and eval queries -> embeddings.

Both run as `map_batches` over an actor that loads the checkpoint once; features come from
the same `FeatureStore` the training rows were packed with (shipped via the object store).
With `use_gpu` the actor asks Ray for a GPU and runs the tower there. Fewer rows than
`ray_min_rows` are embedded in this process by the same callables instead: starting an actor
pool costs seconds (5-9 s for 300 items on a 2-core machine), more than the towers take. Progress: a tqdm bar over
the rows collected on the driver (raycg.logs.progress: on a terminal only); Ray Data's own
progress bars stay off (raycg.train.driver.init_ray), one line per operator is too much here.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import torch

from raycg.logs import progress
from raycg.model.checkpoint import load_model


class _Embedder:
    """Loads the checkpoint once per actor, onto the GPU Ray gave it (if any)."""

    def __init__(self, checkpoint_dir: str, store_ref: list, use_gpu: bool = False, in_actor: bool = True):
        if in_actor:
            torch.set_num_threads(1)  # one actor per CPU Ray gave it
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, _ = load_model(checkpoint_dir)
        self.model = model.to(self.device)
        self.store = ray.get(store_ref[0])

    def embed(self, fn, packed: dict) -> np.ndarray:
        with torch.no_grad():
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in packed.items()}
            return fn(batch).float().cpu().numpy()

    def items(self, batch: pa.Table) -> dict:
        """item-table rows -> {item_id, embedding}"""
        ids = batch.column("item_id").to_numpy().astype(np.int64)
        items = self.store.items
        return {"item_id": ids, "embedding": self.embed(self.model.embed_items, items.pack(items.rows(ids, "items")))}

    def queries(self, batch: pa.Table) -> dict:
        """query rows (user_id, surface, context_item_id, query_id, timestamp, row) -> {row, embedding}"""
        return {"row": batch.column("row").to_numpy(),
                "embedding": self.embed(self.model.embed_users, self.store.pack_users(batch))}


class ItemEmbedder(_Embedder):
    """map_batches callable: item-table rows -> {item_id, embedding}."""

    __call__ = _Embedder.items


class QueryEmbedder(_Embedder):
    """map_batches callable: query rows (user_id, surface, context_item_id, query_id, timestamp) -> embedding."""

    __call__ = _Embedder.queries


def _collect(ds: ray.data.Dataset, key: str, total: int | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    keys, embs = [], []
    with progress(total=total, desc=desc, unit="rows") as bar:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys.append(b[key])
            embs.append(b["embedding"])
            bar.update(len(b[key]))
    return np.concatenate(keys), np.concatenate(embs).astype(np.float32)


def _row_count(path: str) -> int | None:
    """Rows of a Parquet file or directory from its footers; None (a bar without ETA) if unknown."""
    try:
        return pads.dataset(path, format="parquet").count_rows()
    except (OSError, ValueError, pa.ArrowException):  # the bar is cosmetic: never fail evaluation for it
        return None


def _map_kwargs(checkpoint_dir: str, store_ref: list, batch_size: int, use_gpu: bool, actor_gpus: float) -> dict:
    return dict(fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "store_ref": store_ref, "use_gpu": use_gpu},
                batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1),
                num_gpus=actor_gpus if use_gpu else 0)


GPU_IN_PROCESS_BATCH = 65536  # rows per tower call when this process embeds on its GPU


def _in_process(what: str, table: pa.Table, key: str, checkpoint_dir: str, store_ref: list, batch_size: int,
                use_gpu: bool, loaded: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The actor's work (`what`: "items" or "queries") in this process: (key column, embeddings).
    `loaded`: a dict the caller keeps for one evaluation, so that the corpus and every query
    batch share one loaded checkpoint (a 1M-item model takes ~0.7 s to build and load on a CPU)."""
    use_gpu = use_gpu and torch.cuda.is_available()
    loaded = {} if loaded is None else loaded
    if (checkpoint_dir, use_gpu) not in loaded:
        loaded[(checkpoint_dir, use_gpu)] = _Embedder(checkpoint_dir, store_ref, use_gpu=use_gpu, in_actor=False)
    embedder = loaded[(checkpoint_dir, use_gpu)]
    if embedder.device.type == "cuda":  # the towers take microseconds there: fewer, larger batches
        batch_size = max(batch_size, GPU_IN_PROCESS_BATCH)
    keys, embs = [], []
    for start in range(0, table.num_rows, batch_size):
        out = getattr(embedder, what)(table.slice(start, batch_size))
        keys.append(out[key])
        embs.append(out["embedding"])
    return np.concatenate(keys), np.concatenate(embs).astype(np.float32)


def embed_corpus(items_path: str, checkpoint_dir: str, store_ref: list, batch_size: int,
                 use_gpu: bool = False, ray_min_rows: int = 0, actor_gpus: float = 1,
                 loaded: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids sorted ascending, embeddings [N, d]) for the whole item table; Ray Data actors
    from `ray_min_rows` items up, this process below (`loaded`: see `_in_process`)."""
    n = _row_count(items_path)
    if n is not None and n < ray_min_rows:
        ids, emb = _in_process("items", pads.dataset(items_path, format="parquet").to_table(columns=["item_id"]),
                               "item_id", checkpoint_dir, store_ref, batch_size, use_gpu, loaded)
    else:
        ds = ray.data.read_parquet(items_path, columns=["item_id"]).map_batches(
            ItemEmbedder, **_map_kwargs(checkpoint_dir, store_ref, batch_size, use_gpu, actor_gpus))
        ids, emb = _collect(ds, "item_id", n, "embedding the item corpus")
    order = np.argsort(ids)
    return ids[order], emb[order]


def embed_queries(queries: pa.Table, checkpoint_dir: str, store_ref: list, batch_size: int,
                  use_gpu: bool = False, ray_min_rows: int = 0, actor_gpus: float = 1,
                  loaded: dict | None = None) -> np.ndarray:
    """Embeddings [Q, d] in the row order of `queries`; Ray Data actors from `ray_min_rows`
    queries up, this process below (`loaded`: see `_in_process`)."""
    table = queries.append_column("row", pa.array(np.arange(queries.num_rows, dtype=np.int64)))
    if queries.num_rows < ray_min_rows:
        return _in_process("queries", table, "row", checkpoint_dir, store_ref, batch_size, use_gpu, loaded)[1]
    ds = ray.data.from_arrow(table).map_batches(
        QueryEmbedder, **_map_kwargs(checkpoint_dir, store_ref, batch_size, use_gpu, actor_gpus))
    rows, emb = _collect(ds, "row", queries.num_rows, "embedding queries")
    out = np.empty_like(emb)
    out[rows] = emb
    return out
