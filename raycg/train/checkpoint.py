"""What a raycg checkpoint holds, and loading a model back from one.

    <checkpoint dir>/model.pt     {"model": state_dict, "optimizer": ..., "epoch": int,
                                   "scheduler": LR schedule state, "step": int,
                                   "freq": logQ estimator state or None, "gen": generator state}
    <checkpoint dir>/meta.json    {"config": full run config, "feature_spec": FeatureSpec dict}
"""
from __future__ import annotations

import json
import os

import torch

from raycg.data.features import FeatureSpec
from raycg.model.two_tower import TwoTowerModel


def save(directory: str, model, optimizer, epoch: int, config: dict, spec: dict,
         scheduler=None, step_state: dict | None = None) -> None:
    """`step_state` (raycg.train.step.StepContext.state_dict: global step, logQ estimator,
    generator) resumes the loss state. Tensors are saved from wherever they live (a GPU
    checkpoint loads on a CPU-only machine: `load_state` maps everything to the CPU)."""
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
         "scheduler": scheduler.state_dict() if scheduler is not None else None, **(step_state or {})},
        os.path.join(directory, "model.pt"),
    )
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"config": config, "feature_spec": spec, "epoch": epoch}, f)


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True)


def load_model(directory: str) -> tuple[TwoTowerModel, dict]:
    """Model in eval mode + the run config it was trained with."""
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    model = TwoTowerModel(meta["config"]["model"], FeatureSpec.from_dict(meta["feature_spec"]))
    model.load_state_dict(load_state(directory)["model"])
    model.eval()
    return model, meta["config"]
