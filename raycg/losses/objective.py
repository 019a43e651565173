"""The training objective, composed from `raycg/conf/loss/*.yaml` (every key required).

Per head h (unified: one head, both tasks; multi_head: `conversion` and `engagement`),
a weighted sampled softmax (raycg.losses.softmax) whose candidates are

    in-batch positives                      always
    other DDP ranks' positives              loss.cross_worker_negatives (N workers -> N x B)
    uniform corpus samples                  loss.mixed_negatives = M per step (Yang et al. 2020)
    the row's impression hard negatives     loss.hard_negatives = H per row

with logQ correction (loss.log_q_correction): in-batch and cross-worker candidates use
log q from the streaming frequency estimator (updated with the global batch every step);
uniform samples use log(M / corpus size); hard negatives are not corrected.

    unified:     L = softmax_h(w_conv + w_eng)
    multi_head:  L = softmax_conv(w_conv) + softmax_eng(w_eng)
    + loss.advertiser_weight * advertiser_softmax(serving head, w_conv)
      (per worker, or per block of loss.advertiser_block_rows rows: raycg.losses.advertiser)

Task weights: conversion rows `conversion_weight`; click rows `engagement_weight x
duration weight`; save rows `engagement_weight`. Conversion-only / engagement-only training
sets the other weight to 0 (those rows then only serve as in-batch negatives).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from raycg.losses.advertiser import advertiser_softmax_loss
from raycg.losses.distributed import gather_cross_worker_candidates
from raycg.losses.frequency import StreamingFrequencyEstimator
from raycg.losses.softmax import sampled_softmax_loss, task_weights


@dataclass
class Candidates:
    """Item-tower outputs for the extra candidates of one step (per head)."""

    hard: dict | None = None  # head -> [B, H, E]
    hard_ids: torch.Tensor | None = None  # [B, H], -1 = padding
    mixed: dict | None = None  # head -> [M, E]
    mixed_ids: torch.Tensor | None = None  # [M]
    mixed_log_q: float | None = None


@dataclass(frozen=True)
class LossKernels:
    """The loss arithmetic, swappable for compiled versions (`trainer.compile`). Collectives
    (cross-worker gathers) stay outside these functions, so they compile without graph breaks."""

    softmax: Callable = sampled_softmax_loss
    advertiser: Callable = advertiser_softmax_loss

    @classmethod
    def compiled(cls, mode: str | None = None) -> "LossKernels":
        return cls(softmax=torch.compile(sampled_softmax_loss, dynamic=False, mode=mode),
                   advertiser=torch.compile(advertiser_softmax_loss, dynamic=False, mode=mode))


EAGER = LossKernels()


def training_loss(
    user_out: dict, item_out: dict, batch: dict, cfg: dict, temperature,
    extra: Candidates | None = None, freq: StreamingFrequencyEstimator | None = None,
    serve_head: str | None = None, kernels: LossKernels = EAGER, score_extras: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Total loss and its named parts (detached 0-d tensors on the loss's device: reading them
    is a host synchronisation, so the caller decides when). `score_extras`: the last columns of
    the embeddings are score terms (the bias pair [T | b], the repeat match [T m | c];
    raycg.model.two_tower); the advertiser softmax, which averages item vectors per advertiser,
    reads the unit embeddings without them."""
    extra = extra or Candidates()
    weights = task_weights(batch["signals"], cfg)
    pos_ids = batch["item_cat"][:, 0]
    heads = {"unified": weights["conversion"] + weights["engagement"]} if "unified" in user_out else weights
    pos_log_q = freq.log_q(pos_ids) if (freq is not None and cfg["log_q_correction"]) else None
    parts = {}
    for head, w in heads.items():
        cand_emb, cand_ids, cand_log_q = None, None, None
        if cfg["cross_worker_negatives"]:
            cand_emb, cand_ids, cand_log_q = gather_cross_worker_candidates(item_out[head], pos_ids, pos_log_q)
        if extra.mixed is not None:
            m_emb, m_ids = extra.mixed[head], extra.mixed_ids
            m_log_q = None
            if pos_log_q is not None:
                m_log_q = torch.full((len(m_ids),), extra.mixed_log_q, dtype=pos_log_q.dtype, device=pos_log_q.device)
            if cand_emb is None:
                cand_emb, cand_ids, cand_log_q = m_emb, m_ids, m_log_q
            else:
                cand_emb = torch.cat([cand_emb, m_emb])
                cand_ids = torch.cat([cand_ids, m_ids])
                cand_log_q = torch.cat([cand_log_q, m_log_q]) if m_log_q is not None else None
        parts[head] = kernels.softmax(
            user_out[head], item_out[head], pos_ids, w, temperature,
            cand_emb=cand_emb, cand_ids=cand_ids, cand_log_q=cand_log_q,
            hard_emb=extra.hard[head] if extra.hard is not None else None, hard_ids=extra.hard_ids,
            pos_log_q=pos_log_q, mask_accidental_hits=cfg["mask_accidental_hits"],
        )
    if cfg["advertiser_weight"] > 0:
        head = serve_head if serve_head in user_out else next(iter(user_out))
        u, v = user_out[head], item_out[head]
        if score_extras:
            u, v = u[:, :-score_extras], v[:, :-score_extras]
        parts["advertiser"] = cfg["advertiser_weight"] * kernels.advertiser(
            u, v, batch["item_cat"][:, 1], weights["conversion"], temperature, cfg["advertiser_block_rows"])
    total = sum(parts.values())
    return total, {f"loss_{k}": v.detach() for k, v in parts.items()}


def mixed_log_q(num_samples: int, corpus_size: int) -> float:
    """log of the per-step probability that a given item is among M uniform draws (~ M / C)."""
    return math.log(-math.expm1(num_samples * math.log1p(-1.0 / corpus_size))) if corpus_size > 1 else 0.0
