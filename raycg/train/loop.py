"""The per-worker training loop (runs inside each Ray Train worker). Reads top to bottom.

Device, precision and compilation are set once at the top; the epoch loop reads the loss
back to the host only every `trainer.log_every_steps` steps and at the end of an epoch.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raycg.data.spec import FeatureSpec
from raycg.host import device_name
from raycg.logs import EVERY_RANK, rank_zero_logger, set_level
from raycg.losses.objective import EAGER, LossKernels
from raycg.model.two_tower import TwoTowerModel
from raycg.model import checkpoint as ckpt_io
from raycg.train.feed import ThreadFeed
from raycg.train.ingest import ProcessFeed
from raycg.train.optim import (GRAD_SYNCS, DenseGradSync, SparseGradSync, broadcast_parameters, build_optimizer,
                               dense_parameters, sparse_tables)
from raycg.train.schedule import build_scheduler
from raycg.train.step import StepContext, train_step
from raycg.train.tracking import NoTracker, build_tracker, numeric
from raycg.train.validation import EarlyStopping, validation_recall


def worker_logger(rank: int):
    """A worker's progress lines ("[raycg] ..."): rank 0's only, but for those logged with
    extra=EVERY_RANK (raycg.logs writes to stdout without `print`, which Ray Train patches in
    workers to print AND log: every line appeared twice)."""
    return rank_zero_logger("train", rank)


def resume_state(checkpoint, run_dir: str, rank: int) -> dict | None:
    """The state of Ray's latest checkpoint, or, when that one is damaged (raycg.model.checkpoint
    verifies checksums), of the newest intact checkpoint of the run, saying so."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        try:
            return ckpt_io.load_state(d)
        except ckpt_io.CheckpointError as e:
            damaged = e
    log = worker_logger(rank).info
    log(f"the latest checkpoint is damaged: {damaged}")
    fallback = ckpt_io.newest_intact(run_dir, log=log)
    log(f"resuming from the newest intact checkpoint instead: {fallback}")
    return ckpt_io.load_state(fallback)


def forget_epochs_from(metrics_path: str, start_epoch: int) -> None:
    """Drop metrics.jsonl lines of epochs that will be trained again: a run stopped after
    writing an epoch's line but before Ray committed its checkpoint resumes before that epoch."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line)["epoch"] < start_epoch]
    if len(keep) != len(lines):
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(metrics_path + ".tmp", metrics_path)


def keep_best(checkpoint_dir: str, best_dir: str) -> None:
    """Copy a checkpoint to <run>/best (replacing the previous best as a whole)."""
    tmp = best_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir, tmp)
    shutil.rmtree(best_dir, ignore_errors=True)
    os.replace(tmp, best_dir)


def finite(mean_loss: float, epoch: int, steps: int) -> float:
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss is {mean_loss} (mean over epoch {epoch}, steps 1-{steps}); try a lower trainer.lr, "
            "trainer.grad_clip_norm, trainer.precision=fp32 or trainer.compile=false to find the cause")
    return mean_loss


def open_feed(shard, cfg_train: dict, device: torch.device, rank: int):
    """Where Ray Data runs for this worker: `process` (an IngestActor beside it) or `thread`
    (Ray Data's own background threads in this process)."""
    args = (shard, cfg_train["batch_size"], device, cfg_train["transfer_batches"], cfg_train["prefetch_batches"])
    if cfg_train["ingest"] == "process":
        return ProcessFeed(*args, rank=rank)
    if cfg_train["ingest"] == "thread":
        return ThreadFeed(*args)
    raise ValueError(f"trainer.ingest={cfg_train['ingest']!r}: expected 'process' or 'thread'")


def train_loop_per_worker(config: dict) -> None:
    cfg_model, cfg_loss, cfg_train = config["model"], config["loss"], config["trainer"]
    spec = FeatureSpec.from_dict(config["feature_spec"])
    saved_config = {k: v for k, v in config.items() if not k.endswith("_ref")}  # object refs are not JSON
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_level(config["log_level"])
    say = worker_logger(rank).info
    B = cfg_train["batch_size"]

    # -- device, precision, compilation: set once ------------------------------------------
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])
    if cfg_train["deterministic"]:  # same seed, same data order (driver side) -> the same run
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda" and cfg_train["tf32"]:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls outside autocast
    compile_model = bool(cfg_train["compile"])
    compile_mode = cfg_train["compile_mode"] if compile_model else None
    cudagraphs = compile_mode == "reduce-overhead" and device.type == "cuda"

    # -- resume state, read on the CPU (a GPU checkpoint resumes anywhere) ----------------
    state = resume_state(ray.train.get_checkpoint(), config["run_dir"], rank)

    # -- model on the device, then the optimiser (its state follows the parameters) -----------
    model = TwoTowerModel(cfg_model, spec)
    if cfg_model.get("vocab_sizes"):  # the driver's vocabularies (not a setting); a checkpoint carries its own
        model.set_vocabularies(ray.get(config["store_ref"][0]).vocab)
    if cfg_model["item_bias"] == "prior":  # a resumed run's checkpoint carries it too
        model.set_item_prior(*ray.get(config["store_ref"][0]).item_counts)
    if state:
        model.load_state_dict(state["model"])
    tables = sparse_tables(model)  # model.sparse_tables: synchronised by SparseGradSync, not by DDP
    grad_sync = cfg_train["grad_sync"]
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"trainer.grad_sync={grad_sync!r}: expected one of {list(GRAD_SYNCS)}")
    ddp = world > 1 and grad_sync == "ddp"
    if tables and ddp:
        model._ddp_params_and_buffers_to_ignore = list(tables)
    # -> device; DDP when world > 1 and grad_sync=ddp
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if ddp else None)
    core = model.module if hasattr(model, "module") else model
    if world > 1 and not ddp:
        broadcast_parameters(core)
    optimizer = build_optimizer(core, cfg_train, device)
    scheduler = build_scheduler(optimizer, cfg_train["lr_schedule"], config["total_steps"])
    needs_corpus = cfg_loss["mixed_negatives"] > 0 or cfg_loss["hard_negatives"] > 0
    step_ctx = StepContext(
        cfg_loss, ray.get(config["store_ref"][0]).items if needs_corpus else None, device=device,
        seed=config["seed"] + rank, freq_buckets=cfg_model["buckets"]["item"], precision=cfg_train["precision"],
        grad_clip_norm=cfg_train["grad_clip_norm"],
        # the loss kernels run twice per step with two heads; they are compiled without CUDA graphs
        # (trainer=gpu + loss=full + multi_head gave a NaN loss on an H200 with them graphed)
        kernels=LossKernels.compiled(None if cudagraphs else compile_mode) if compile_model else EAGER)
    if world > 1 and not ddp:
        step_ctx.grad_syncs.append(DenseGradSync(dense_parameters(core)))
    if tables and world > 1:
        step_ctx.grad_syncs.append(SparseGradSync(sparse_tables(core)))
    start_epoch = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        step_ctx.load_state_dict(state)
        start_epoch = state["epoch"] + 1
        if rank == 0:
            say(f"resuming from checkpoint after epoch {state['epoch']}")
            forget_epochs_from(os.path.join(config["run_dir"], "metrics.jsonl"), start_epoch)
    forward = torch.compile(model, dynamic=False, mode=compile_mode) if compile_model else model
    feed = open_feed(ray.train.get_dataset_shard("train"), cfg_train, device, rank)
    if world > 1 and device.type == "cuda":  # one GPU per worker: say which
        say(f"rank {rank}: {device} (current {torch.cuda.current_device()}), "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", extra=EVERY_RANK)
    if rank == 0:
        say(f"worker: {world} x {device.type}, precision {step_ctx.precision}"
            f"{' (auto)' if cfg_train['precision'] == 'auto' else ''}, compile "
              f"{(compile_mode or 'default') if compile_model else 'off'}, batch {B} x {world} ranks, host->device "
              f"transfers of {B * cfg_train['transfer_batches']:,} rows, ingest {cfg_train['ingest']}"
            + (f", gradients: {'DDP' if ddp else 'one all-reduce after backward'}" if world > 1 else ""))

    stopper = None  # validation-driven training: the best epoch, early stopping
    if config["validation_ref"]:
        es = cfg_train["early_stopping"]
        stopper = EarlyStopping(es["metric"], es["patience"], es["min_delta"])
        stopper.load_state_dict((state or {}).get("early_stopping"))
    # logger=mlflow|tensorboard: rank 0 only (the driver made the run; raycg.train.tracking)
    tracker = build_tracker(config["logger"], config["run_dir"], "worker") if rank == 0 else NoTracker()
    try:
        run_epochs(config, start_epoch, feed, forward, core, optimizer, scheduler, step_ctx, cudagraphs, saved_config,
                   stopper, tracker)
    finally:
        feed.close()
        tracker.close()


class StepProfiler:
    """torch.profiler over `steps` training steps (from the 10th of the epoch, after warm-up),
    written as a table of time per named range and kernel to `path` (`trainer.profile_steps`)."""

    def __init__(self, steps: int, path: str, start: int = 10):
        self.first, self.last, self.path, self.prof = start, start + steps, path, None

    def at_step(self, step: int) -> None:
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        elif step == self.last:
            self.finish()

    def finish(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        steps = self.last - self.first
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(self.path, "w") as f:
            f.write(f"torch.profiler: {steps} training steps (from step {self.first} of the epoch)\n")
            f.write(self.prof.key_averages().table(sort_by=sort, row_limit=60))
        worker_logger(0).info(f"profile of {steps} steps -> {self.path}")  # rank 0 profiles
        self.prof = None


def peak_memory(device: torch.device, world: int) -> dict:
    """The largest peak resident memory of any rank's training process so far, in MB (the
    ingest process of trainer.ingest=process is not included), and on a GPU the largest peak
    of GPU memory allocated by torch. An all-reduce when there are several ranks."""
    vals = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB on Linux
    if device.type == "cuda":
        vals.append(torch.cuda.max_memory_allocated(device) / 2**20)
    if world > 1:
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        vals = t.tolist()
    out = {"peak_rss_mb": round(vals[0], 1)}
    if len(vals) > 1:
        out["gpu_peak_mb"] = round(vals[1], 1)
    return out


def run_epochs(config: dict, start_epoch: int, feed, forward, core, optimizer, scheduler, step_ctx: StepContext,
               cudagraphs: bool, saved_config: dict, stopper: EarlyStopping | None, tracker=None) -> None:
    """Epochs of steps; rank 0 logs (and tracks: `tracker`), validates, writes metrics.jsonl and
    the checkpoint (and <run>/best/ when the validation metric improved) after each epoch."""
    tracker = tracker or NoTracker()
    tracking = not isinstance(tracker, NoTracker)
    cfg_train = config["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = worker_logger(rank).info
    B, device = cfg_train["batch_size"], step_ctx.device
    vset = ray.get(config["validation_ref"][0]) if stopper is not None and rank == 0 else None
    ks = [int(k) for k in config["eval"]["ks"]]
    # trainer.profile_steps: a torch.profiler table of that many steps of the second epoch (the first compiles)
    profile_epoch = min(start_epoch + 1, cfg_train["epochs"] - 1)
    profiler = (StepProfiler(cfg_train["profile_steps"], os.path.join(config["run_dir"], f"profile_rank{rank}.txt"))
                if cfg_train["profile_steps"] and rank == 0 else None)
    for epoch in range(start_epoch, cfg_train["epochs"]):
        forward.train()
        t0 = time.perf_counter()
        steps, data_wait = 0, 0.0
        loss_sum = torch.zeros((), device=device)
        parts_sum: dict[str, torch.Tensor] = {}
        batches = iter(feed.epoch())
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)  # host time blocked on the data pipeline
            data_wait += time.perf_counter() - t_wait
            if batch is None:
                if epoch + 1 < cfg_train["epochs"]:
                    feed.prefetch_epoch()  # the next pass starts during validation and the checkpoint
                break
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be reused
            if profiler is not None and epoch == profile_epoch:
                profiler.at_step(steps)
            loss, parts = train_step(forward, core, batch, optimizer, step_ctx, scheduler)
            loss_sum += loss
            for k, v in parts.items():
                parts_sum[k] = parts_sum[k] + v if k in parts_sum else v.clone()
            steps += 1
            if rank == 0 and steps % cfg_train["log_every_steps"] == 0:
                mean = finite(loss_sum.item() / steps, epoch, steps)  # the only host sync inside an epoch
                lr, rows_s = scheduler.get_last_lr()[0], steps * B * world / (time.perf_counter() - t0)
                say(f"epoch {epoch} step {steps} loss {mean:.4f} lr {lr:.2e} ({rows_s:,.0f} rows/s)")
                if tracking:  # the epoch's running means so far, at the run's optimiser step
                    tracker.log_metrics({"train/loss": mean, "train/lr": lr, "train/rows_per_s": rows_s,
                                         **{f"train/{k}": v.item() / steps for k, v in parts_sum.items()}},
                                        step_ctx.step)
        if profiler is not None and epoch == profile_epoch:
            profiler.finish()
        if steps == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {B} rows in epoch {epoch}: "
                f"the training split is too small for batch_size x num_workers")
        mean_loss = finite(loss_sum.item() / steps, epoch, steps)  # waits for the last step: true epoch time
        elapsed = time.perf_counter() - t0
        rows = steps * B * world
        metrics = {
            "epoch": epoch, "loss": mean_loss, "steps": steps,
            "rows": rows, "rows_per_s": rows / elapsed, "epoch_s": elapsed, "data_wait_s": data_wait,
            "lr": scheduler.get_last_lr()[0], **{k: v.item() / steps for k, v in parts_sum.items()},
            "device": device_name(device),  # what trained: recorded with the run's results (a report's Runs line)
        }
        metrics.update(peak_memory(device, world))  # every rank takes part: the largest over ranks
        for sync in step_ctx.grad_syncs:  # bytes a step moved outside DDP (sparse tables: instead of an all-reduce)
            key = "table_sync_bytes_per_step" if isinstance(sync, SparseGradSync) else "dense_sync_bytes_per_step"
            metrics[key] = sync.bytes_per_step
        data = config["data_stats"]
        if "rows_used" in data:
            # rows read = trained + remainder (drop_last, equal shards) + impressions + quarantined
            metrics.update(rows_read=data["rows_read"], rows_remainder=data["rows_used"] - metrics["rows"],
                           rows_not_positive=data["rows_not_positive"], rows_rejected=data["rows_quarantined"],
                           rows_validation=data.get("rows_validation", 0))
        improved = stop = False
        if vset is not None:  # rank 0: recall on the validation window with this epoch's model
            t_val = time.perf_counter()
            metrics.update(validation_recall(core, vset, device, ks, step_ctx.autocast(),
                                             boost=config["index"]["recent_boost"]))
            improved = stopper.update(epoch, metrics)
            # not before trainer.min_steps: a small log's first epochs are noisy (on the Tmall sample a
            # run stopped after epoch 2 at the prior's epoch-0 recall while others peaked at epochs 4-8)
            stop = stopper.stop and step_ctx.step >= int(cfg_train["min_steps"])
            metrics.update(best_epoch=stopper.best_epoch, validation_s=time.perf_counter() - t_val)
        if stopper is not None and world > 1:  # every rank stops after the same epoch
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if rank == 0:
            say(f"epoch {epoch} done: loss {metrics['loss']:.4f}, {metrics['rows']:,} rows, "
                f"{metrics['rows_per_s']:,.0f} rows/s, {elapsed:.1f}s (waiting for data {data_wait:.1f}s)")
            if vset is not None:
                val = ", ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
                say(f"epoch {epoch} validation: {val}"
                    + (" (best so far)" if improved else f" (best: epoch {stopper.best_epoch}, "
                                                          f"{stopper.metric} {stopper.best:.4f})"))
            if "rows_read" in metrics:
                say(f"epoch {epoch} rows: read {metrics['rows_read']:,} = trained {metrics['rows']:,} "
                    f"+ batch remainder {metrics['rows_remainder']:,} + not positive "
                    f"{metrics['rows_not_positive']:,} + rejected {metrics['rows_rejected']:,} + validation window "
                    f"{metrics['rows_validation']:,}")
            with open(os.path.join(config["run_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            tracker.log_metrics({f"epoch/{k}": v for k, v in numeric(metrics).items()}, step_ctx.step)
            with tempfile.TemporaryDirectory() as d:
                step_state = dict(step_ctx.state_dict(),
                                  early_stopping=stopper.state_dict() if stopper is not None else None)
                ckpt_io.save(d, core, optimizer, epoch, saved_config, config["feature_spec"], scheduler=scheduler,
                             step_state=step_state, recent_boost=metrics.get("val_recent_boost"))
                if improved:
                    keep_best(d, os.path.join(config["run_dir"], "best"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            if rank == 0:
                say(f"early stopping after epoch {epoch}: {stopper.metric} has not improved for "
                    f"{stopper.patience} epochs; the best epoch is {stopper.best_epoch} ({stopper.best:.4f})")
            break
