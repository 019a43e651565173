"""Driver side of a run: data -> Ray Train fit -> evaluation -> run directory.

Run directory (<paths.runs_dir>/<run_name>/):
    config.yaml       the composed Hydra config
    data_stats.json   rows read / used for training
    metrics.jsonl     one line per epoch (loss, rows/s, ...)
    checkpoint_*/     Ray Train checkpoints (model.pt + meta.json)
    eval.json         recall@K, model vs popularity
    export/           torch.export user/item towers, feature tables, item embeddings + faiss
                      index (raycg.retrieve.build)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import ray
from omegaconf import DictConfig, OmegaConf, open_dict
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from raycg.data.features import dense_moments
from raycg.data.history import HistoryIndex
from raycg.data.pipeline import (
    auto_buckets,
    checked_events,
    event_files,
    feature_store_from_config,
    max_from_footers,
    nonempty_event_files,
    packed_training_dataset,
    validation_cutoff,
)
from raycg.data.sim.config import DATA_FORMAT
from raycg.data.simulate import SimConfig, write_dataset
from raycg.data.spec import FeatureSpec
from raycg.host import describe_host
from raycg.data.vocab import build_vocabularies, store_counts
from raycg.model.card import model_card, training_bytes
from raycg.model.checkpoint import load_model, recent_boost
from raycg.model.repeat_match import history_lookup_length
from raycg.model.two_tower import TwoTowerModel
from raycg.eval.evaluate import evaluate_checkpoint, format_table, timing_line, write_results
from raycg.eval.queries import drop_cold
from raycg.retrieve.build import export_run
from raycg.logs import PhaseTimes, get_logger, set_level
from raycg.train.loop import train_loop_per_worker
from raycg.train.preflight import PreflightError, check_config, check_data_dir, check_model_memory, check_resources
from raycg.train.schedule import lr_factor
from raycg.train.tracking import build_tracker, eval_metrics, flat_params
from raycg.train.validation import ValidationSet


logger = get_logger("train")  # "[raycg] ..." lines (raycg.logs)
log = logger.info


def resolve_paths(cfg: DictConfig) -> None:
    """Make data and run paths absolute (workers and Ray Train need absolute paths)."""
    for key in ("dir", "train_path", "eval_path", "items_path", "users_path"):
        if cfg.data[key]:
            cfg.data[key] = os.path.abspath(str(cfg.data[key]))
    cfg.paths.runs_dir = os.path.abspath(str(cfg.paths.runs_dir))
    if not cfg.run_name:
        cfg.run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.cross}"


def embedded(cfg: DictConfig) -> bool:
    """No ray.address and no RAY_ADDRESS: this process starts its own Ray."""
    return cfg.ray.address is None and not os.environ.get("RAY_ADDRESS")


def init_ray(cfg: DictConfig) -> None:
    if ray.is_initialized():
        return
    kwargs = {"log_to_driver": True}
    if embedded(cfg):
        # Loopback only. Ray 2.60 turns a 127.0.0.1 node address into the machine's address, and
        # its servers then listen on every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
        # read at import by this process (patched here) and at start by Ray's own processes (env).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.update(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
        if cfg.ray.num_cpus is not None:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.include_dashboard is not None:
            kwargs["include_dashboard"] = cfg.ray.include_dashboard
    else:
        kwargs["address"] = cfg.ray.address
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False


def ensure_data(cfg: DictConfig) -> None:
    """Simulate the default dataset once; reuse it while its meta.json records the same
    simulator config, simulate again (same directory) when any knob changed."""
    if cfg.data.source != "simulator":
        return
    sim = SimConfig(**OmegaConf.to_container(cfg.data.sim, resolve=True))
    meta_path = os.path.join(cfg.data.dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("config") == json.loads(json.dumps(asdict(sim))) and meta.get("format") == DATA_FORMAT:
            log(f"data: reusing simulated dataset {cfg.data.dir}")
            return
        log(f"data: {cfg.data.dir} was simulated with other data.sim settings or by an older "
            "simulator; simulating again")
    t0 = time.perf_counter()
    meta = write_dataset(sim, cfg.data.dir)
    log(f"data: simulated {meta['n_events']:,} events ({meta['n_clicks']:,} clicks, "
        f"{meta['n_conversions']:,} conversions) in {time.perf_counter() - t0:.1f}s -> {cfg.data.dir}")


def schedule_steps(cfg: DictConfig, stats: dict) -> int | None:
    """Optimiser steps of the whole run (epochs x steps per rank and epoch), for LR decay.
    Ray Train splits the training set into equal shards; each rank drops its last partial batch."""
    t = cfg.trainer
    if t.lr_schedule.total_steps:
        return int(t.lr_schedule.total_steps)
    if "rows_used" not in stats:
        if t.lr_schedule.decay != "constant":
            raise ValueError(f"trainer.lr_schedule.decay={t.lr_schedule.decay} needs the run's step count: set "
                             "trainer.lr_schedule.total_steps, or data.materialize=true so rows are counted")
        return None
    return t.epochs * (stats["rows_used"] // t.num_workers // t.batch_size)


@dataclass
class PreparedRun:
    """What training needs before a trainer exists: the packed dataset, its row accounting,
    the feature store and spec, and the run directory."""

    run_dir: str
    dataset: ray.data.Dataset
    stats: dict
    store: object  # raycg.data.batches.FeatureStore
    store_ref: list
    spec: FeatureSpec
    eval_split: tuple | None = None  # (checked eval events, their row accounting)
    validation_ref: list | None = None  # [ObjectRef of a ValidationSet] when data.validation_fraction > 0


def quarantine_dir(cfg: DictConfig, run_dir: str, split: str) -> str | None:
    """<run>/quarantine/<train|eval|users> with data.on_bad_rows=quarantine, else None."""
    return os.path.join(run_dir, "quarantine", split) if cfg.data.on_bad_rows == "quarantine" else None


def check_quarantine_share(cfg: DictConfig, what: str, quarantined: int, read: int) -> None:
    """Warn loudly when more than data.max_quarantined_fraction of a split was set aside."""
    if read and quarantined / read > cfg.data.max_quarantined_fraction:
        logger.warning(f"{quarantined:,} of {read:,} {what} rows ({100 * quarantined / read:.1f}%) were "
                       f"quarantined, more than data.max_quarantined_fraction={cfg.data.max_quarantined_fraction}: "
                       "look at the quarantine_reason column of the quarantined files before trusting this run")


def resolve_duration_weighting(cfg: DictConfig) -> None:
    """loss.duration_weighting=auto -> true when any training event has a click duration > 0,
    false for logs without dwell time (every click would otherwise weigh log(1 + 0) = 0)."""
    if cfg.loss.duration_weighting != "auto":
        return
    longest = max_from_footers(nonempty_event_files(cfg.data.train_path)[0], "click_duration")
    with open_dict(cfg.loss):
        cfg.loss.duration_weighting = bool(longest > 0)
    if not cfg.loss.duration_weighting:
        log("data: no click in the training split has a duration: clicks weigh 1 "
            "(loss.duration_weighting=auto -> false)")


def set_vocabularies(cfg: DictConfig, store) -> None:
    """Vocabularies of every id feature but `surface` from the training window's counts ->
    store.vocab (the workers fill the tables from it), cfg.model.vocab_sizes (the tables'
    shapes, saved with every checkpoint) and cfg.model.buckets (their rows, for the card)."""
    v = cfg.model.vocab
    counts = store_counts(store, store.context_counts, store.query_counts)
    store.vocab = build_vocabularies({k: c for k, c in counts.items() if k != "surface"}, int(v.min_count),
                                     None if v.max_size is None else int(v.max_size))
    cfg.model.vocab_sizes = {name: len(ids) for name, ids in store.vocab.items()}
    for name, ids in store.vocab.items():
        cfg.model.buckets[name] = 1 + int(v.oov_buckets) + len(ids)
    log("data: vocabularies (ids seen >= " + f"{v.min_count} times in the training window; others share "
        f"{v.oov_buckets} OOV rows): " + ", ".join(f"{k} {len(ids):,}" for k, ids in store.vocab.items()))


def fit_batch_size(cfg: DictConfig, rows_per_worker: int) -> None:
    """A small training split still gets trainer.min_steps_per_epoch steps per epoch: the batch
    size is halved (not below 16) until it does, and the change is printed."""
    want, batch = int(cfg.trainer.min_steps_per_epoch), int(cfg.trainer.batch_size)
    if not want or rows_per_worker >= want * batch:
        return
    while batch > 16 and rows_per_worker < want * batch:
        batch //= 2
    log(f"train: {rows_per_worker:,} training rows per worker: trainer.batch_size {cfg.trainer.batch_size} -> "
        f"{batch} ({rows_per_worker // batch} steps per epoch; trainer.min_steps_per_epoch={want}, 0 = keep the "
        "batch size)")
    cfg.trainer.batch_size = batch


AUTO_EPOCHS = 4  # trainer.epochs=null on a split large enough for trainer.min_steps


def fit_epochs(cfg: DictConfig, rows_per_worker: int | None) -> None:
    """trainer.epochs=null (auto): AUTO_EPOCHS, raised until the run has trainer.min_steps
    optimiser steps when the rows were counted (`rows_per_worker`); printed when raised. An
    integer trainer.epochs is kept as given."""
    if cfg.trainer.epochs is not None:
        return
    epochs, steps = AUTO_EPOCHS, (rows_per_worker or 0) // int(cfg.trainer.batch_size)
    if steps and steps * epochs < int(cfg.trainer.min_steps):
        epochs = -(-int(cfg.trainer.min_steps) // steps)
        log(f"train: {steps} steps per epoch: {epochs} epochs for trainer.min_steps={cfg.trainer.min_steps} "
            f"(trainer.epochs=null; early stopping may end the run sooner; trainer.epochs=N sets it)")
    cfg.trainer.epochs = epochs


def prepare_run(cfg: DictConfig) -> PreparedRun:
    """Features (Ray Data) -> packed training dataset -> spec; writes config.yaml and
    data_stats.json and prints the model card."""
    t0 = time.perf_counter()
    phases = PhaseTimes()  # where the preparation's time goes, printed with the data stats
    run_dir = os.path.join(cfg.paths.runs_dir, cfg.run_name)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    before_ts = validation_cutoff(cfg.data.train_path, cfg.data.validation_fraction)
    resolve_duration_weighting(cfg)
    use_vocab = bool(cfg.model.vocab.enabled)
    store = feature_store_from_config(data_cfg, history_lookup_length(cfg.model.history),
                                      quarantine_dir=quarantine_dir(cfg, run_dir, "users"), before_ts=before_ts,
                                      count_context_ids=use_vocab)
    phases.mark("feature store")
    items = store.items
    # the evaluation split gets the training split's checks, before any training
    eval_split = checked_events(cfg.data.eval_path, store, quarantine_dir=quarantine_dir(cfg, run_dir, "eval"),
                                check_duplicates=cfg.data.check_duplicates)
    phases.mark("evaluation split")
    with open_dict(cfg.model):  # extra categorical columns add bucket names
        cfg.model.buckets = auto_buckets(
            OmegaConf.to_container(cfg.model.buckets), cfg.model.max_buckets, cfg.data.train_path, items, store.users)
        if use_vocab:
            set_vocabularies(cfg, store)
    phases.mark("vocabularies")
    train_ds, stats = packed_training_dataset(
        cfg.data.train_path, store, batch_size=cfg.data.pack_batch_size, materialize=cfg.data.materialize,
        hard_negatives=cfg.loss.hard_negatives, seed=cfg.seed,
        quarantine_dir=quarantine_dir(cfg, run_dir, "train"), check_duplicates=cfg.data.check_duplicates,
        preserve_order=cfg.trainer.deterministic, before_ts=before_ts, shuffle=cfg.data.shuffle)
    phases.mark("training split")
    validation_ref = None
    if before_ts is not None:
        known = store.item_counts[0] if drop_cold(cfg.eval.cold_items, cfg.data.items_path) else None
        history = store.history
        if cfg.index.recent_items > 0 and history is None:  # the recent-item boost needs every query's recent actions
            history = HistoryIndex.build(event_files(cfg.data.train_path))
        vset = ValidationSet.build(nonempty_event_files(cfg.data.train_path)[0], store, before_ts, known,
                                   max_queries=cfg.trainer.early_stopping.max_queries, seed=cfg.seed,
                                   recent_items=cfg.index.recent_items, history=history)
        stats["validation"] = {"cutoff_ts": before_ts, "rows": vset.rows,
                               **{f"{t}_queries": len(p) for t, (_, p) in vset.queries.items()}}
        check_validation_metric(cfg, vset)
        log(f"data: validation window from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(before_ts))} UTC "
            f"(the last {cfg.data.validation_fraction:.0%} of the training split, not trained on): {vset.rows:,} "
            f"events, {vset.describe()}")
        validation_ref = [ray.put(vset)]
        phases.mark("validation window")
    stats.update(eval=eval_split[1], users_rows_quarantined=store.users.rows_quarantined)
    if stats.get("files_empty"):
        log(f"data: skipped {stats['files_empty']} empty Parquet file(s) of the training split")
    if "rows_quarantined" in stats:
        check_quarantine_share(cfg, "training", stats["rows_quarantined"], stats["rows_read"])
    check_quarantine_share(cfg, "evaluation", eval_split[1]["rows_quarantined"], eval_split[1]["rows_read"])
    per_rank = stats.get("rows_used", cfg.trainer.batch_size * cfg.trainer.num_workers) // cfg.trainer.num_workers
    fit_batch_size(cfg, per_rank)
    fit_epochs(cfg, per_rank if "rows_used" in stats else None)
    if per_rank < cfg.trainer.batch_size:
        raise PreflightError(
            f"trainer.batch_size={cfg.trainer.batch_size} x trainer.num_workers={cfg.trainer.num_workers}: the "
            f"training split has {stats['rows_used']:,} positive rows, {per_rank:,} per worker, fewer than one "
            f"batch; lower trainer.batch_size or trainer.num_workers")
    moments = dense_moments(train_ds, ["user_dense", "item_dense"])
    phases.mark("dense moments")
    spec = FeatureSpec(
        user_cat=["user", "surface", "context_item", "query", *store.users.cat_names],
        item_cat=list(items.cat_names),
        user_dense=len(moments["user_dense"][0]), item_dense=items.dense_dim,
        user_dense_mean=moments["user_dense"][0], user_dense_std=moments["user_dense"][1],
        item_dense_mean=moments["item_dense"][0], item_dense_std=moments["item_dense"][1],
        history_length=history_lookup_length(cfg.model.history),
    )
    log(f"data: {stats} ({time.perf_counter() - t0:.1f}s: {phases})")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg))
    with open(os.path.join(run_dir, "data_stats.json"), "w") as f:
        json.dump(stats, f)
    table_optimizer = cfg.trainer.table_optimizer if cfg.model.sparse_tables else "adam"
    model = TwoTowerModel(OmegaConf.to_container(cfg.model, resolve=True), spec)
    log(model_card(model, table_optimizer))
    check_model_memory(cfg, training_bytes(model, table_optimizer), embedded(cfg))
    del model
    return PreparedRun(run_dir, train_ds, stats, store, [ray.put(store)], spec, eval_split, validation_ref)


def check_validation_metric(cfg: DictConfig, vset: ValidationSet) -> None:
    """trainer.early_stopping.metric must be one the validation window can measure."""
    metric = cfg.trainer.early_stopping.metric
    if metric == "val_mean_recall":
        return  # measured whenever the window has queries of either task
    task, _, k = metric.removeprefix("val_").partition("_recall@")
    if not k.isdigit() or int(k) not in [int(x) for x in cfg.eval.ks] or task not in ("conversion", "engagement"):
        raise PreflightError(f"trainer.early_stopping.metric={metric!r}: expected val_mean_recall or "
                             f"val_<conversion|engagement>_recall@<K> with K in eval.ks={list(cfg.eval.ks)}")
    if task not in vset.queries:
        raise PreflightError(f"trainer.early_stopping.metric={metric!r}: the validation window (the last "
                             f"{cfg.data.validation_fraction:.0%} of the training split) has no {task} queries; "
                             "raise data.validation_fraction or pick another metric")


def make_trainer(cfg: DictConfig, prep: PreparedRun, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer for this config over a prepared dataset (one worker per GPU with
    trainer.use_gpu, NCCL; gloo on CPU)."""
    total_steps = schedule_steps(cfg, prep.stats)
    sched = cfg.trainer.lr_schedule
    try:  # fail here, before any worker starts
        lr_factor(sched.decay, sched.warmup_steps, sched.total_steps or total_steps, sched.min_lr_ratio)
    except ValueError as e:
        raise ValueError(f"{e}; this run has {total_steps} optimiser steps ({cfg.trainer.epochs} epochs of "
                         f"{prep.stats.get('rows_used', '?')} rows / {cfg.trainer.num_workers} workers / batch "
                         f"{cfg.trainer.batch_size}): lower trainer.lr_schedule.warmup_steps or the batch size") from e
    loop_config = OmegaConf.to_container(cfg, resolve=True)
    loop_config.update(feature_spec=prep.spec.to_dict(), run_dir=prep.run_dir, store_ref=prep.store_ref,
                       data_stats=prep.stats, total_steps=total_steps, validation_ref=prep.validation_ref)
    t = cfg.trainer
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}),
        run_config=RunConfig(
            name=os.path.basename(prep.run_dir), storage_path=os.path.dirname(prep.run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            # bounded: an unplaceable worker group otherwise retries forever
            failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=t.startup_retries),
            callbacks=callbacks,
        ),
        datasets={"train": prep.dataset},
        dataset_config=dataset_config(cfg),
    )


def dataset_config(cfg: DictConfig) -> DataConfig:
    """Ray Train's ingest options; trainer.deterministic delivers rows in the same order every run."""
    if not cfg.trainer.deterministic:
        return DataConfig()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def build_trainer(cfg: DictConfig, callbacks: list | None = None):
    """Ray Data dataset + TorchTrainer for this config; returns (trainer, run_dir, feature store)."""
    prep = prepare_run(cfg)
    return make_trainer(cfg, prep, callbacks), prep.run_dir, prep.store


def run(cfg: DictConfig, callbacks: list | None = None) -> dict:
    """The main job: simulate (if needed) -> train -> evaluate -> export. Returns eval results."""
    set_level(cfg.log_level)
    check_config(cfg)  # seconds: before Ray, data or a run directory exist
    resolve_paths(cfg)
    check_data_dir(cfg)
    init_ray(cfg)
    check_resources(cfg, ray.cluster_resources, embedded(cfg), cfg.trainer.resources_wait_s, log)
    ensure_data(cfg)
    prep = prepare_run(cfg)
    trainer = make_trainer(cfg, prep, callbacks)
    # logger=mlflow|tensorboard: the config now, the evaluation at the end, the curves from rank 0
    tracker = build_tracker(OmegaConf.to_container(cfg.logger, resolve=True), prep.run_dir, "driver")
    tracker.log_params(flat_params(OmegaConf.to_container(cfg, resolve=True)))
    try:
        results = train_evaluate_export(cfg, prep, trainer, tracker)
    except BaseException as e:  # the tracked run ends FAILED (KILLED on Ctrl-C), not RUNNING forever
        tracker.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close("FINISHED")
    path = write_results(prep.run_dir, results)
    print("\n" + format_table(results), flush=True)  # the run's result table: output, not a log line
    print(timing_line(results, path), flush=True)
    return results


def train_evaluate_export(cfg: DictConfig, prep: PreparedRun, trainer: TorchTrainer, tracker) -> dict:
    """Ray Train fit -> evaluation of the best (else last) checkpoint -> export; the evaluation
    goes to `tracker`. Returns the evaluation results."""
    run_dir = prep.run_dir
    n = cfg.trainer.num_workers
    log(f"train: run {cfg.run_name} ({n} worker{'s' if n != 1 else ''}, model.cross={cfg.model.cross}) "
        f"-> {run_dir}")
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:  # Ray Train raises a worker's own error when a single worker failed
        logger.error(f"train: run {cfg.run_name} failed (trainer.max_failures={cfg.trainer.max_failures} "
                     f"restarts allowed). Running the same command again (run_name={cfg.run_name}) resumes from "
                     "its last checkpoint; trainer.max_failures=N restarts failed workers automatically.")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {run_dir}")
    log(f"train: done in {time.perf_counter() - t0:.1f}s; checkpoint {result.checkpoint.path}")
    ckpt_dir = result.checkpoint.path
    best_dir = os.path.join(run_dir, "best")
    if prep.validation_ref is not None and os.path.isdir(best_dir):
        ckpt_dir = best_dir  # the epoch with the best validation recall, not the last one
        with open(os.path.join(best_dir, "meta.json")) as f:
            best_epoch = json.load(f)["epoch"]
        log(f"eval: the best checkpoint by {cfg.trainer.early_stopping.metric} is epoch {best_epoch} "
            f"({best_dir})")
    boost = recent_boost(ckpt_dir, OmegaConf.to_container(cfg, resolve=True))
    results = evaluate_checkpoint(ckpt_dir, OmegaConf.to_container(cfg.data, resolve=True),
                                  OmegaConf.to_container(cfg.eval, resolve=True), log,
                                  history_length=history_lookup_length(cfg.model.history), store=prep.store,
                                  seed=cfg.seed,
                                  eval_split=prep.eval_split, new_users=cfg.index.new_users,
                                  popularity_weights=(cfg.loss.conversion_weight, cfg.loss.engagement_weight),
                                  recent_boost=boost)
    results["checkpoint"] = ckpt_dir
    if cfg.export:
        model, _ = load_model(ckpt_dir)
        export_run(model, prep.store, os.path.join(run_dir, "export"), OmegaConf.to_container(cfg.index, resolve=True),
                   eval_events=prep.eval_split[0], train_path=cfg.data.train_path, seed=cfg.seed, log=log,
                   ray_min_rows=cfg.eval.ray_inference_min_rows,
                   popularity_weights=(cfg.loss.conversion_weight, cfg.loss.engagement_weight),
                   recent_boost=boost)
    else:
        log(f"export: off (export=false); `python -m raycg.export run_dir={run_dir}` writes it from the checkpoint")
    results["train_metrics"] = result.metrics
    results["environment"] = {**describe_host(), "train_device": result.metrics.get("device"),
                              "train_workers": cfg.trainer.num_workers}
    last = result.metrics  # every epoch has the same steps: the run's optimiser steps so far
    tracker.log_metrics(eval_metrics(results), (last["epoch"] + 1) * last["steps"])
    return results
