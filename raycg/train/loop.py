"""The per-worker training loop (runs inside each Ray Train worker). Reads top to bottom."""
from __future__ import annotations

import json
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch

from raycg.losses.objective import training_loss
from raycg.model.two_tower import TwoTowerModel
from raycg.train import checkpoint as ckpt_io


def train_step(model, core: TwoTowerModel, batch: dict, optimizer, cfg_loss: dict) -> torch.Tensor:
    """One optimisation step on a packed batch (see raycg.data.batches). Returns the loss."""
    user_out, item_out = model(batch)
    loss, _ = training_loss(user_out, item_out, batch, cfg_loss, core.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_loop_per_worker(config: dict) -> None:
    cfg_model, cfg_loss, cfg_train = config["model"], config["loss"], config["trainer"]
    item_dense_dim = config["item_dense_dim"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])

    # -- model, optimiser, resume -------------------------------------------------------
    model = TwoTowerModel(cfg_model, item_dense_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"])
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = ckpt_io.load_state(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
            loss = train_step(model, core, batch, optimizer, cfg_loss)
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
        if rank == 0:
            print(f"[raycg] epoch {epoch} done: loss {metrics['loss']:.4f}, {metrics['rows']:,} rows, "
                  f"{metrics['rows_per_s']:,.0f} rows/s, {elapsed:.1f}s", flush=True)
            with open(os.path.join(config["run_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            with tempfile.TemporaryDirectory() as d:
                ckpt_io.save(d, core, optimizer, epoch, config, item_dense_dim)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
