"""Sampled softmax (in-batch, mixed, cross-worker and hard negatives) with per-example weights.

For a batch of B (user u_i, positive item v_i) pairs, row i scores its target v_i against
    - the B in-batch positives v_j                      (column i is the target)    [B, B]
    - N shared extra candidates c_n (uniform corpus samples = mixed negatives, Yang et al. 2020,
      or other workers' positives = cross-worker negatives)                           [B, N]
    - its own H hard negatives h_ik (id -1 = padding)                                 [B, H]

    s(u, c)       = <u, c> / T - log q(c)        (logQ correction, Yi et al. 2019; q optional)
    s[i, col]     = -inf  if id(col) == id(v_i) and col is not the target             (accidental hit)
    s[i, h_ik]    = -inf  if id(h_ik) == -1                                           (padding)
    loss = (1/B) * sum_i w_i * CE([s_i,in-batch | s_i,shared | s_i,hard], target=i)

Subtracting log q lowers the logit of items that are sampled often (popular items appear as
in-batch negatives more than their share), which removes the popularity bias of in-batch
negatives. The target column is corrected too (as in Yi et al.). Only differences of log q
between the columns of a row matter, so q may be given up to a constant factor.

Example (two rows, orthogonal embeddings, T=1):
    >>> u = v = torch.eye(2)
    >>> in_batch_softmax_loss(u, v, torch.tensor([0, 1]), torch.ones(2), 1.0)
    tensor(0.3133)          # = log(1 + e^{-1})
    >>> sampled_softmax_loss(u, v, torch.tensor([0, 1]), torch.ones(2), 1.0,
    ...                      pos_log_q=torch.log(torch.tensor([0.5, 0.5])))
    tensor(0.3133)          # equal q: the correction cancels
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def duration_weight(t: torch.Tensor, t_max: float) -> torch.Tensor:
    """w(t) = log(1 + min(t, t_max)) / log(1 + t_max); 0 at t=0, 1 at t >= t_max.

    Durations are checked (>= 0, finite) by data validation (raycg.data.schema), not here:
    a check on the values would read them back to the host every step.
    """
    if t_max <= 0:
        raise ValueError(f"loss.t_max must be > 0, got {t_max}")
    return torch.log1p(torch.clamp(t, max=t_max)) / math.log1p(t_max)


def task_weights(signals: torch.Tensor, cfg: dict) -> dict[str, torch.Tensor]:
    """{"conversion": [B], "engagement": [B]} weights; see `example_weights`."""
    is_conv, is_click, is_save, dur = signals.unbind(dim=1)
    weighting = cfg["duration_weighting"]
    if not isinstance(weighting, bool):  # "auto" is resolved from the data by the driver
        raise ValueError(f"loss.duration_weighting={weighting!r}: expected true or false here (auto is resolved "
                         "from the training split by raycg.train.driver.resolve_duration_weighting)")
    click_w = duration_weight(dur, cfg["t_max"]) if weighting else torch.ones_like(dur)
    return {
        "conversion": cfg["conversion_weight"] * is_conv,
        "engagement": cfg["engagement_weight"] * (is_click * click_w + is_save),
    }


def example_weights(signals: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Per-row weight from packed signals [B, 4] = (is_conversion, is_click, is_save, duration).

    conversion rows: conversion_weight; click rows: engagement_weight * w(duration)
    (or 1 without duration weighting); save rows: engagement_weight (a deliberate action).
    """
    w = task_weights(signals, cfg)
    return w["conversion"] + w["engagement"]


def in_batch_softmax_loss(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: torch.Tensor | float,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    """In-batch negatives only: `sampled_softmax_loss` with no extra candidates and no logQ."""
    return sampled_softmax_loss(user_emb, item_emb, item_ids, weights, temperature,
                                mask_accidental_hits=mask_accidental_hits)


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    pos_ids: torch.Tensor,
    weights: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    cand_emb: torch.Tensor | None = None,
    cand_ids: torch.Tensor | None = None,
    hard_emb: torch.Tensor | None = None,
    hard_ids: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
    cand_log_q: torch.Tensor | None = None,
    hard_log_q: torch.Tensor | None = None,
    mask_accidental_hits: bool = True,
) -> torch.Tensor:
    """Weighted sampled softmax over in-batch + shared + per-row hard candidates (module docstring).

    user_emb, pos_emb [B, d]; pos_ids, weights [B]; cand_emb [N, d], cand_ids [N];
    hard_emb [B, H, d], hard_ids [B, H] (-1 = padding, always masked); *_log_q: log q of the
    matching candidates (omit for no correction). Ids are only needed for masking: without
    cand_ids / hard_ids those candidates are never treated as accidental hits.

    Cross-worker negatives: pass the other ranks' positives as cand_emb / cand_ids / cand_log_q
    (see raycg.losses.distributed.gather_cross_worker_candidates); the local positives stay the
    in-batch block, so the target of row i is still column i.
    """
    B = user_emb.shape[0]
    logits = user_emb @ pos_emb.T / temperature                                   # [B, B]
    if pos_log_q is not None:
        logits = logits - pos_log_q.to(logits.dtype)[None, :]
    if mask_accidental_hits:
        same = (pos_ids[:, None] == pos_ids[None, :]) & ~torch.eye(B, dtype=torch.bool, device=pos_ids.device)
        logits = logits.masked_fill(same, float("-inf"))
    blocks = [logits]

    if cand_emb is not None and cand_emb.shape[0] > 0:
        shared = user_emb @ cand_emb.T / temperature                              # [B, N]
        if cand_log_q is not None:
            shared = shared - cand_log_q.to(shared.dtype)[None, :]
        if mask_accidental_hits and cand_ids is not None:
            shared = shared.masked_fill(cand_ids[None, :] == pos_ids[:, None], float("-inf"))
        blocks.append(shared)

    if hard_emb is not None and hard_emb.shape[1] > 0:
        hard = torch.einsum("bd,bhd->bh", user_emb, hard_emb) / temperature      # [B, H]
        if hard_log_q is not None:
            hard = hard - hard_log_q.to(hard.dtype)
        if hard_ids is not None:
            drop = hard_ids == -1
            if mask_accidental_hits:
                drop = drop | (hard_ids == pos_ids[:, None])
            hard = hard.masked_fill(drop, float("-inf"))
        blocks.append(hard)

    all_logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    target = torch.arange(B, device=user_emb.device)
    ce = F.cross_entropy(all_logits, target, reduction="none")
    return (weights * ce).sum() / B
