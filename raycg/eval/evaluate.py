"""Evaluate a checkpoint: recall@K for conversion and engagement, model vs popularity.

    python -m raycg.evaluate run_dir=runs/<name>
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import ray

from raycg.data.pipeline import event_files, feature_store_from_config

from raycg.eval.baselines import popularity_ranking
from raycg.eval.embed import embed_corpus, embed_queries
from raycg.eval.queries import TASKS, build_queries, read_event_columns
from raycg.eval.recall import exact_top_k, recall_at_k


def evaluate_checkpoint(checkpoint_dir: str, data_cfg: dict, eval_cfg: dict, log=print,
                        history_length: int = 0, store=None) -> dict:
    """Features come from the training split exactly as for training (`store`, the training
    run's FeatureStore, or rebuilt when None); the history index also sees the eval split
    (lookups only use events strictly before each query)."""
    ks = sorted(int(k) for k in eval_cfg["ks"])
    t_start = time.perf_counter()
    history_files = event_files(data_cfg["train_path"]) + event_files(data_cfg["eval_path"])
    if store is None:
        store = feature_store_from_config(data_cfg, history_length, history_files)
    elif history_length > 0:
        from raycg.data.history import HistoryIndex

        store = dataclasses.replace(store, history=HistoryIndex.build(history_files))
    store_ref = [ray.put(store)]
    log(f"[raycg] eval: embedding the item corpus {data_cfg['items_path']} (Ray Data)")
    corpus_ids, item_emb = embed_corpus(data_cfg["items_path"], checkpoint_dir, store_ref,
                                        eval_cfg["inference_batch_size"])
    eval_events = read_event_columns(
        data_cfg["eval_path"], ["user_id", "item_id", "surface", "event_type", "context_item_id", "query_id",
                                "timestamp"])
    train_events = read_event_columns(data_cfg["train_path"], ["item_id", "event_type"])
    results: dict = {"ks": ks, "n_items": int(len(corpus_ids)), "model": {}, "popularity": {}, "n_queries": {}}
    faiss_s = 0.0
    for task in TASKS:
        queries, positives = build_queries(eval_events, task)
        results["n_queries"][task] = len(positives)
        if not positives:
            log(f"[raycg] eval: no {task} queries in the eval split")
            continue
        log(f"[raycg] eval: {task}: {len(positives):,} queries, exact search over {len(corpus_ids):,} items")
        q_emb = embed_queries(queries, checkpoint_dir, store_ref, eval_cfg["query_batch_size"])
        top_rows, secs = exact_top_k(item_emb, q_emb, max(ks), eval_cfg["query_batch_size"], eval_cfg.get("faiss_threads"))
        faiss_s += secs
        results["model"][task] = recall_at_k(corpus_ids[top_rows], positives, ks)
        pop = popularity_ranking(train_events, task, corpus_ids, max(ks))
        results["popularity"][task] = recall_at_k(np.broadcast_to(pop, (len(positives), len(pop))), positives, ks)
    results["seconds"] = {"total": time.perf_counter() - t_start, "faiss": faiss_s}
    return results


def format_table(results: dict) -> str:
    ks = results["ks"]
    cols = [(task, k) for task in TASKS for k in ks]
    head = f"{'method':<12}" + "".join(f"{task[:4]} R@{k:<6}" for task, k in cols)
    lines = [head, "-" * len(head)]
    for method in ("model", "popularity"):
        cells = []
        for task, k in cols:
            v = results[method].get(task, {}).get(k, results[method].get(task, {}).get(str(k)))
            cells.append(f"{v:>11.4f}" if v is not None else f"{'n/a':>11}")
        lines.append(f"{method:<12}" + "".join(cells))
    nq = results["n_queries"]
    lines.append(f"queries: " + ", ".join(f"{t} {nq.get(t, 0):,}" for t in TASKS) + f"; corpus {results['n_items']:,} items")
    return "\n".join(lines)


def write_results(run_dir: str, results: dict) -> str:
    path = os.path.join(run_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path
