"""Tower bodies (cross network + MLP arrangements) and the towers built on them.

Structures over the tower input x0 [B, D]:

    parallel    concat(D(CrossNet(x0)), MLP(x0))   the 2023 design: both read x0
    stacked     MLP(D(CrossNet(x0)))               the older baseline it beat
    cross_only  D(CrossNet(x0))
    mlp_only    MLP(x0)

D is dropout on the cross path (`model.cross_dropout`, training only; identity at 0 and in eval
mode): it keeps the body from leaning on a few crossed features, one of the conditions under
which the parallel/stacked comparison is tested (issue #17).

A tower = feature encoders -> x0 -> body -> head MLP -> Linear -> L2-normalised embedding.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raycg.data.lookup import find_sorted_torch
from raycg.model.cross import CrossNetwork
from raycg.model.mlp import MLP

STRUCTURES = ("parallel", "stacked", "cross_only", "mlp_only")


class TowerBody(nn.Module):
    def __init__(self, in_dim: int, structure: str, cross_layers: int, low_rank: int | None, mlp_dims: list[int],
                 num_experts: int = 1, cross_dropout: float = 0.0):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"model.cross={structure!r}: expected one of {STRUCTURES}")
        if not 0.0 <= cross_dropout < 1.0:
            raise ValueError(f"model.cross_dropout={cross_dropout}: expected a probability in [0, 1)")
        self.structure = structure
        self.cross = CrossNetwork(in_dim, cross_layers, low_rank, num_experts) if structure != "mlp_only" else None
        self.cross_dropout = nn.Dropout(cross_dropout)
        mlp_in = in_dim  # stacked: MLP reads the cross output, which has x0's width
        self.mlp = MLP(mlp_in, mlp_dims) if structure != "cross_only" else None
        self.out_dim = {
            "parallel": in_dim + (mlp_dims[-1] if mlp_dims else in_dim),
            "stacked": self.mlp.out_dim if self.mlp else in_dim,
            "cross_only": in_dim,
            "mlp_only": self.mlp.out_dim if self.mlp else in_dim,
        }[structure]

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if self.structure == "mlp_only":
            return self.mlp(x0)
        crossed = self.cross_dropout(self.cross(x0))
        if self.structure == "parallel":
            return torch.cat([crossed, self.mlp(x0)], dim=-1)
        if self.structure == "stacked":
            return self.mlp(crossed)
        return crossed


def table(rows: int, dim: int, sparse: bool = False) -> nn.Embedding:
    """An id table whose row 0 is the zero row of missing ids. Dense: `padding_idx=0`. Sparse
    (`model.sparse_tables`, raycg.train.optim): no padding_idx (PyTorch would drop those lookups
    from the sparse gradient, a data-dependent size); `lookup` zeroes row-0 outputs instead, so
    row 0 gets zero gradient and stays zero either way."""
    emb = nn.Embedding(rows, dim, padding_idx=None if sparse else 0, sparse=sparse)
    nn.init.normal_(emb.weight, std=0.05)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


def lookup(emb: nn.Embedding, rows: torch.Tensor) -> torch.Tensor:
    """emb(rows), with row 0 (missing) exactly zero for sparse tables too."""
    out = emb(rows)
    if emb.sparse:
        out = out * (rows != 0).unsqueeze(-1).to(out.dtype)
    return out


class HashedEmbedding(nn.Module):
    """id -> embedding via `id mod (buckets-1) + 1`; id -1 (missing) -> the zero row 0."""

    def __init__(self, num_buckets: int, dim: int, sparse: bool = False):
        super().__init__()
        self.num_buckets = num_buckets
        self.emb = table(num_buckets, dim, sparse)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids < 0, torch.zeros_like(ids), ids % (self.num_buckets - 1) + 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.emb, self.rows(ids))


class VocabEmbedding(nn.Module):
    """id -> embedding through a vocabulary: row 0 = missing (id < 0, the zero row), rows
    1..oov = out-of-vocabulary ids hashed (`id mod oov + 1`), then one row per vocabulary id.

        vocab = [7, 42, 2**40] (sorted), oov_buckets = 2:
        ids  [-1, 7, 2**40, 5]  ->  rows [0, 3, 5, 1 + 5 mod 2 = 2]

    The vocabulary (`vocab`, int64 [V]) is a buffer: checkpoints and exported towers carry it,
    so they take raw ids; the table has exactly 1 + oov_buckets + V rows.

    `oov_dropout` p (training only): each vocabulary id is looked up in its OOV row with
    probability p. Without it the OOV rows never get a gradient, and a new user (or any unseen
    id) is served through an untrained row; with it those rows learn the average id and the
    tower learns to work without the id.
    """

    def __init__(self, vocab_size: int, oov_buckets: int, dim: int, vocab=None, sparse: bool = False,
                 oov_dropout: float = 0.0):
        super().__init__()
        if oov_buckets < 1:
            raise ValueError(f"model.vocab.oov_buckets={oov_buckets}: expected >= 1")
        if not 0.0 <= oov_dropout < 1.0:
            raise ValueError(f"model.vocab.oov_dropout={oov_dropout}: expected a probability in [0, 1)")
        self.oov_buckets = oov_buckets
        self.oov_dropout = float(oov_dropout)
        self.register_buffer("vocab", torch.zeros(vocab_size, dtype=torch.int64))
        self.emb = table(1 + oov_buckets + vocab_size, dim, sparse)
        if vocab is not None:
            self.set_vocabulary(vocab)

    @property
    def num_buckets(self) -> int:
        return self.emb.num_embeddings

    def set_vocabulary(self, vocab) -> None:
        if not isinstance(vocab, torch.Tensor):  # a copy: arrays from Ray's object store are read-only
            vocab = torch.from_numpy(np.array(vocab, dtype=np.int64))
        vocab = vocab.to(torch.int64)
        if vocab.shape != self.vocab.shape:
            raise ValueError(f"vocabulary of {len(vocab)} ids for a table built for {len(self.vocab)}")
        if len(vocab) > 1 and not bool((vocab[1:] > vocab[:-1]).all()):
            raise ValueError("a vocabulary must be sorted and unique")
        with torch.no_grad():
            self.vocab.copy_(vocab)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        oov = ids.remainder(self.oov_buckets) + 1
        if self.vocab.numel():
            pos, hit = find_sorted_torch(self.vocab, ids)
            row = torch.where(hit, pos + 1 + self.oov_buckets, oov)
        else:
            row = oov
        return torch.where(ids < 0, torch.zeros_like(ids), row)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids)
        if self.training and self.oov_dropout > 0:  # fixed shape: a mask, not a gather of the dropped ids
            drop = (torch.rand(ids.shape, device=ids.device) < self.oov_dropout) & (rows > self.oov_buckets)
            rows = torch.where(drop, ids.remainder(self.oov_buckets) + 1, rows)
        return lookup(self.emb, rows)


def id_embedding(name: str, cfg: dict) -> nn.Module:
    """The table of one id feature: a vocabulary table when `cfg["vocab_sizes"]` names it
    (model.vocab.enabled), else hashed into `cfg["buckets"][name]` rows."""
    sizes = cfg.get("vocab_sizes") or {}  # not a setting: the driver adds it (model.vocab.enabled)
    sparse = bool(cfg["sparse_tables"])
    if name in sizes:
        return VocabEmbedding(int(sizes[name]), int(cfg["vocab"]["oov_buckets"]), cfg["id_dim"], sparse=sparse,
                              oov_dropout=float(cfg["vocab"].get("oov_dropout", 0.0)))  # absent before 2026-12
    return HashedEmbedding(cfg["buckets"][name], cfg["id_dim"], sparse=sparse)


HEAD_SETS = {
    "unified": ("unified",),  # 2025 design: one embedding space for both tasks
    "multi_head": ("engagement", "conversion"),  # 2023 design: one head per task
}


class EmbeddingHead(nn.Module):
    """MLP -> Linear -> L2 normalise: [B, in_dim] -> unit vectors [B, embedding_dim]."""

    def __init__(self, in_dim: int, dims: list[int], embedding_dim: int):
        super().__init__()
        self.mlp = MLP(in_dim, dims)
        self.out = nn.Linear(self.mlp.out_dim, embedding_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.out(self.mlp(h)), dim=-1)


class DenseNormalizer(nn.Module):
    """(x - mean) / std with statistics of the training split, kept as buffers so that
    checkpoints and exported towers carry them."""

    def __init__(self, dim: int, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * dim, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Tower(nn.Module):
    """Categorical columns (hashed embeddings) + optional dense block [+ history encoder]
    -> one unit embedding per head.

    Encoders and the body are shared by all heads; `forward` returns {head name: [B, E]}, or
    with a `bias` {head name: [B, E + 1]}: the unit embedding and the item bias of
    `model.item_bias`, a scalar read out of the body by a linear layer (zero at initialisation),
    with bias="prior" plus w * prior[row of the first id] (w learned, 1 at the start; the prior,
    log(1 + events) per row of the first table, is set by `set_prior` and kept as a buffer).
    """

    def __init__(self, names: list[str], id_dim: int, dense_dim: int, cfg: dict,
                 dense_mean: list[float] | None = None, dense_std: list[float] | None = None,
                 history: nn.Module | None = None, bias: str = "none"):
        super().__init__()
        heads = cfg["heads"]
        if heads not in HEAD_SETS:
            raise ValueError(f"model.heads={heads!r}: expected one of {list(HEAD_SETS)}")
        self.names = list(names)
        self.embeddings = nn.ModuleList(id_embedding(n, {**cfg, "id_dim": id_dim}) for n in names)
        # regularises sparse id tables (rows seen a handful of times); identity in eval mode
        self.embedding_dropout = nn.Dropout(cfg["embedding_dropout"])
        self.dense_norm = DenseNormalizer(dense_dim, dense_mean, dense_std) if dense_dim else None
        self.history = history
        in_dim = id_dim * len(names) + dense_dim + (history.out_dim if history is not None else 0)
        self.body = TowerBody(in_dim, cfg["cross"], cfg["cross_layers"], cfg["low_rank"], list(cfg["mlp_dims"]),
                              cfg["num_experts"], float(cfg["cross_dropout"]))
        self.heads = nn.ModuleDict({
            name: EmbeddingHead(self.body.out_dim, list(cfg["head_dims"]), cfg["embedding_dim"])
            for name in HEAD_SETS[heads]
        })
        self.bias = None
        if bias != "none":
            self.bias = nn.ModuleDict({name: nn.Linear(self.body.out_dim, 1) for name in HEAD_SETS[heads]})
            for layer in self.bias.values():  # start as the bias-free model (plus the prior)
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        if bias == "prior":
            self.register_buffer("prior", torch.zeros(self.embeddings[0].num_buckets))
            self.prior_weight = nn.Parameter(torch.ones(()))

    def set_prior(self, ids, counts) -> None:
        """prior[row] = log(1 + events of the ids in that row of the first table) (ids, counts:
        the training window's counts, e.g. FeatureStore.item_counts)."""
        # np.array copies: the arrays may be read-only views of Ray's object store, which torch warns about
        rows = self.embeddings[0].rows(torch.as_tensor(np.array(ids, dtype=np.int64), device=self.prior.device))
        per_row = torch.zeros_like(self.prior, dtype=torch.float64).index_add_(
            0, rows, torch.as_tensor(np.array(counts, dtype=np.float64), device=self.prior.device))
        per_row[0] = 0  # the missing-id row
        with torch.no_grad():
            self.prior.copy_(torch.log1p(per_row).to(self.prior.dtype))

    def forward(self, cat: torch.Tensor, dense: torch.Tensor | None = None,
                hist_items: torch.Tensor | None = None, hist_actions: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        parts = [self.embedding_dropout(emb(cat[:, i])) for i, emb in enumerate(self.embeddings)]
        if self.dense_norm is not None:
            parts.append(self.dense_norm(dense))
        if self.history is not None:
            parts.append(self.history(hist_items, hist_actions))
        h = self.body(torch.cat(parts, dim=-1))
        if self.bias is None:
            return {name: head(h) for name, head in self.heads.items()}
        prior = 0.0
        if hasattr(self, "prior_weight"):
            prior = self.prior_weight * self.prior[self.embeddings[0].rows(cat[:, 0])].unsqueeze(-1)
        return {name: torch.cat([head(h), self.bias[name](h) + prior], dim=-1) for name, head in self.heads.items()}
