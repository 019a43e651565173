"""Retrieval latency and throughput on CPU: raycg.retrieve over a realistic corpus.

Builds an export directory (torch.export towers, feature tables, item embeddings, faiss
index) from a *random-init* model of the default architecture (raycg/conf/model/parallel_dcn.yaml:
DCN v2 parallel towers, 64-d embeddings, history of 10 actions, id vocabularies) over a
synthetic corpus of --items items and --users users, then measures

  - single request: `Retriever.retrieve(k=...)` one request at a time (request checks,
    feature lookup, user tower, faiss search), p50 / p99 over --requests requests;
  - batch: `Retriever.retrieve_table` over --batch-requests requests in batches of
    --batch-size (in this process), requests/s; with --ray also the Ray Data batch mode
    (`retrieve_parquet`, one actor) end to end, Parquet in and out.

    python benchmarks/retrieve_latency.py                      # 100k items, exact (IndexFlatIP)
    python benchmarks/retrieve_latency.py --index ivf          # IVF instead (exact_max_items=0)
    python benchmarks/retrieve_latency.py --ray                # + the Ray Data batch mode

Recall and scores of a random model are meaningless; this measures time only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raycg.config import compose  # noqa: E402
from raycg.data.batches import FeatureStore, ItemTable  # noqa: E402
from raycg.data.features import UserTable  # noqa: E402
from raycg.data.history import ACTION_CODES  # noqa: E402
from raycg.data.spec import FeatureSpec  # noqa: E402
from raycg.model.repeat_match import history_lookup_length  # noqa: E402
from raycg.model.two_tower import TwoTowerModel  # noqa: E402
from raycg.retrieve import Retriever, retrieve_parquet  # noqa: E402
from raycg.retrieve.build import export_run  # noqa: E402

CONTENT_DIM = 32


def synthetic(items: int, users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    item_ids = np.sort(rng.choice(2**40, items, replace=False)).astype(np.int64)
    cat = np.stack([item_ids, rng.integers(0, 500, items), rng.integers(0, 50, items), rng.integers(0, 4, items)],
                   1).astype(np.int64)
    dense = rng.normal(size=(items, CONTENT_DIM + 6)).astype(np.float32)
    user_ids = np.arange(users, dtype=np.int64)
    store = FeatureStore(
        items=ItemTable(item_ids, cat, dense, content_dim=CONTENT_DIM,
                        cat_names=("item", "advertiser", "category", "tier")),
        users=UserTable(user_ids, rng.normal(size=(users, 6)).astype(np.float32),
                        rng.integers(0, 8, (users, 1)).astype(np.int64), ("segment",)))
    cfg = OmegaConf.to_container(compose([]).model, resolve=True)  # the default model group (parallel_dcn)
    vocab = {"item": item_ids, "user": user_ids, "context_item": item_ids, "query": np.arange(1000),
             "advertiser": np.arange(500), "category": np.arange(50), "tier": np.arange(4), "segment": np.arange(8)}
    cfg["vocab_sizes"] = {k: len(v) for k, v in vocab.items()}
    cfg["buckets"] = {**{k: 1 + cfg["vocab"]["oov_buckets"] + len(v) for k, v in vocab.items()}, "surface": 8}
    spec = FeatureSpec(user_cat=["user", "surface", "context_item", "query", "segment"],
                       item_cat=["item", "advertiser", "category", "tier"], user_dense=6 + CONTENT_DIM,
                       item_dense=CONTENT_DIM + 6, history_length=history_lookup_length(cfg["history"]))
    torch.manual_seed(seed)
    model = TwoTowerModel(cfg, spec).eval()
    model.set_vocabularies(vocab)
    return model, store


def requests(n: int, store: FeatureStore, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    surface = rng.choice(["home", "related", "search"], n)
    lengths = rng.integers(0, 15, n)
    flat = rng.choice(store.items.item_id, lengths.sum())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({
        "user_id": rng.integers(0, len(store.users.user_id) + 1000, n),  # some users unknown
        "surface": surface,
        "context_item_id": np.where(surface == "related", rng.choice(store.items.item_id, n), -1),
        "query_id": np.where(surface == "search", rng.integers(0, 1200, n), -1),
        "recent_item_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
        "recent_event_types": pa.ListArray.from_arrays(
            offsets, pa.array(rng.choice(list(ACTION_CODES), lengths.sum()).tolist()))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch-requests", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads of the retriever")
    p.add_argument("--ray", action="store_true", help="also time the Ray Data batch mode")
    p.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(max(a.threads, 1))
    out = a.out or os.path.join(tempfile.mkdtemp(prefix="raycg-retrieve-"), "export")
    index_cfg = {**OmegaConf.to_container(compose([]).index, resolve=True), "recall_k": a.k}  # raycg/conf/config.yaml
    if a.index != "flat":
        index_cfg.update(exact_max_items=0, kind=a.index)
    model, store = synthetic(a.items, a.users)
    t0 = time.perf_counter()
    reqs = requests(max(a.requests, a.batch_requests), store)
    # recall of the approximate index against exact search, on synthetic requests here
    export_run(model, store, out, index_cfg, use_ray=False)
    if a.index != "flat":
        from raycg.retrieve.build import write_index
        import json

        layout = json.load(open(os.path.join(out, "index.json")))["tables"]
        write_index(out, store, layout, model.spec.history_length, index_cfg, reqs.slice(0, 2000), use_ray=False)
        from raycg.checksums import write_checksums

        write_checksums(out, list(json.load(open(os.path.join(out, "checksums.json")))))
    print(f"export: {a.items:,} items, {a.index} index -> {out} in {time.perf_counter() - t0:.1f}s")
    r = Retriever(out, threads=a.threads)
    rows = reqs.slice(0, a.requests).to_pylist()
    for row in rows[:20]:  # warm-up
        r.retrieve(k=a.k, **row)
    lat, c0 = [], time.process_time()
    for row in rows:
        t = time.perf_counter()
        r.retrieve(k=a.k, **row)
        lat.append(time.perf_counter() - t)
    cpu = (time.process_time() - c0) / len(rows) * 1e3  # CPU time of this process: less sensitive to a loaded box
    lat = np.array(lat) * 1e3
    print(f"single request (k={a.k}, {a.threads} thread(s), {len(lat)} requests): p50 {np.percentile(lat, 50):.2f} ms, "
          f"p99 {np.percentile(lat, 99):.2f} ms, mean {lat.mean():.2f} ms wall, {cpu:.2f} ms CPU per request")
    batch = reqs.slice(0, a.batch_requests)
    t, c0 = time.perf_counter(), time.process_time()
    for s in range(0, batch.num_rows, a.batch_size):
        r.retrieve_table(batch.slice(s, a.batch_size), k=a.k)
    secs, cpu = time.perf_counter() - t, time.process_time() - c0
    print(f"batch in-process (k={a.k}, batches of {a.batch_size}, {a.threads} thread(s)): {batch.num_rows:,} requests "
          f"in {secs:.1f}s = {batch.num_rows / secs:,.0f} requests/s wall ({batch.num_rows / cpu:,.0f} per CPU-second)")
    if a.ray:
        import ray

        from raycg.train.driver import init_ray

        init_ray(compose(["ray.num_cpus=2", "ray.include_dashboard=false"]))  # embedded, loopback only
        path = os.path.join(os.path.dirname(out), "requests.parquet")
        pq.write_table(batch, path)
        t = time.perf_counter()
        n = retrieve_parquet(out, path, os.path.join(os.path.dirname(out), "top.parquet"), a.k, a.batch_size)
        secs = time.perf_counter() - t
        print(f"batch Ray Data map_batches (1 actor, end to end incl. actor start, Parquet in/out): {n:,} requests "
              f"in {secs:.1f}s = {n / secs:,.0f} requests/s")
        ray.shutdown()


if __name__ == "__main__":
    main()
