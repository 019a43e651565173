"""After training: the export directory a retriever loads (raycg.retrieve.Retriever).

    <export>/user_tower.pt2, item_tower.pt2, feature_spec.json   raycg.model.export (torch.export)
    <export>/items.parquet, users.parquet     feature tables (raycg.retrieve.tables)
    <export>/item_embeddings.parquet          item_id, embedding (list<float32>), sorted by item_id:
                                              the exported item tower over items.parquet, run as
                                              Ray Data batch inference (map_batches)
    <export>/items.faiss                      the item index (raycg.retrieve.index; row i = item i
                                              of item_embeddings.parquet)
    <export>/index.json                       format_version, index kind and parameters, build
                                              seconds, recall@k of the index against exact search
                                              on the evaluation queries, the tables' layout
    <export>/checksums.json                   SHA-256 of all of the above

`export_run` writes all of it (the driver calls it at the end of a run; `python -m
raycg.export` for an existing run).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raycg.checksums import write_checksums
from raycg.data.batches import FeatureStore
from raycg.data.history import ACTION_CODES, HistoryIndex
from raycg.logs import get_logger
from raycg.model.export import FORMAT_VERSION, SPEC_FILE, TOWER_FILES, export_towers, item_inputs, load_tower
from raycg.retrieve.index import build_index, index_recall, settings
from raycg.retrieve.requests import check_requests
from raycg.retrieve.retriever import EMBEDDINGS_FILE, INDEX_FILE, INDEX_META, embed_requests
from raycg.retrieve.tables import ITEMS_FILE, USERS_FILE, column_matrix, matrix_column, write_tables

ACTION_NAMES = np.array([""] + list(ACTION_CODES), dtype=object)  # code -> event type


class ItemTowerEmbedder:
    """map_batches callable: rows of items.parquet -> {item_id, embedding} by the exported item tower."""

    def __init__(self, export_dir: str, layout: dict):
        torch.set_num_threads(1)
        self.tower, self.layout = load_tower(export_dir, "item_tower"), layout

    def __call__(self, batch: pa.Table) -> dict:
        cat = column_matrix(batch, "item_cat", len(self.layout["item_cat_names"]), np.int64)
        dense = column_matrix(batch, "item_dense", self.layout["item_dense"], np.float32)
        with torch.no_grad():
            emb = self.tower(*item_inputs({"item_cat": torch.from_numpy(cat), "item_dense": torch.from_numpy(dense)}))
        return {"item_id": batch.column("item_id").to_numpy().astype(np.int64), "embedding": emb.numpy()}


logger = get_logger("export")


def embed_items(export_dir: str, layout: dict, batch_size: int = 4096, use_ray: bool = True,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(item ids ascending, embeddings [N, E]) of items.parquet: Ray Data `map_batches` over one
    actor with `use_ray` (Ray must be initialised), else in this process."""
    path = os.path.join(export_dir, ITEMS_FILE)
    if use_ray:
        import ray

        ds = ray.data.read_parquet(path).map_batches(
            ItemTowerEmbedder, fn_constructor_kwargs={"export_dir": os.path.abspath(export_dir), "layout": layout},
            batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1))
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    else:
        table, embedder = pq.read_table(path), ItemTowerEmbedder(export_dir, layout)
        batches = [embedder(table.slice(s, batch_size)) for s in range(0, max(table.num_rows, 1), batch_size)]
    ids = np.concatenate([b["item_id"] for b in batches])
    emb = np.concatenate([np.asarray(b["embedding"], np.float32).reshape(len(b["item_id"]), -1) for b in batches])
    order = np.argsort(ids, kind="stable")
    return ids[order], emb[order]


def requests_from_queries(queries: pa.Table, history: HistoryIndex | None, history_length: int) -> pa.Table:
    """Evaluation queries (QUERY_KEYS + timestamp, raycg.eval.queries) as retrieval requests:
    the recent actions are the user's last `history_length` actions strictly before the query
    time, exactly what evaluation feeds the history encoder."""
    cols = {c: queries.column(c) for c in ("user_id", "surface", "context_item_id", "query_id")}
    n = queries.num_rows
    if history is not None and history_length > 0:
        items, actions = history.lookup(queries.column("user_id").to_numpy(), queries.column("timestamp").to_numpy(),
                                        history_length)
        keep = actions != 0  # padding is left: the kept entries stay most recent last
        offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int32))
        cols["recent_item_ids"] = pa.ListArray.from_arrays(offsets, pa.array(items[keep], pa.int64()))
        cols["recent_event_types"] = pa.ListArray.from_arrays(
            offsets, pa.array(ACTION_NAMES[actions[keep]].tolist(), pa.string()))
    elif n:
        empty = pa.array(np.zeros(n + 1, np.int32))
        cols["recent_item_ids"] = pa.ListArray.from_arrays(empty, pa.array([], pa.int64()))
        cols["recent_event_types"] = pa.ListArray.from_arrays(empty, pa.array([], pa.string()))
    return pa.table(cols)


def evaluation_requests(eval_events: pa.Table, history: HistoryIndex | None, history_length: int,
                        max_queries: int, seed: int = 0) -> pa.Table:
    """The evaluation queries of both tasks (at most `max_queries`, a seeded sample) as requests."""
    from raycg.eval.queries import TASKS, build_queries  # eval sits below this package

    tables = [build_queries(eval_events, task)[0] for task in TASKS]
    queries = pa.concat_tables([t.select(tables[0].column_names).cast(tables[0].schema) for t in tables])
    if queries.num_rows > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(queries.num_rows, max_queries, replace=False))
        queries = queries.take(pa.array(rows))
    return requests_from_queries(queries, history, history_length)


def write_index(export_dir: str, store: FeatureStore, layout: dict, history_length: int, index_cfg: dict | None,
                requests: pa.Table | None = None, use_ray: bool = True, log=None,
                popularity_weights: tuple[float, float] = (1.0, 1.0),
                recent_boost: tuple[int, float, str] = (0, 0.0, "off")) -> dict:
    """Item embeddings -> item_embeddings.parquet, the faiss index -> items.faiss, index.json
    (recall against exact search on `requests`, when given); returns index.json's content, or
    None without faiss (a GPU host may lack it): then the embeddings are written, the index is not."""
    cfg = settings(index_cfg)
    t0 = time.perf_counter()
    ids, emb = embed_items(export_dir, layout, cfg["batch_size"], use_ray)
    embed_s = time.perf_counter() - t0
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": matrix_column(emb)}),
                   os.path.join(export_dir, EMBEDDINGS_FILE))
    try:
        import faiss
    except ImportError:
        logger.warning(f"export: {len(ids):,} item embeddings written, but faiss is not installed here, so there is "
                       f"no item index ({INDEX_FILE}): `pip install faiss-cpu`, then `python -m raycg.export "
                       f"run_dir=<this run>` writes it (raycg.retrieve needs it)")
        for stale in (INDEX_FILE, INDEX_META):  # of an earlier export into this directory
            if os.path.exists(os.path.join(export_dir, stale)):
                os.remove(os.path.join(export_dir, stale))
        return None
    index, desc = build_index(emb, cfg)
    faiss.write_index(index, os.path.join(export_dir, INDEX_FILE))
    meta = {"format_version": FORMAT_VERSION, **desc, "embed_s": round(embed_s, 3), "tables": layout,
            "new_users": cfg["new_users"],  # and the weights of its popularity (ItemTable.popular): the loss's
            "new_users_weights": {"conversion": float(popularity_weights[0]), "engagement": float(popularity_weights[1])},
            # the served score of the request's recent items (raycg.model.recent_boost)
            "recent_items": int(recent_boost[0]), "recent_boost": float(recent_boost[1]),
            "recent_boost_source": recent_boost[2]}
    if requests is not None and requests.num_rows:
        checked = check_requests(requests, "evaluation queries")
        user = load_tower(export_dir, "user_tower")
        q_emb = embed_requests(user, store, history_length, checked)
        k = min(int(cfg["recall_k"]), len(ids))
        meta["recall"] = {"k": k, "value": index_recall(index, emb, q_emb, k), "n_queries": checked.num_rows,
                          "queries": "evaluation split (conversion and engagement queries)"}
    else:
        meta["recall"] = {"k": int(cfg["recall_k"]), "value": 1.0 if desc["exact"] else None, "n_queries": 0,
                          "queries": "none (no evaluation queries given)"}
    with open(os.path.join(export_dir, INDEX_META), "w") as f:
        json.dump(meta, f, indent=2)
    r = meta["recall"]
    (log or logger.info)(f"export: {len(ids):,} item embeddings ({embed_s:.1f}s), {desc['kind']} index "
        f"({desc['build_s']:.1f}s); recall@{r['k']} vs exact search "
        + (f"{r['value']:.4f} on {r['n_queries']:,} evaluation queries" if r["n_queries"] else "not measured"))
    return meta


def export_run(model, store: FeatureStore, export_dir: str, index_cfg: dict | None = None,
               eval_events: pa.Table | None = None, history: HistoryIndex | None = None,
               train_path: str | None = None, use_ray: bool = True, seed: int = 0, log=None,
               ray_min_rows: int = 0, popularity_weights: tuple[float, float] = (1.0, 1.0),
               recent_boost: tuple[int, float, str] = (0, 0.0, "off")) -> str:
    """Towers (torch.export), feature tables, item embeddings, item index and checksums ->
    `export_dir`. With `eval_events`, the index's recall is measured on the evaluation
    queries; their histories come from `history`, else from `train_path` + `eval_events`.
    The items are embedded by Ray Data actors with `use_ray` from `ray_min_rows` items up (the
    run's eval.ray_inference_min_rows), in this process otherwise. `popularity_weights` (the
    loss's conversion and engagement weights) rank the items that `index.new_users=popularity`
    serves; `recent_boost` (N, b, source: raycg.model.checkpoint.recent_boost) goes to index.json
    and the Retriever serves it."""
    cfg = settings(index_cfg)
    use_ray = use_ray and len(store.items.item_id) >= ray_min_rows
    export_towers(model, export_dir)
    layout = write_tables(store, export_dir)
    length = int(model.spec.history_length)
    requests = None
    if eval_events is not None and eval_events.num_rows:
        if history is None and length > 0 and train_path is not None:
            from raycg.data.pipeline import event_files

            history = HistoryIndex.build(event_files(train_path), extra=eval_events)
        requests = evaluation_requests(eval_events, history, length, int(cfg["recall_queries"]), seed)
    indexed = write_index(export_dir, store, layout, length, cfg, requests, use_ray, log,
                          popularity_weights, recent_boost) is not None
    write_checksums(export_dir, [*TOWER_FILES.values(), SPEC_FILE, ITEMS_FILE, USERS_FILE, EMBEDDINGS_FILE,
                                 *([INDEX_FILE, INDEX_META] if indexed else [])])
    return export_dir
