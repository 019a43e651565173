"""Checks that run before anything expensive: the composed config and the data directory
(before Ray starts), then the cluster's resources (before any worker is asked for).

Each failure is a `PreflightError` that names the setting, the value and what to change, so
that a typo or a missing directory costs seconds, not a data pipeline and five tracebacks.
"""
from __future__ import annotations

import os
import time

from omegaconf import DictConfig, OmegaConf

from raycg.config import ConfigError
from raycg.logs import get_logger


class PreflightError(ConfigError):
    """A setting or an input that would make the run fail later; says what to change."""


def _choice(cfg: DictConfig, key: str, allowed) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise PreflightError(f"{key}={value!r}: expected one of {list(allowed)}")


def _at_least(cfg: DictConfig, key: str, low, allow_none: bool = False) -> None:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
        raise PreflightError(f"{key}={value!r}: must be a number >= {low}")


def check_config(cfg: DictConfig) -> None:
    """Ranges of the settings the run reads (no I/O). Types, keys and enumerations were checked
    by Hydra when it composed the config (raycg.config.schema); every value must be given."""
    from raycg.config import require_complete

    require_complete(cfg)
    _choice(cfg, "loss.duration_weighting", ("auto", True, False))  # a bool or a string: not a schema enum
    _at_least(cfg, "trainer.epochs", 1, allow_none=True)  # None: auto (raycg.train.driver.fit_epochs)
    _at_least(cfg, "trainer.min_steps", 0)
    for key, low in (("trainer.batch_size", 1), ("trainer.num_workers", 1),
                     ("trainer.transfer_batches", 1), ("trainer.prefetch_batches", 1),
                     ("trainer.log_every_steps", 1), ("trainer.lr", 0), ("trainer.cpus_per_worker", 0),
                     ("model.cross_layers", 0), ("model.embedding_dim", 1), ("model.temperature", 1e-6),
                     ("loss.t_max", 1e-9), ("loss.mixed_negatives", 0), ("loss.hard_negatives", 0),
                     ("model.history.length", 0), ("data.max_quarantined_fraction", 0)):
        _at_least(cfg, key, low)
    _at_least(cfg, "trainer.grad_clip_norm", 1e-12, allow_none=True)
    _at_least(cfg, "loss.advertiser_block_rows", 1, allow_none=True)
    _at_least(cfg, "trainer.early_stopping.patience", 0)
    for key in ("trainer.gpus_per_worker", "eval.actor_gpus"):  # Ray takes a fraction below 1, else whole GPUs
        value = OmegaConf.select(cfg, key)
        if not (value > 0 and (value <= 1 or float(value).is_integer())):
            raise PreflightError(f"{key}={value:g}: expected a fraction in (0, 1] or a whole number of GPUs")
    _at_least(cfg, "trainer.early_stopping.max_queries", 1)
    if not 0 <= cfg.data.validation_fraction < 1:
        raise PreflightError(f"data.validation_fraction={cfg.data.validation_fraction}: expected 0 (off) or a "
                             "share of the training split's time span in (0, 1)")
    if not cfg.eval.ks or any(int(k) < 1 for k in cfg.eval.ks):
        raise PreflightError(f"eval.ks={list(cfg.eval.ks)}: give one or more K >= 1")
    if cfg.model.sparse_tables and cfg.trainer.compile:
        # measured 2026-12-06: inductor fails in the backward of a sparse embedding ("Cannot access
        # storage of SparseTensorImpl" on CPU; a size/stride assert on an H100)
        raise PreflightError("model.sparse_tables=true with trainer.compile=true: torch.compile cannot "
                             "differentiate sparse embedding gradients; set trainer.compile=false (sparse tables), "
                             "or model.sparse_tables=false (dense tables; on a GPU the faster choice: 1.97M rows/s "
                             "at 1M items on an H100 against 0.26M with sparse tables uncompiled)")
    if cfg.data.shuffle == "once" and not cfg.data.materialize:
        raise PreflightError("data.shuffle=once with data.materialize=false: a streamed split is read again every "
                             "epoch, so there is no single pass to shuffle once; set data.shuffle=epoch (a seeded "
                             "all-to-all shuffle every pass) or data.shuffle=none (files already shuffled)")
    if cfg.data.on_bad_rows == "quarantine" and not cfg.data.materialize:
        raise PreflightError("data.on_bad_rows=quarantine needs data.materialize=true "
                             "(the quarantine is written once, by the materialising pass)")


def check_data_dir(cfg: DictConfig) -> None:
    """The inputs of a `data=files` run exist (the simulator writes its own)."""
    if cfg.data.source == "simulator":
        return
    if cfg.data.dir and not os.path.isdir(cfg.data.dir):
        raise PreflightError(f"data.dir={cfg.data.dir}: no such directory (expected items.parquet and "
                             "events/train/, events/eval/ inside; see the README's event schema)")
    for key, kind in (("items_path", "file"), ("train_path", "split"), ("eval_path", "split"), ("users_path", "file")):
        path = cfg.data[key]
        if not path:
            continue
        if not os.path.exists(path):
            raise PreflightError(f"data.{key}={path}: no such {'file' if kind == 'file' else 'file or directory'}")


def required_resources(cfg: DictConfig) -> dict[str, float]:
    t = cfg.trainer
    need = {"CPU": t.num_workers * t.cpus_per_worker}
    if t.use_gpu:
        need["GPU"] = t.num_workers * float(t.gpus_per_worker)
    return need


def check_resources(cfg: DictConfig, cluster_resources, embedded: bool, wait_s: float,
                    log=get_logger("train").info) -> None:
    """The trainer's workers fit the cluster: at once for an embedded Ray (its size is fixed),
    within `wait_s` seconds for a cluster (an autoscaler may be adding nodes)."""
    need = required_resources(cfg)
    deadline = time.monotonic() + (0 if embedded else wait_s)
    announced = False
    while True:
        have = cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() >= deadline:
            what = ", ".join(f"{k}: {v:g} asked, {h:g} in the cluster" for k, (v, h) in short.items())
            raise PreflightError(
                f"trainer.num_workers={cfg.trainer.num_workers} x trainer.cpus_per_worker="
                f"{cfg.trainer.cpus_per_worker}{f' (+{cfg.trainer.gpus_per_worker:g} GPU each)' if cfg.trainer.use_gpu else ''} does not fit "
                f"the {'embedded Ray' if embedded else 'cluster'} ({what}): lower trainer.num_workers or "
                f"trainer.cpus_per_worker{'' if embedded else ', or add nodes'}")
        if not announced:
            log(f"waiting up to {wait_s:.0f}s for the cluster to offer {need} (trainer.resources_wait_s)")
            announced = True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def available_memory() -> int:
    """Bytes of memory available to new processes on this machine (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_model_memory(cfg: DictConfig, need_bytes: int, embedded: bool) -> None:
    """The model, its gradients and optimizer state fit a worker, before any worker starts: a
    GPU worker's card (when this process sees one), or this machine's free memory shared by the
    CPU workers of an embedded Ray. (On a cluster a CPU worker's node is not known here.)"""
    per_worker = need_bytes
    if cfg.trainer.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return
        have, where = torch.cuda.get_device_properties(0).total_memory, f"one {torch.cuda.get_device_name(0)}"
    elif embedded:
        have, where = available_memory(), f"this machine's free memory shared by {cfg.trainer.num_workers} workers"
        need_bytes *= int(cfg.trainer.num_workers)
    else:
        return
    if need_bytes > 0.9 * have:
        raise PreflightError(
            f"the model needs {per_worker / 2**30:.1f} GiB per worker for weights, gradients and optimizer state "
            f"(model card above), {need_bytes / 2**30:.1f} GiB against {have / 2**30:.1f} GiB on {where}: set "
            f"model.sparse_tables=true (no table-sized gradients), cap the vocabularies (model.vocab.max_size, "
            f"model.vocab.min_count), lower model.id_dim{'' if cfg.trainer.use_gpu else ' or trainer.num_workers'}")
