"""The training objective: task losses on the configured heads, composed from config.

    unified:     L = softmax(u, v; w_conv + w_eng)                  one embedding space
    multi_head:  L = softmax(u_conv, v_conv; w_conv) + softmax(u_eng, v_eng; w_eng)

with per-example weights from `example_weights` (conversion rows: conversion_weight;
click rows: engagement_weight x duration weight; save rows: engagement_weight).
"""
from __future__ import annotations

import torch

from raycg.losses.softmax import in_batch_softmax_loss, task_weights


def training_loss(user_out: dict, item_out: dict, batch: dict, cfg: dict, temperature) -> tuple[torch.Tensor, dict]:
    """Total loss and its named parts (floats, for logging)."""
    weights = task_weights(batch["signals"], cfg)
    item_ids = batch["item_cat"][:, 0]
    heads = {"unified": weights["conversion"] + weights["engagement"]} if "unified" in user_out else weights
    parts = {}
    for head, w in heads.items():
        parts[head] = in_batch_softmax_loss(user_out[head], item_out[head], item_ids, w, temperature,
                                            mask_accidental_hits=cfg["mask_accidental_hits"])
    total = sum(parts.values())
    return total, {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
