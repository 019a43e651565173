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
import torch

from raycg.data.history import HistoryIndex
from raycg.data.lookup import find_sorted, unique_ids
from raycg.data.pipeline import checked_events, event_files, feature_store_from_config, validation_cutoff

from raycg.eval.embed import embed_corpus, embed_queries
from raycg.eval.queries import (TASKS, build_queries, drop_cold, drop_cold_positives, read_event_columns,
                                 sample_queries)
from raycg.eval.recall import flat_positive_ranks, recall_report_from_ranks, shared_positive_ranks
from raycg.eval.reengagement import EngagementTimeline
from raycg.eval.retrievers import ModelRetriever, Queries, Retriever, TrainingWindow, build_baselines
from raycg.logs import PhaseTimes, get_logger
from raycg.model.recent_boost import distinct_recent, rows_of


PARTS = ("repeat", "novel")  # positives the user acted on before the query time, and the others
USER_PARTS = ("known_user", "new_user")  # queries whose user has a training-split event, and the others


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


def embed_in_driver(setting: str, search_device: str) -> bool:
    """eval.device=auto on a one-node Ray cluster whose driver sees a GPU: the towers run in this
    process on that GPU rather than in Ray Data actors. Nothing is distributed on one node, and
    each actor pool costs its start, a CUDA context and a copy of the feature store: on one H200,
    1M items x 113k queries took 30.3 s through actors and 15.7 s here (docs/gpu.md)."""
    return (setting == "auto" and torch.device(search_device).type == "cuda"
            and sum(1 for node in ray.nodes() if node.get("Alive")) == 1)


def evaluate_checkpoint(checkpoint_dir: str, data_cfg: dict, eval_cfg: dict, log=get_logger("eval").info,
                        history_length: int = 0, store=None, seed: int = 0, eval_split=None,
                        quarantine_dir: str | None = None, new_users: str = "model",
                        popularity_weights: tuple[float, float] = (1.0, 1.0),
                        recent_boost: tuple[int, float, str] = (0, 0.0, "off")) -> dict:
    """Features come from the training split exactly as for training (`store`, the training
    run's FeatureStore, or rebuilt when None); the history index also sees the eval split
    (lookups only use events strictly before each query). Baselines (`eval.baselines`) are
    fitted on the same training split; the model and they are retrievers
    (raycg.eval.retrievers), scored on the same queries by `score_retrievers`.

    The eval split is value-checked like the training split (`checked_events`; bad rows fail
    the run, or go to `quarantine_dir` with `data.on_bad_rows=quarantine`); `eval_split` =
    (events, row accounting) when the driver has checked it already. The accounting is
    written to the results as `eval_rows`.

    `new_users` (index.new_users): "popularity" answers the queries of users with no
    training-window event, no earlier action and no context (FeatureStore.new_users) with the
    popular items (ItemTable.popular with `popularity_weights` = the loss's (conversion_weight,
    engagement_weight)), as the exported Retriever does; "model": the towers.

    `recent_boost` (N, b, where b came from; raycg.model.checkpoint.recent_boost): the distinct
    items of each user's last N actions before the query score b higher
    (raycg.model.recent_boost), as the exported Retriever serves them; b = 0: the towers alone."""
    ks = sorted(int(k) for k in eval_cfg["ks"])
    embed_gpu, search_device = eval_devices(eval_cfg["device"])
    baselines = list(eval_cfg["baselines"])
    t_start = time.perf_counter()
    phases = PhaseTimes()
    if store is None:  # as the training run built it: stats from before its validation window
        with phases("feature store"):
            store = feature_store_from_config(data_cfg, before_ts=validation_cutoff(
                data_cfg["train_path"], data_cfg["validation_fraction"]))
    if eval_split is None:
        quarantine = quarantine_dir if data_cfg["on_bad_rows"] == "quarantine" else None
        with phases("eval split read + checks"):
            eval_split = checked_events(data_cfg["eval_path"], store, quarantine_dir=quarantine,
                                        check_duplicates=data_cfg["check_duplicates"])
    eval_events, eval_rows = eval_split
    # every action of the training split and the checked eval split: the history feature,
    # repeat/novel positives and the recent_engaged baseline (lookups only see the past)
    with phases("action history + timeline"):
        actions = HistoryIndex.build(event_files(data_cfg["train_path"]), extra=eval_events)
        timeline = EngagementTimeline(actions)
    if history_length > 0:
        store = dataclasses.replace(store, history_length=history_length, history=actions)
    with phases("feature store to the object store"):
        store_ref = [ray.put(store)]
    ray_min = int(eval_cfg["ray_inference_min_rows"])
    if embed_in_driver(eval_cfg["device"], search_device):
        ray_min = 1 << 62
        log(f"eval: embedding the item corpus {data_cfg['items_path']} in this process on its GPU (one-node "
            "cluster: Ray Data actors would add their start and the feature store's transfer); exact top-K there")
    else:
        log(f"eval: embedding the item corpus {data_cfg['items_path']} (Ray Data, {'GPU' if embed_gpu else 'CPU'} "
            f"actors, or this process below {ray_min:,} rows; exact top-K on {search_device})")
    towers = {}  # the checkpoint, loaded once for the corpus and the queries embedded in this process
    with phases("corpus embedding"):
        corpus_ids, item_emb = embed_corpus(data_cfg["items_path"], checkpoint_dir, store_ref,
                                            eval_cfg["inference_batch_size"], use_gpu=embed_gpu,
                                            ray_min_rows=ray_min, actor_gpus=eval_cfg["actor_gpus"], loaded=towers)
    with phases("training events read"):
        train_events = read_event_columns(data_cfg["train_path"], ["user_id", "item_id", "event_type", "surface"],
                                          dictionary=("event_type", "surface"))
    known_items = None
    if drop_cold(eval_cfg["cold_items"], data_cfg["items_path"]):
        known_items = unique_ids(train_events.column("item_id").to_numpy())
        log(f"eval: the item table was derived from the log: positives on the "
            f"{len(corpus_ids) - len(known_items):,} items without a training-split event are left out "
            "(eval.cold_items=auto; they are in the corpus only because they are engaged later)")
    t_base = time.perf_counter()
    with phases("baselines fit"):
        window = TrainingWindow(train_events, corpus_ids, timeline, eval_cfg, seed, search_device, log)
        retrievers = build_baselines(baselines, window)
    baseline_s = time.perf_counter() - t_base

    def embed(queries):  # the query tower (Ray Data batch inference from ray_min rows)
        return embed_queries(queries, checkpoint_dir, store_ref, eval_cfg["query_batch_size"], use_gpu=embed_gpu,
                             ray_min_rows=ray_min, actor_gpus=eval_cfg["actor_gpus"], loaded=towers)

    fallback = None
    if new_users == "popularity":  # the served Retriever's rule: FeatureStore.new_users
        def is_new(queries: Queries) -> np.ndarray:
            recent = (actions.lookup(queries.users, queries.times, 1)[0][:, 0] >= 0 if history_length > 0
                      else np.zeros(len(queries), dtype=bool))
            return store.new_users(queries.table, recent)

        fallback = (is_new, store.items.popular(max(ks), *popularity_weights))
    n_recent, boost, boost_source = recent_boost

    def recent_rows(queries: Queries) -> np.ndarray:  # the served rule: the request's recent actions
        return rows_of(distinct_recent(actions.lookup(queries.users, queries.times, n_recent)[0]), corpus_ids)

    if n_recent > 0:
        log(f"eval: recent-item boost {boost:.4g} ({boost_source}) on the distinct items of each user's last "
            f"{n_recent} actions before the query")
    model = ModelRetriever(corpus_ids, item_emb, embed, eval_cfg["query_batch_size"], eval_cfg["faiss_threads"],
                           search_device, new_users=fallback, recent=(recent_rows, boost) if n_recent > 0 else None)
    adv_of = store.items.cat[:, 1][np.searchsorted(store.items.item_id, corpus_ids)]  # advertiser per corpus row
    known_users = unique_ids(train_events.column("user_id").to_numpy())
    results, seconds = score_retrievers([model, *retrievers], eval_events, ks, corpus_ids, adv_of, timeline,
                                        known_items, log, known_users=known_users, phases=phases,
                                        max_queries=eval_cfg.get("max_queries"), seed=seed)
    results["eval_rows"] = eval_rows
    results["recent_boost"] = {"items": n_recent, "boost": boost, "source": boost_source}
    results["new_users"] = {"policy": new_users, "served_popularity": model.served_popularity,
                            "popularity_weights": {"conversion": popularity_weights[0],
                                                   "engagement": popularity_weights[1]}}
    # baselines and recall scoring: fitting, then every retriever's ranking and scoring but the model's
    baseline_s += seconds["scoring"] - seconds["retrieve"][model.name]
    # the model's retrieve phases split into query embedding and exact search
    retrieve_s = sum(phases.seconds.pop(f"{task}: model retrieve", 0.0) for task in TASKS)
    phases.add("model query embedding", model.embed_s)
    phases.add("model exact search", model.search_s)
    phases.add("model recent-item boost", model.boost_s)
    phases.add("model id mapping + new-user rule", retrieve_s - model.embed_s - model.search_s - model.boost_s)
    results["seconds"] = {"total": time.perf_counter() - t_start, "search": model.search_s,
                          "scoring_and_baselines": baseline_s, "phases": phases.seconds}
    results["search_backend"] = "faiss" if search_device == "cpu" else f"torch ({search_device})"
    return results


def score_retrievers(retrievers: list[Retriever], eval_events, ks: list[int], corpus_ids: np.ndarray,
                     adv_of: np.ndarray, timeline: EngagementTimeline, known_items: np.ndarray | None = None,
                     log=get_logger("eval").info, known_users: np.ndarray | None = None,
                     phases: PhaseTimes | None = None, max_queries: int | None = None,
                     seed: int = 0) -> tuple[dict, dict]:
    """Every retriever on the same queries of each task (raycg.eval.queries.build_queries):
    recall@K with bootstrap intervals and per surface, for repeat and novel positives apart
    (`timeline`), and for conversions at the advertiser level (`adv_of`: the advertiser of
    each corpus row). `known_items`: positives on other items are left out (eval.cold_items).
    `known_users` (the users with a training-split event): queries are also split into
    `<task>_known_user` and `<task>_new_user` (cold-start users, whose query tower sees no
    history or id of their own), with `new_user_share` per task. (The training split includes
    its validation window; `index.new_users` asks the feature store, whose statistics stop
    before that window, so a user seen only in it is "known" here and new to that rule.)
    `max_queries` (eval.max_queries): each task scores a uniform sample of that many queries
    (fixed by `seed`), recorded under `sampled_queries` as {"used", "of"}.

    Returns (results, seconds): results as in eval.json (one block per retriever name);
    seconds = {"retrieve": time in each retriever's `retrieve`, "scoring": retrieving and
    scoring altogether}."""
    methods = [r.name for r in retrievers]
    results: dict = {"ks": ks, "n_items": int(len(corpus_ids)), "methods": methods, "n_queries": {},
                     "repeat_share": {}, "new_user_share": {}, "cold_dropped": {}, "sampled_queries": {},
                     "detail": {m: {} for m in methods}, "als_coverage": {}, **{m: {} for m in methods}}
    seconds = {"retrieve": {m: 0.0 for m in methods}, "scoring": 0.0}
    phases = phases or PhaseTimes()
    K = max(ks)
    for task in TASKS:
        with phases(f"{task}: queries"):
            queries, positives = build_queries(eval_events, task)
            if known_items is not None:
                queries, positives, results["cold_dropped"][task] = drop_cold_positives(queries, positives,
                                                                                        known_items)
            n_all = len(positives)
            queries, positives = sample_queries(queries, positives, max_queries, seed)
            if len(positives) < n_all:
                results["sampled_queries"][task] = {"used": len(positives), "of": n_all}
                log(f"eval: {task}: scoring a uniform sample of {len(positives):,} of {n_all:,} queries "
                    "(eval.max_queries)")
        results["n_queries"][task] = len(positives)
        if not positives:
            log(f"eval: no {task} queries in the eval split")
            continue
        log(f"eval: {task}: {len(positives):,} queries over {len(corpus_ids):,} items, {len(methods)} methods")
        t_task = time.perf_counter()
        batch = Queries.of(task, queries)
        users, times = batch.users, batch.times
        surface_names, surfaces = np.unique(batch.surfaces, return_inverse=True)  # codes: no string sort per report
        surface_names = surface_names.tolist()
        lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
        # subsets of one task's queries, as flat masks over all positives (query q's are
        # lengths[q] consecutive entries): each part's ranks are read off the full ranking pass
        repeat = timeline.repeat_flags(users, times, lengths, np.concatenate(positives))
        results["repeat_share"][task] = float(repeat.mean())
        parts = {"repeat": repeat, "novel": ~repeat}
        log(f"eval: {task}: {100 * results['repeat_share'][task]:.1f}% of positives are repeat (the user "
            f"acted on the item before the query time)")
        if known_users is not None:
            known = np.isin(users, known_users)
            results["new_user_share"][task] = float((~known).mean())
            parts.update({"known_user": np.repeat(known, lengths), "new_user": np.repeat(~known, lengths)})
            log(f"eval: {task}: {100 * results['new_user_share'][task]:.1f}% of queries are new users (no "
                f"training-split event)")
        starts = np.cumsum(lengths) - lengths
        subsets = {}
        for part, flat_mask in parts.items():
            per_query = np.add.reduceat(flat_mask.astype(np.int64), starts)
            subsets[part] = (flat_mask, per_query[per_query > 0], per_query > 0)
            results["n_queries"][f"{task}_{part}"] = int((per_query > 0).sum())
        if task == "conversion":  # advertiser level: the conversion's advertisers among the top-K items' ones
            adv_pos = [np.unique(adv_of[np.searchsorted(corpus_ids, p)]) for p in positives]
            results["n_queries"]["conversion_advertiser"] = len(adv_pos)
        positive_rows = None  # the positives as corpus rows, for retrievers that rank rows
        seconds["scoring"] += time.perf_counter() - t_task
        phases.add(f"{task}: repeat / new-user split", time.perf_counter() - t_task)
        for retriever in retrievers:
            method = retriever.name
            t0 = time.perf_counter()
            with phases(f"{task}: {method} retrieve"):
                rows = hasattr(retriever, "retrieve_rows")  # corpus rows, compared with the positives' rows
                if rows:
                    top, which = retriever.retrieve_rows(batch, K), None
                elif hasattr(retriever, "shared"):  # a few lists shared by the queries: ranked by lookup
                    top, which = retriever.shared(batch, K)
                else:
                    top, which = retriever.retrieve(batch, K), None
            seconds["retrieve"][method] += time.perf_counter() - t0
            t_score = time.perf_counter()
            if hasattr(retriever, "coverage"):
                results["als_coverage"].setdefault(method, {})[task] = retriever.coverage(batch)
            with phases(f"{task}: scoring"):
                if rows and positive_rows is None:
                    positive_rows = corpus_rows(corpus_ids, positives)
                ranks = (flat_positive_ranks(top, positive_rows if rows else positives) if which is None
                         else shared_positive_ranks(top, which, positives))[0]
                reports = {task: recall_report_from_ranks(ranks, lengths, ks, surfaces, group_names=surface_names)}
                for part, (flat_mask, part_lengths, keep) in subsets.items():
                    if len(part_lengths):
                        reports[f"{task}_{part}"] = recall_report_from_ranks(ranks[flat_mask], part_lengths, ks,
                                                                             surfaces[keep], group_names=surface_names)
                if task == "conversion":
                    at, inside = (top, top >= 0) if rows else find_sorted(corpus_ids, top)
                    adv_top = np.where(inside, adv_of[at], -1)  # an item outside the corpus: no advertiser
                    adv_ranks, adv_lengths = (flat_positive_ranks(adv_top, adv_pos) if which is None
                                              else shared_positive_ranks(adv_top, which, adv_pos))
                    reports["conversion_advertiser"] = recall_report_from_ranks(adv_ranks, adv_lengths, ks, surfaces,
                                                                                group_names=surface_names)
                for name, report in reports.items():
                    results[method][name] = {k: v["mean"] for k, v in report.items()}
                    results["detail"][method][name] = report
            del top
            seconds["scoring"] += time.perf_counter() - t_score
    seconds["scoring"] += sum(seconds["retrieve"].values())
    return results, seconds

def corpus_rows(corpus_ids: np.ndarray, positives: list[np.ndarray]) -> list[np.ndarray]:
    """Each query's positive ids as rows of the sorted `corpus_ids`; -2 for an id outside it (a
    row retrievers never name: they use -1 for an item outside the corpus)."""
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
    if lengths.sum() == 0:
        return [np.zeros(0, np.int64) for _ in positives]
    at, found = find_sorted(corpus_ids, np.concatenate(positives))
    return np.split(np.where(found, at, -2), np.cumsum(lengths)[:-1])


def timing_line(results: dict, path: str) -> str:
    sec = results["seconds"]
    return (f"[raycg] eval: exact search ({results.get('search_backend', 'faiss')}) {sec['search']:.1f}s of "
            f"{sec['total']:.1f}s total (baselines and recall scoring {sec['scoring_and_baselines']:.1f}s); "
            f"results -> {path}")


def format_phases(results: dict, indent: str = "  ") -> str:
    """results["seconds"]["phases"] as lines, the longest first (query embedding, exact search,
    scoring, ... : where evaluation time goes)."""
    phases = results.get("seconds", {}).get("phases", {})
    return "\n".join(f"{indent}{name:<44}{secs:8.1f}s" for name, secs in sorted(phases.items(), key=lambda kv: -kv[1]))


def _get(d: dict, k):
    return d.get(k, d.get(str(k)))


def _recall_rows(results: dict, tasks: list[str], short: dict, width: int = 12) -> list[str]:
    ks = results["ks"]
    cols = [(task, k) for task in tasks for k in ks]
    width = max([width] + [len(f"{short[t]} R@{k}") + 2 for t, k in cols])  # headers never run together
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
    boost = results.get("recent_boost") or {}
    if boost.get("items"):
        lines.append(f"model: the distinct items of the user's last {boost['items']} actions score {boost['boost']:.4g} "
                     f"higher ({boost['source']}; index.recent_boost)")
    sampled = results.get("sampled_queries") or {}
    if sampled:
        lines.append("scored on a uniform sample (eval.max_queries): " + ", ".join(
            f"{t} {c['used']:,} of {c['of']:,} queries" for t, c in sampled.items()))
    cold = results.get("cold_dropped") or {}
    if cold:
        lines.append("left out (items without a training event; eval.cold_items): " + ", ".join(
            f"{t} {c['positives']:,} positives ({c['queries']:,} queries)" for t, c in cold.items()))
    split = [f"{t}_{p}" for t in TASKS for p in PARTS if f"{t}_{p}" in results["model"]]
    users = [f"{t}_{p}" for t in TASKS for p in USER_PARTS if f"{t}_{p}" in results["model"]]
    if split:
        share = results.get("repeat_share", {})
        lines += ["", "repeat positives (the user acted on the item before the query time) vs novel ones: "
                  + ", ".join(f"{t} {100 * share[t]:.0f}% repeat" for t in TASKS if t in share)]
        lines += _recall_rows(results, split, {f"{t}_{p}": f"{short[t]}-{p[:3]}" for t in TASKS for p in PARTS}, 16)
        lines.append("queries: " + ", ".join(f"{t} {nq.get(t, 0):,}" for t in split))
    if users:
        share = results.get("new_user_share", {})
        lines += ["", "queries of users with a training-split event vs new users: "
                  + ", ".join(f"{t} {100 * share[t]:.0f}% new" for t in TASKS if t in share)]
        lines += _recall_rows(results, users, {f"{t}_{p}": f"{short[t]}-{p.split('_')[0]}" for t in TASKS
                                               for p in USER_PARTS}, 16)
        lines.append("queries: " + ", ".join(f"{t} {nq.get(t, 0):,}" for t in users))
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
