"""The per-worker training loop (runs inside each Ray Train worker). Reads top to bottom."""
from __future__ import annotations

import json
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch

from raycg.data.features import FeatureSpec
from raycg.losses.frequency import StreamingFrequencyEstimator
from raycg.losses.objective import Candidates, mixed_log_q, training_loss
from raycg.model.two_tower import TwoTowerModel
from raycg.train import checkpoint as ckpt_io


class StepContext:
    """What a step needs beyond the batch: corpus tensors for extra negatives, the logQ
    frequency estimator and the global step (identical on every rank)."""

    def __init__(self, cfg_loss: dict, items=None, seed: int = 0, freq_buckets: int = 1):
        self.cfg = cfg_loss
        self.step = 0
        self.item_cat = torch.from_numpy(items.cat) if items is not None else None
        self.item_dense = torch.from_numpy(items.dense) if items is not None else None
        self.gen = torch.Generator().manual_seed(seed)
        self.freq = None
        if cfg_loss.get("log_q_correction", False):
            self.freq = StreamingFrequencyEstimator(freq_buckets, alpha=cfg_loss.get("freq_alpha", 0.01))

    def extra_items(self, batch: dict) -> tuple[dict, Candidates, int, int]:
        """Batch with hard/mixed candidate items appended to the item side (one tower call,
        inside the DDP forward); returns (batch, ids of the extras, H, M)."""
        H = batch["hard_rows"].shape[1] if "hard_rows" in batch else 0
        M = int(self.cfg.get("mixed_negatives", 0))
        if H == 0 and M == 0:
            return batch, Candidates(), 0, 0
        rows = [batch["hard_rows"].reshape(-1).clamp(min=0)] if H else []
        if M:
            rows.append(torch.randint(0, len(self.item_cat), (M,), generator=self.gen))
        rows = torch.cat(rows)
        out = dict(batch)
        out["item_cat"] = torch.cat([batch["item_cat"], self.item_cat[rows]])
        out["item_dense"] = torch.cat([batch["item_dense"], self.item_dense[rows]])
        ids = self.item_cat[rows, 0]
        extra = Candidates()
        if H:
            hard_ids = ids[: len(batch["hard_rows"]) * H].reshape(-1, H)
            extra.hard_ids = torch.where(batch["hard_rows"] < 0, torch.full_like(hard_ids, -1), hard_ids)
        if M:
            extra.mixed_ids = ids[len(ids) - M:]
            extra.mixed_log_q = mixed_log_q(M, len(self.item_cat))
        return out, extra, H, M


def train_step(model, core: TwoTowerModel, batch: dict, optimizer, ctx: StepContext) -> tuple[torch.Tensor, dict]:
    """One optimisation step on a packed batch (see raycg.data.batches). Returns (loss, parts)."""
    B = len(batch["signals"])
    if ctx.freq is not None:
        ctx.freq.update_global(batch["item_cat"][:, 0], ctx.step)
    augmented, extra, H, M = ctx.extra_items(batch)
    user_out, item_all = model(augmented)
    item_out = {h: v[:B] for h, v in item_all.items()}
    if H:
        extra.hard = {h: v[B:B + B * H].reshape(B, H, -1) for h, v in item_all.items()}
    if M:
        extra.mixed = {h: v[len(v) - M:] for h, v in item_all.items()}
    loss, parts = training_loss(user_out, item_out, batch, ctx.cfg, core.temperature, extra, ctx.freq,
                                core.serve_head)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ctx.step += 1
    return loss.detach(), parts


def train_loop_per_worker(config: dict) -> None:
    cfg_model, cfg_loss, cfg_train = config["model"], config["loss"], config["trainer"]
    spec = FeatureSpec.from_dict(config["feature_spec"])
    saved_config = {k: v for k, v in config.items() if k != "store_ref"}  # the ref is not JSON
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])

    # -- model, optimiser, resume -------------------------------------------------------
    model = TwoTowerModel(cfg_model, spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"])
    needs_corpus = cfg_loss.get("mixed_negatives", 0) > 0 or cfg_loss.get("hard_negatives", 0) > 0
    step_ctx = StepContext(cfg_loss, ray.get(config["store_ref"][0]).items if needs_corpus else None,
                           seed=config["seed"] + rank, freq_buckets=cfg_model["buckets"]["item"])
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = ckpt_io.load_state(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step_ctx.step = state.get("step", 0)
        if step_ctx.freq is not None and state.get("freq") is not None:
            step_ctx.freq.load_state_dict(state["freq"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"[raycg] resuming from checkpoint after epoch {state['epoch']}", flush=True)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    shard = ray.train.get_dataset_shard("train")

    for epoch in range(start_epoch, cfg_train["epochs"]):
        model.train()
        t0 = time.perf_counter()
        steps, rows, loss_sum = 0, 0, 0.0
        for batch in shard.iter_torch_batches(
            batch_size=cfg_train["batch_size"], drop_last=True, prefetch_batches=cfg_train["prefetch_batches"]
        ):
            loss, _ = train_step(model, core, batch, optimizer, step_ctx)
            steps += 1
            rows += len(batch["signals"])
            loss_sum += loss.item()
            if rank == 0 and steps % cfg_train["log_every_steps"] == 0:
                print(f"[raycg] epoch {epoch} step {steps} loss {loss_sum / steps:.4f} "
                      f"({rows * world / (time.perf_counter() - t0):,.0f} rows/s)", flush=True)
        if steps == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {cfg_train['batch_size']} rows in epoch {epoch}: "
                f"the training split is too small for batch_size x num_workers")
        elapsed = time.perf_counter() - t0
        metrics = {
            "epoch": epoch, "loss": loss_sum / steps, "steps": steps,
            "rows": rows * world, "rows_per_s": rows * world / elapsed, "epoch_s": elapsed,
        }
        data = config.get("data_stats") or {}
        if "rows_used" in data:
            # rows read = trained + remainder (drop_last, equal shards) + impressions + quarantined
            metrics.update(rows_read=data["rows_read"], rows_remainder=data["rows_used"] - metrics["rows"],
                           rows_not_positive=data["rows_not_positive"], rows_rejected=data["rows_quarantined"])
        if rank == 0:
            print(f"[raycg] epoch {epoch} done: loss {metrics['loss']:.4f}, {metrics['rows']:,} rows, "
                  f"{metrics['rows_per_s']:,.0f} rows/s, {elapsed:.1f}s", flush=True)
            if "rows_read" in metrics:
                print(f"[raycg] epoch {epoch} rows: read {metrics['rows_read']:,} = trained {metrics['rows']:,} "
                      f"+ batch remainder {metrics['rows_remainder']:,} + not positive "
                      f"{metrics['rows_not_positive']:,} + rejected {metrics['rows_rejected']:,}", flush=True)
            with open(os.path.join(config["run_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with tempfile.TemporaryDirectory() as d:
                ckpt_io.save(d, core, optimizer, epoch, saved_config, config["feature_spec"], step=step_ctx.step,
                             freq=step_ctx.freq.state_dict() if step_ctx.freq is not None else None)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
