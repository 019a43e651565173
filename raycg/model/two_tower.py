"""The two-tower retrieval model: user/query tower and item tower, score = <u, v> / T.

`model.item_bias=learned|prior`: score = <u, v> / T + b_i, with b_i a scalar the item tower
reads out of its body (prior: plus w * log(1 + the item's training-window events)). Served as one inner product, so that training, evaluation, faiss and the export need
nothing else: item vector [v, b] [B, E + 1], user vector [u, T] [B, E + 1], and
<[u, T], [v, b]> / T = <u, v> / T + b. Example (T = 0.5): u = v = [1, 0], b = 2 -> score 2 + 2 = 4.

`model.history.match_dim=D > 0` (with a history): an exact-match term for the user's recent
items, served the same way: user [.., T m(u)], item [.., c(i)] adds <m(u), c(i)>
(raycg.model.repeat_match). `score_extras` counts these trailing columns.

`model.heads=unified`: one embedding per tower, trained on both tasks.
`model.heads=multi_head`: separate `engagement` and `conversion` heads on shared encoders;
retrieval/evaluation serves `model.serve_head` (default: conversion).

Inputs are the packed tensors of raycg.data.batches; which columns exist, their bucket
names and the dense normalisation statistics come from a `FeatureSpec`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from raycg.data.spec import FeatureSpec
from raycg.model.towers import Tower

ITEM_BIASES = ("none", "learned", "prior")


class TwoTowerModel(nn.Module):
    """User tower reads `user_cat` [B, len(spec.user_cat)] + `user_dense` [B, spec.user_dense]
    (+ `hist_items`/`hist_actions` [B, L] when spec.history_length > 0); item tower reads
    `item_cat` [B, len(spec.item_cat)] + `item_dense` [B, spec.item_dense].

    Config keys (raycg/conf/model/*.yaml, every one required: raycg.config.schema.ModelConfig): cross,
    cross_layers, low_rank, num_experts, mlp_dims, head_dims, embedding_dim, id_dim,
    cross_dropout, embedding_dropout, buckets.<name>, vocab.oov_buckets, sparse_tables, temperature,
    learn_temperature, item_bias, heads, serve_head, history.{layers, heads, share_item_embedding,
    match_dim, match_length, match_init}.
    """

    def __init__(self, cfg: dict, spec: FeatureSpec | int):
        super().__init__()
        if isinstance(spec, int):  # item content width only: the minimal feature set
            spec = FeatureSpec(item_dense=spec)
        self.spec = spec
        b = cfg["buckets"]
        if cfg["item_bias"] not in ITEM_BIASES:
            raise ValueError(f"model.item_bias={cfg['item_bias']!r}: expected one of {list(ITEM_BIASES)}")
        if cfg["item_bias"] == "prior" and spec.item_cat[:1] != ["item"]:
            raise ValueError("model.item_bias=prior needs the item id as the item tower's first column")
        self.item_bias = cfg["item_bias"] != "none"
        self.item_tower = Tower(spec.item_cat, cfg["id_dim"], spec.item_dense, cfg,
                                spec.item_dense_mean, spec.item_dense_std, bias=str(cfg["item_bias"]))
        history = None
        if spec.history_length > 0:
            from raycg.model.history import HistoryEncoder

            h = cfg["history"]
            share = h["share_item_embedding"] and spec.item_cat and spec.item_cat[0] == "item"
            item_rows = b["item"] if "item" in b else self.item_tower.embeddings[0].num_buckets
            # the data packs spec.history_length actions; the encoder reads the last `length`
            self.encoder_length = min(int(h.get("length") or spec.history_length), spec.history_length)
            history = HistoryEncoder(item_rows, cfg["id_dim"], num_layers=h["layers"],
                                     num_heads=h["heads"], max_len=self.encoder_length,
                                     item_embedding=self.item_tower.embeddings[0] if share else None,
                                     sparse=bool(cfg["sparse_tables"]))
        self.user_tower = Tower(spec.user_cat, cfg["id_dim"], spec.user_dense, cfg,
                                spec.user_dense_mean, spec.user_dense_std, history)
        match_dim = int(cfg.get("history", {}).get("match_dim", 0))
        if match_dim > 0 and spec.history_length > 0:  # raycg.model.repeat_match
            if spec.item_cat[:1] != ["item"]:
                raise ValueError("model.history.match_dim > 0 needs the item id as the item tower's first column")
            from raycg.model.repeat_match import RepeatMatch

            self.repeat_match = RepeatMatch(match_dim, spec.history_length, cfg["history"]["match_init"])
        # trailing columns of both vectors that are score terms, not the unit embedding: [T | b], [T m | c]
        self.score_extras = int(self.item_bias) + (match_dim if hasattr(self, "repeat_match") else 0)
        heads = tuple(self.user_tower.heads)
        self.serve_head = cfg["serve_head"] or ("conversion" if "conversion" in heads else heads[0])
        if self.serve_head not in heads:
            raise ValueError(f"model.serve_head={self.serve_head!r}: the model has heads {heads}")
        log_t = torch.tensor(math.log(cfg["temperature"]))
        if cfg["learn_temperature"]:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    def set_vocabularies(self, vocab: dict) -> None:
        """Fill every vocabulary table's ids ({feature: sorted ids}, raycg.data.vocab); a
        feature used by both towers (the item id: history and item tower) is filled once."""
        for tower in (self.item_tower, self.user_tower):
            for name, emb in zip(tower.names, tower.embeddings):
                if hasattr(emb, "set_vocabulary"):
                    emb.set_vocabulary(vocab[name])

    def set_item_prior(self, ids, counts) -> None:
        """model.item_bias=prior: the item prior from the training window's item event counts."""
        if hasattr(self.item_tower, "prior"):
            self.item_tower.set_prior(ids, counts)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def user_heads(self, batch: dict) -> dict[str, torch.Tensor]:
        hist_items, hist_actions = batch.get("hist_items"), batch.get("hist_actions")
        if hist_items is not None and hasattr(self, "encoder_length"):  # most recent last: the tail
            hist_items, hist_actions = hist_items[:, -self.encoder_length:], hist_actions[:, -self.encoder_length:]
        out = self.user_tower(batch["user_cat"], batch.get("user_dense"), hist_items, hist_actions)
        if self.item_bias:  # [u, T]: its inner product with [v, b], over T, adds b (module docstring)
            out = {h: torch.cat([u, torch.ones_like(u[:, :1]) * self.temperature.to(u.dtype)], dim=-1)
                   for h, u in out.items()}  # ones_like: the batch size stays symbolic for torch.export
        if hasattr(self, "repeat_match"):  # [.., T m]: its inner product with [.., c], over T, adds <m, c>
            m = self.repeat_match(batch["hist_items"], batch["hist_actions"])
            out = {h: torch.cat([u, (m * self.temperature).to(u.dtype)], dim=-1) for h, u in out.items()}
        return out

    def item_heads(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.item_tower(batch["item_cat"], batch.get("item_dense"))
        if hasattr(self, "repeat_match"):
            c = self.repeat_match.codes(batch["item_cat"][:, 0])
            out = {h: torch.cat([v, c.to(v.dtype)], dim=-1) for h, v in out.items()}
        return out

    def embed_users(self, batch: dict) -> torch.Tensor:
        """Serving embedding of the user/query tower [B, E]."""
        return self.user_heads(batch)[self.serve_head]

    def embed_items(self, batch: dict) -> torch.Tensor:
        """Serving embedding of the item tower [B, E]."""
        return self.item_heads(batch)[self.serve_head]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """All heads of both towers: ({head: user emb [B, E]}, {head: item emb [B, E]})."""
        return self.user_heads(batch), self.item_heads(batch)
