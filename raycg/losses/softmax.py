"""In-batch sampled softmax with per-example weights, and the duration weight.

For a batch of B (user u_i, positive item v_i) pairs with unit embeddings:

    logits[i, j] = <u_i, v_j> / T                                   [B, B]
    logits[i, j] = -inf  if item_j == item_i and j != i              (accidental hit)
    loss = (1/B) * sum_i w_i * CE(logits[i], target=i)

Example (two rows, orthogonal embeddings, T=1):
    >>> u = v = torch.eye(2)
    >>> in_batch_softmax_loss(u, v, torch.tensor([0, 1]), torch.ones(2), 1.0)
    tensor(0.3133)          # = log(1 + e^{-1})
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def duration_weight(t: torch.Tensor, t_max: float) -> torch.Tensor:
    """w(t) = log(1 + min(t, t_max)) / log(1 + t_max); 0 at t=0, 1 at t >= t_max."""
    if t_max <= 0:
        raise ValueError(f"loss.t_max must be > 0, got {t_max}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError("click_duration has negative or NaN values; durations are seconds >= 0")
    return torch.log1p(torch.clamp(t, max=t_max)) / math.log1p(t_max)


def example_weights(signals: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Per-row weight from packed signals [B, 4] = (is_conversion, is_click, is_save, duration).

    conversion rows: conversion_weight; click rows: engagement_weight * w(duration)
    (or 1 without duration weighting); save rows: engagement_weight (a deliberate action).
    """
    is_conv, is_click, is_save, dur = signals.unbind(dim=1)
    click_w = duration_weight(dur, cfg["t_max"]) if cfg.get("duration_weighting", True) else torch.ones_like(dur)
    eng = is_click * click_w + is_save
    return cfg["conversion_weight"] * is_conv + cfg["engagement_weight"] * eng


def in_batch_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: torch.Tensor | float,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    logits = user_emb @ item_emb.T / temperature
    if mask_accidental_hits:
        same = item_ids[:, None] == item_ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(user_emb), device=user_emb.device)
    ce = F.cross_entropy(logits, target, reduction="none")
    return (weights * ce).sum() / len(user_emb)
