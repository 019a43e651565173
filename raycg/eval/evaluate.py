"""Evaluate a checkpoint: recall@K for conversion and engagement, model vs popularity.

    python -m raycg.evaluate run_dir=runs/<name>
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from raycg.data.history import HistoryIndex
from raycg.data.pipeline import checked_events, event_files, feature_store_from_config, validation_cutoff

from raycg.eval.baselines import ALSBaseline, popularity_ranking, surface_popularity_rankings
from raycg.eval.embed import embed_corpus_and_queries
from raycg.eval.queries import TASKS, build_queries, drop_cold, drop_cold_positives, read_event_columns
from raycg.eval.recall import exact_top_k, recall_report
from raycg.eval.reengagement import EngagementTimeline


BASELINES = ("popularity", "popularity_surface", "recent_engaged", "als_engagement", "als_conversion")
PARTS = ("repeat", "novel")  # positives the user acted on before the query time, and the others


def _fit_baselines(names: list[str], train_events, corpus_ids: np.ndarray, eval_cfg: dict, seed: int, log) -> dict:
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"eval.baselines: unknown {unknown}; choose from {list(BASELINES)}")
    fitted = {}
    for name in names:
        if name.startswith("als_"):
            t0 = time.perf_counter()
            als = ALSBaseline.fit(train_events, name[len("als_"):], corpus_ids, seed=seed,
                                  **{k: v for k, v in (eval_cfg.get("als") or {}).items()})
            fitted[name] = als
            log(f"[raycg] eval: {name}: ALS on {als.n_interactions:,} training user-item pairs, "
                f"{len(als.user_ids):,} users ({time.perf_counter() - t0:.1f}s)")
    return fitted


DEVICES = ("auto", "cpu", "cuda")


def eval_devices(setting: str) -> tuple[bool, str]:
    """`eval.device` -> (embed on GPU actors, top-K device). auto: GPU actors when the Ray
    cluster has GPUs, top-K on the GPU when this (driver) process sees one, else faiss."""
    if setting not in DEVICES:
        raise ValueError(f"eval.device={setting!r}: expected one of {list(DEVICES)}")
    if setting == "cpu":
        return False, "cpu"
    if setting == "cuda":
        return True, "cuda"
    return ray.cluster_resources().get("GPU", 0) > 0, "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_checkpoint(checkpoint_dir: str, data_cfg: dict, eval_cfg: dict, log=print,
                        history_length: int = 0, store=None, seed: int = 0, eval_split=None,
                        quarantine_dir: str | None = None) -> dict:
    """Features come from the training split exactly as for training (`store`, the training
    run's FeatureStore, or rebuilt when None); the history index also sees the eval split
    (lookups only use events strictly before each query). Baselines (`eval.baselines`) are
    fitted on the same training split and scored on the same queries.

    The eval split is value-checked like the training split (`checked_events`; bad rows fail
    the run, or go to `quarantine_dir` with `data.on_bad_rows=quarantine`); `eval_split` =
    (events, row accounting) when the driver has checked it already. The accounting is
    written to the results as `eval_rows`."""
    ks = sorted(int(k) for k in eval_cfg["ks"])
    embed_gpu, search_device = eval_devices(eval_cfg.get("device", "auto"))
    baselines = list(eval_cfg.get("baselines", ["popularity"]))
    methods = ["model", *baselines]
    t_start = time.perf_counter()
    if store is None:  # as the training run built it: stats from before its validation window
        store = feature_store_from_config(data_cfg, before_ts=validation_cutoff(
            data_cfg["train_path"], data_cfg.get("validation_fraction", 0)))
    if eval_split is None:
        quarantine = quarantine_dir if data_cfg.get("on_bad_rows") == "quarantine" else None
        eval_split = checked_events(data_cfg["eval_path"], store, quarantine_dir=quarantine,
                                    check_duplicates=data_cfg.get("check_duplicates", True))
    eval_events, eval_rows = eval_split
    # every action of the training split and the checked eval split: the history feature,
    # repeat/novel positives and the recent_engaged baseline (lookups only see the past)
    actions = HistoryIndex.build(event_files(data_cfg["train_path"]), extra=eval_events)
    timeline = EngagementTimeline(actions)
    if history_length > 0:
        store = dataclasses.replace(store, history_length=history_length, history=actions)
    store_ref = [ray.put(store)]
    train_events = read_event_columns(data_cfg["train_path"], ["user_id", "item_id", "event_type", "surface"])
    known_items = None
    if drop_cold(eval_cfg.get("cold_items", "auto"), data_cfg["items_path"]):
        known_items = np.unique(train_events.column("item_id").to_numpy())
        log(f"[raycg] eval: the item table was derived from the log: positives on the "
            f"{len(store.items.item_id) - len(known_items):,} items without a training-split event are left out "
            "(eval.cold_items=auto; they are in the corpus only because they are engaged later)")
    task_queries, cold_dropped = {}, {}
    for task in TASKS:
        queries, positives = build_queries(eval_events, task)
        if known_items is not None:
            queries, positives, cold_dropped[task] = drop_cold_positives(queries, positives, known_items)
        task_queries[task] = (queries, positives)
    log(f"[raycg] eval: embedding the item corpus {data_cfg['items_path']} and the queries (one Ray Data pipeline, "
        f"{'GPU' if embed_gpu else 'CPU'} actors; exact top-K on {search_device})")
    corpus_ids, item_emb, all_q_emb = embed_corpus_and_queries(
        store.items.item_id, pa.concat_tables([q for q, _ in task_queries.values()], promote_options="default"),
        checkpoint_dir, store_ref, eval_cfg["inference_batch_size"], use_gpu=embed_gpu)
    q_embs, start = {}, 0
    for task, (queries, _) in task_queries.items():
        q_embs[task], start = all_q_emb[start:start + queries.num_rows], start + queries.num_rows
    t_base = time.perf_counter()
    fitted = _fit_baselines(baselines, train_events, corpus_ids, eval_cfg, seed, log)
    baseline_s = time.perf_counter() - t_base
    results: dict = {"ks": ks, "n_items": int(len(corpus_ids)), "methods": methods, "n_queries": {},
                     "eval_rows": eval_rows, "repeat_share": {}, "cold_dropped": cold_dropped,
                     "detail": {m: {} for m in methods}, "als_coverage": {}, **{m: {} for m in methods}}
    adv_of = store.items.cat[:, 1][np.searchsorted(store.items.item_id, corpus_ids)]  # advertiser per corpus row
    search_s = 0.0
    K = max(ks)
    for task in TASKS:
        queries, positives = task_queries[task]
        results["n_queries"][task] = len(positives)
        if not positives:
            log(f"[raycg] eval: no {task} queries in the eval split")
            continue
        log(f"[raycg] eval: {task}: {len(positives):,} queries, exact search over {len(corpus_ids):,} items")
        q_emb = q_embs[task]
        top_rows, secs = exact_top_k(item_emb, q_emb, K, eval_cfg["query_batch_size"], eval_cfg.get("faiss_threads"),
                                     search_device)
        search_s += secs
        surfaces = queries.column("surface").to_numpy(zero_copy_only=False).astype(str)
        users = queries.column("user_id").to_numpy()
        times = queries.column("timestamp").to_numpy()
        adv_pos = [np.unique(adv_of[np.searchsorted(corpus_ids, p)]) for p in positives]
        repeat = timeline.repeat_masks(users, times, positives)
        n_pos = sum(len(p) for p in positives)
        results["repeat_share"][task] = float(sum(int(r.sum()) for r in repeat) / n_pos)
        parts = {}
        for part in PARTS:
            keep = [r if part == "repeat" else ~r for r in repeat]
            idx = np.array([q for q, k in enumerate(keep) if k.any()], dtype=np.int64)
            parts[part] = (idx, [positives[q][keep[q]] for q in idx])
            results["n_queries"][f"{task}_{part}"] = len(idx)
        log(f"[raycg] eval: {task}: {100 * results['repeat_share'][task]:.1f}% of positives are repeat (the user "
            f"acted on the item before the query time)")
        t_base = time.perf_counter()
        for method in methods:
            if method == "model":
                top = corpus_ids[top_rows]
            elif method == "popularity":
                pop = popularity_ranking(train_events, task, corpus_ids, K)
                top = np.broadcast_to(pop, (len(positives), len(pop)))
            elif method == "recent_engaged":
                top = timeline.recent_engaged(users, times, K, popularity_ranking(train_events, task, corpus_ids, K))
            elif method == "popularity_surface":
                per_surface = surface_popularity_rankings(train_events, task, corpus_ids, K, surfaces)
                names = sorted(per_surface)
                top = np.stack([per_surface[n] for n in names])[np.searchsorted(names, surfaces)]
            else:
                top, _ = fitted[method].top_k(users, K, eval_cfg["query_batch_size"], eval_cfg.get("faiss_threads"),
                                              search_device)
                results["als_coverage"].setdefault(method, {})[task] = fitted[method].coverage(users)
            report = recall_report(top, positives, ks, groups=surfaces)
            results[method][task] = {k: v["mean"] for k, v in report.items()}
            results["detail"][method][task] = report
            for part, (idx, pos) in parts.items():
                if len(idx):
                    report = recall_report(np.asarray(top)[idx], pos, ks, groups=surfaces[idx])
                    results[method][f"{task}_{part}"] = {k: v["mean"] for k, v in report.items()}
                    results["detail"][method][f"{task}_{part}"] = report
            if task == "conversion":
                # advertiser level: the held-out conversion's advertiser among the top-K items' advertisers
                report = recall_report(adv_of[np.searchsorted(corpus_ids, top)], adv_pos, ks, groups=surfaces)
                results[method]["conversion_advertiser"] = {k: v["mean"] for k, v in report.items()}
                results["detail"][method]["conversion_advertiser"] = report
            del top
        if task == "conversion":
            results["n_queries"]["conversion_advertiser"] = len(adv_pos)
        baseline_s += time.perf_counter() - t_base
    results["seconds"] = {"total": time.perf_counter() - t_start, "search": search_s,
                          "scoring_and_baselines": baseline_s}
    results["search_backend"] = "faiss" if search_device == "cpu" else f"torch ({search_device})"
    return results


def timing_line(results: dict, path: str) -> str:
    sec = results["seconds"]
    return (f"[raycg] eval: exact search ({results.get('search_backend', 'faiss')}) {sec['search']:.1f}s of "
            f"{sec['total']:.1f}s total (baselines and recall scoring {sec['scoring_and_baselines']:.1f}s); "
            f"results -> {path}")


def _get(d: dict, k):
    return d.get(k, d.get(str(k)))


def _recall_rows(results: dict, tasks: list[str], short: dict, width: int = 12) -> list[str]:
    ks = results["ks"]
    cols = [(task, k) for task in tasks for k in ks]
    head = f"{'method':<20}" + "".join(f"{short[t] + ' R@' + str(k):>{width}}" for t, k in cols)
    lines = [head, "-" * len(head)]
    for method in results.get("methods", ["model", "popularity"]):
        cells = [_get(results[method].get(task, {}), k) for task, k in cols]
        lines.append(f"{method:<20}" + "".join(f"{v:>{width}.4f}" if v is not None else f"{'n/a':>{width}}"
                                               for v in cells))
    return lines


def format_table(results: dict) -> str:
    """Main table (recall@K per task, advertiser level), repeat vs novel positives, and the
    model's per-surface recall with 95% intervals."""
    ks = results["ks"]
    tasks = [t for t in ("conversion", "engagement", "conversion_advertiser") if t in results["model"]]
    short = {"conversion": "conv", "engagement": "enga", "conversion_advertiser": "adv"}
    lines = _recall_rows(results, tasks, short)
    nq = results["n_queries"]
    lines.append("queries: " + ", ".join(f"{t} {nq.get(t, 0):,}" for t in TASKS) + f"; corpus {results['n_items']:,} items")
    cold = results.get("cold_dropped") or {}
    if cold:
        lines.append("left out (items without a training event; eval.cold_items): " + ", ".join(
            f"{t} {c['positives']:,} positives ({c['queries']:,} queries)" for t, c in cold.items()))
    split = [f"{t}_{p}" for t in TASKS for p in PARTS if f"{t}_{p}" in results["model"]]
    if split:
        share = results.get("repeat_share", {})
        lines += ["", "repeat positives (the user acted on the item before the query time) vs novel ones: "
                  + ", ".join(f"{t} {100 * share[t]:.0f}% repeat" for t in TASKS if t in share)]
        lines += _recall_rows(results, split, {f"{t}_{p}": f"{short[t]}-{p[:3]}" for t in TASKS for p in PARTS}, 16)
        lines.append("queries: " + ", ".join(f"{t} {nq.get(t, 0):,}" for t in split))
    detail = results.get("detail", {}).get("model", {})
    if detail:
        k = ks[0]
        lines.append(f"model recall@{k}: mean [95% bootstrap interval] and per surface")
        for task in tasks:
            entry = _get(detail.get(task, {}), k)
            if entry:
                surf = ", ".join(f"{g} {v:.4f}" for g, v in entry.get("by_group", {}).items())
                lines.append(f"  {task:<22} {entry['mean']:.4f} [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]  {surf}")
    return "\n".join(lines)


def write_results(run_dir: str, results: dict) -> str:
    path = os.path.join(run_dir, "eval.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path
