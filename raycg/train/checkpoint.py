"""What a raycg checkpoint holds, and loading a model back from one.

    <checkpoint dir>/model.pt     {"model": state_dict, "optimizer": ..., "epoch": int,
                                   "step": int, "freq": logQ estimator state or None}
    <checkpoint dir>/meta.json    {"config": full run config, "feature_spec": FeatureSpec dict}
"""
from __future__ import annotations

import json
import os

import torch

from raycg.data.features import FeatureSpec
from raycg.model.two_tower import TwoTowerModel


def save(directory: str, model, optimizer, epoch: int, config: dict, spec: dict,
         step: int = 0, freq: dict | None = None) -> None:
    """`step` (global optimiser step) and `freq` (logQ estimator state) resume the loss state."""
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
         "step": step, "freq": freq},
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
