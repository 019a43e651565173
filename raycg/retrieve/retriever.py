"""Retrieval from an export directory: raw request context -> top-K item ids with scores.

    r = Retriever("runs/<name>/export")
    ids, scores = r.retrieve(user_id=42, surface="related", context_item_id=7,
                             recent_item_ids=[3, 9], recent_event_types=["click", "save"], k=100)
    out = r.retrieve_table(requests, k=100)     # Arrow table in, + item_ids / scores list columns
    retrieve_parquet(export_dir, "requests.parquet", "top.parquet", k=100)   # Ray Data map_batches

A request with nothing to go on (its user has no training-window event, and it carries no
recent actions and no context item or query; `FeatureStore.new_users`) gets the popular items
(training-window conversions and clicks + saves, weighted by the loss's conversion and
engagement weights) when the export was written with `index.new_users=popularity` (the
default; index.json says which), with NaN scores: the user tower would give every such
request the same generic query, and evaluation measured the popularity list as the better
answer on real logs (docs/real_logs.md).

The request's recent items (the distinct items of its last `recent_items` recent actions) score
`recent_boost` higher than their inner product (raycg.model.recent_boost; index.json holds both,
fitted on the training run's validation window): the index's top-K merged with them, so a
boosted item's score is its inner product + the boost.

A request is packed into user-tower inputs by the same code as training and evaluation rows
(`FeatureStore.pack_users`, over the export's own feature tables), embedded by the exported
user tower (torch.export) and searched in the export's faiss index. Scores are inner products
of unit vectors (cosine similarity; the training logits are these / temperature).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycg.data.batches import FeatureStore
from raycg.model.export import FORMAT_VERSION, ExportError, load_tower, read_meta, user_inputs
from raycg.model.recent_boost import distinct_recent, merge_recent, recent_scores, rows_of
from raycg.retrieve.index import search
from raycg.retrieve.requests import RequestError, check_requests, has_recent_actions, recent_actions, request_table
from raycg.retrieve.tables import ITEMS_FILE, USERS_FILE, column_matrix, read_items, read_users

INDEX_FILE = "items.faiss"
EMBEDDINGS_FILE = "item_embeddings.parquet"
INDEX_META = "index.json"
RETRIEVAL_FILES = (ITEMS_FILE, USERS_FILE, EMBEDDINGS_FILE, INDEX_FILE, INDEX_META)


def pack_requests(store: FeatureStore, history_length: int, requests: pa.Table) -> dict[str, np.ndarray]:
    """User-tower inputs of checked requests: `FeatureStore.pack_users` (as training and
    evaluation rows) with the history from the requests' recent actions (never from a history
    index the store may hold: a training run's store has one)."""
    if store.history is not None:
        store = FeatureStore(items=store.items, users=store.users)
    out = store.pack_users(requests)
    if history_length:
        out["hist_items"], out["hist_actions"] = recent_actions(requests, history_length)
    return out


def embed_requests(user_tower, store: FeatureStore, history_length: int, requests: pa.Table,
                   batch_size: int = 4096) -> np.ndarray:
    """[B, E] user embeddings of checked requests by an exported user tower."""
    out = []
    for s in range(0, max(requests.num_rows, 1), batch_size):
        packed = pack_requests(store, history_length, requests.slice(s, batch_size))
        with torch.no_grad():
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()}
            out.append(user_tower(*user_inputs(batch)).numpy())
    return np.concatenate(out)


class Retriever:
    """A loaded export: the user tower, the feature tables and the item index."""

    def __init__(self, export_dir: str, threads: int | None = None):
        self.meta = read_meta(export_dir)  # directory, checksums (every listed file), format_version
        for name in RETRIEVAL_FILES:
            if not os.path.exists(os.path.join(export_dir, name)):
                raise ExportError(f"{os.path.join(export_dir, name)}: missing; this export has no item index "
                                  "(python -m raycg.export run_dir=<run> writes one)")
        with open(os.path.join(export_dir, INDEX_META)) as f:
            self.index_meta = json.load(f)
        if self.index_meta.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{export_dir}/{INDEX_META}: format_version {self.index_meta.get('format_version')}, "
                              f"this raycg reads {FORMAT_VERSION}; re-export the run")
        if threads:
            torch.set_num_threads(int(threads))
        import faiss

        if threads:
            faiss.omp_set_num_threads(int(threads))
        self.export_dir = export_dir
        self.user_tower = load_tower(export_dir, "user_tower")
        layout = self.index_meta["tables"]
        self.store = FeatureStore(items=read_items(export_dir, layout), users=read_users(export_dir, layout))
        self.history_length = int(self.meta.get("history_length", 0))
        self.recent_items = int(self.index_meta.get("recent_items", 0))  # absent: an export before the boost
        self.recent_boost = float(self.index_meta.get("recent_boost", 0.0))
        boosted = self.recent_items > 0 and self.recent_boost > 0
        embeddings = pq.read_table(os.path.join(export_dir, EMBEDDINGS_FILE),
                                   columns=["item_id", "embedding"] if boosted else ["item_id"])
        self.item_ids = embeddings.column("item_id").to_numpy().astype(np.int64)
        self.item_emb = None  # [I, E] rows of item_ids: the recent items' scores
        if boosted:
            if np.any(np.diff(self.item_ids) <= 0):
                raise ExportError(f"{export_dir}/{EMBEDDINGS_FILE}: item ids are not sorted and unique")
            width = len(embeddings.column("embedding")[0]) if embeddings.num_rows else 0
            self.item_emb = torch.from_numpy(column_matrix(embeddings, "embedding", width, np.float32))
        self.new_users = self.index_meta.get("new_users", "model")  # absent: an export before 2026-12
        weights = self.index_meta.get("new_users_weights", {"conversion": 1.0, "engagement": 1.0})
        self.popular = (self.store.items.popular(len(self.store.items.item_id), weights["conversion"],
                                                 weights["engagement"]) if self.new_users == "popularity" else None)
        self.index = faiss.read_index(os.path.join(export_dir, INDEX_FILE))
        if self.index.ntotal != len(self.item_ids):
            raise ExportError(f"{export_dir}: {INDEX_FILE} holds {self.index.ntotal} vectors, {EMBEDDINGS_FILE} "
                              f"{len(self.item_ids)} items")

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def pack(self, requests: pa.Table) -> dict[str, np.ndarray]:
        """User-tower inputs of checked requests (check_requests)."""
        return pack_requests(self.store, self.history_length, requests)

    def embed(self, requests: pa.Table) -> np.ndarray:
        """[B, E] user embeddings of checked requests."""
        return embed_requests(self.user_tower, self.store, self.history_length, requests)

    def search(self, requests: pa.Table, k: int, source: str = "request") -> tuple[np.ndarray, np.ndarray]:
        """(item ids [B, k], scores [B, k]) best first, for a table of requests (checked here)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise RequestError(f"k={k!r}: expected a positive integer")
        checked = check_requests(requests, source)
        if checked.num_rows == 0:
            k = min(int(k), self.num_items)
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        q_emb = self.embed(checked)
        rows, scores = search(self.index, q_emb, k)
        if self.item_emb is not None:
            recent = rows_of(distinct_recent(recent_actions(checked, self.recent_items)[0]), self.item_ids)
            rec_s = recent_scores(torch.from_numpy(q_emb), self.item_emb, torch.from_numpy(recent))
            rows, scores = (t.numpy() for t in merge_recent(rows, scores, recent, rec_s, self.recent_boost))
        ids = np.where(rows >= 0, self.item_ids[rows.clip(min=0)], -1)  # -1: an approximate index found fewer
        if self.popular is not None:
            new = self.store.new_users(checked, has_recent_actions(checked) if self.history_length
                                       else np.zeros(len(ids), bool))
            n = min(ids.shape[1], len(self.popular))
            ids[new] = -1
            ids[new, :n] = self.popular[:n]
            scores[new] = np.nan
        return ids, scores

    def retrieve(self, k: int = 100, **request) -> tuple[np.ndarray, np.ndarray]:
        """One request (fields of raycg.retrieve.requests) -> (item ids [k], scores [k])."""
        ids, scores = self.search(request_table([request]), k)
        return ids[0], scores[0]

    def retrieve_table(self, requests: pa.Table, k: int = 100) -> pa.Table:
        """`requests` with two list columns added: item_ids (int64) and scores (float32), best first."""
        ids, scores = self.search(requests, k)
        n, k = ids.shape
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        return (requests.append_column("item_ids", pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))))
                .append_column("scores", pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1)))))


class BatchRetriever:
    """map_batches callable: loads the export once per actor."""

    def __init__(self, export_dir: str, k: int, threads: int = 1):
        self.retriever, self.k = Retriever(export_dir, threads=threads), k

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.retriever.retrieve_table(batch, self.k)


def retrieve_parquet(export_dir: str, input_path: str, output_path: str, k: int = 100, batch_size: int = 1024,
                     actors: int = 1, cpus_per_actor: float = 1.0) -> int:
    """Every request row of the Parquet file/directory `input_path` -> `output_path` (one
    Parquet file: the input columns + item_ids + scores, in input order), with Ray Data
    `map_batches` over `actors` actors; returns the number of rows. Ray must be initialised."""
    import ray

    read_meta(export_dir)  # a bad export fails here, not inside an actor
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = ray.data.read_parquet(input_path).map_batches(
            BatchRetriever, fn_constructor_kwargs={"export_dir": os.path.abspath(export_dir), "k": int(k)},
            batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor)
        rows, writer = 0, None
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if writer is None:
                    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
                    writer = pq.ParquetWriter(output_path, batch.schema)
                writer.write_table(batch)
                rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
    finally:
        ctx.execution_options.preserve_order = preserve
    return rows
