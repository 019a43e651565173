"""The two-tower retrieval model: user/query tower and item tower, score = <u, v> / T.

`model.heads=unified`: one embedding per tower, trained on both tasks.
`model.heads=multi_head`: separate `engagement` and `conversion` heads on shared encoders;
retrieval/evaluation serves `model.serve_head` (default: conversion).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from raycg.model.towers import Tower


class TwoTowerModel(nn.Module):
    """user tower reads `user_cat` [B, 4]; item tower reads `item_cat` [B, 3] + `item_dense` [B, D].

    Config keys (conf/model/*.yaml): cross, cross_layers, low_rank, mlp_dims, head_dims,
    embedding_dim, id_dim, buckets.{user,surface,context_item,query,item,advertiser,category},
    temperature, learn_temperature, heads, serve_head.
    """

    def __init__(self, cfg: dict, item_dense_dim: int):
        super().__init__()
        b = cfg["buckets"]
        self.user_tower = Tower([b["user"], b["surface"], b["context_item"], b["query"]], cfg["id_dim"], 0, cfg)
        self.item_tower = Tower([b["item"], b["advertiser"], b["category"]], cfg["id_dim"], item_dense_dim, cfg)
        heads = tuple(self.user_tower.heads)
        self.serve_head = cfg.get("serve_head") or ("conversion" if "conversion" in heads else heads[0])
        if self.serve_head not in heads:
            raise ValueError(f"model.serve_head={self.serve_head!r}: the model has heads {heads}")
        log_t = torch.tensor(math.log(cfg["temperature"]))
        if cfg.get("learn_temperature", False):
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def embed_users(self, user_cat: torch.Tensor) -> torch.Tensor:
        """Serving embedding of the user/query tower [B, E]."""
        return self.user_tower(user_cat)[self.serve_head]

    def embed_items(self, item_cat: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """Serving embedding of the item tower [B, E]."""
        return self.item_tower(item_cat, item_dense)[self.serve_head]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """All heads of both towers: ({head: user emb [B, E]}, {head: item emb [B, E]})."""
        return self.user_tower(batch["user_cat"]), self.item_tower(batch["item_cat"], batch["item_dense"])
