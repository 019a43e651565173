"""Export each tower as TorchScript for serving, with its normalisation statistics.

    <out>/user_tower.pt   f(user_cat, user_dense, hist_items, hist_actions) -> [B, E] unit vectors
    <out>/item_tower.pt   f(item_cat, item_dense) -> [B, E]
    <out>/feature_spec.json   input columns, dense normalisation mean/std, history length,
                              serving head, temperature
    <out>/checksums.json      SHA-256 of the three files (raycg.checksums.verify_checksums)

The dense normalisation statistics are buffers inside the traced towers (they are applied
by the exported code) and are also written to feature_spec.json for feature pipelines.
Inputs with no columns (e.g. no history) still take a [B, 0] tensor, so the signature is fixed.

    python -m raycg.export run_dir=runs/<name>      # latest checkpoint -> runs/<name>/export
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from raycg.checksums import write_checksums
from raycg.model.card import example_batch
from raycg.model.two_tower import TwoTowerModel


class UserTowerForServing(nn.Module):
    def __init__(self, model: TwoTowerModel):
        super().__init__()
        self.model = model

    def forward(self, user_cat, user_dense, hist_items, hist_actions):
        batch = {"user_cat": user_cat, "user_dense": user_dense}
        if self.model.spec.history_length:
            batch.update(hist_items=hist_items, hist_actions=hist_actions)
        return self.model.embed_users(batch)


class ItemTowerForServing(nn.Module):
    def __init__(self, model: TwoTowerModel):
        super().__init__()
        self.model = model

    def forward(self, item_cat, item_dense):
        return self.model.embed_items({"item_cat": item_cat, "item_dense": item_dense})


def user_inputs(batch: dict) -> tuple:
    b = batch["user_cat"].shape[0]
    empty = torch.zeros(b, 0, dtype=torch.long)
    return (batch["user_cat"], batch["user_dense"], batch.get("hist_items", empty), batch.get("hist_actions", empty))


def export_towers(model: TwoTowerModel, out_dir: str) -> dict[str, str]:
    """Trace both towers (eval mode) and write them + feature_spec.json to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    model = model.eval()
    example = example_batch(model, batch=4)
    paths = {"user_tower": os.path.join(out_dir, "user_tower.pt"), "item_tower": os.path.join(out_dir, "item_tower.pt")}
    with torch.no_grad(), warnings.catch_warnings():
        # shape-only Python branches (history length) are fixed at export, by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        user = torch.jit.trace(UserTowerForServing(model), user_inputs(example), check_trace=False)
        item = torch.jit.trace(ItemTowerForServing(model), (example["item_cat"], example["item_dense"]),
                               check_trace=False)
    user.save(paths["user_tower"])
    item.save(paths["item_tower"])
    meta = dict(model.spec.to_dict(), serve_head=model.serve_head, temperature=float(model.temperature))
    paths["feature_spec"] = os.path.join(out_dir, "feature_spec.json")
    with open(paths["feature_spec"], "w") as f:
        json.dump(meta, f, indent=2)
    write_checksums(out_dir, [os.path.basename(p) for p in paths.values()])
    return paths
