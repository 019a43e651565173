"""History encoder: the user's recent action sequence -> one history embedding.

Input: the output of `raycg.data.history.HistoryIndex.lookup`, left-padded, most recent last:

    item_ids [B, L] int64   item id, -1 = padding
    actions  [B, L] int64   ACTION_CODES (1 click, 2 save, 3 add_to_cart, 4 checkout), 0 = padding

Per position j (recency r = L - 1 - j, so the most recent action always has position 0
whatever L is):

    h_j = ItemEmb(item_j) + ActionEmb(action_j) + PosEmb(r)                   [B, L, dim]

ItemEmb is the item tower's own item-id embedding when `item_embedding` is given (shared
parameters), else a HashedEmbedding of the encoder's own.
    H   = TransformerEncoder(h, src_key_padding_mask = (action == 0))        [B, L, dim]
    out = sum_j H_j * m_j / sum_j m_j,   m_j = (action_j != 0)               [B, dim]

Rows with an empty history return exactly zeros. (PyTorch attention over a fully masked row
yields NaN, so for those rows one position is unmasked for the encoder and the pooled output
is then replaced by 0.) Padded positions never influence the output: they are masked as keys
and excluded from the pooling.

Tiny example:

    enc = HistoryEncoder(num_item_buckets=1000, dim=8, max_len=4)
    items   = torch.tensor([[-1, -1, 12, 40], [-1, -1, -1, -1]])
    actions = torch.tensor([[ 0,  0,  1,  4], [ 0,  0,  0,  0]])
    enc(items, actions).shape == (2, 8);  enc(items, actions)[1] == 0
"""
from __future__ import annotations

import torch
from torch import nn

from raycg.model.towers import HashedEmbedding

NUM_ACTION_CODES = 5  # 0 = padding, then click, save, add_to_cart, checkout (raycg.data.history.ACTION_CODES)


class HistoryEncoder(nn.Module):
    def __init__(self, num_item_buckets: int, dim: int, num_layers: int = 1, num_heads: int = 2,
                 max_len: int = 50, item_embedding: nn.Module | None = None, sparse: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"HistoryEncoder: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.out_dim = dim
        self.max_len = max_len
        # shared with the item tower's item-id embedding (model.history.share_item_embedding):
        # "this candidate is one of my recent items" is then a dot product the towers can learn
        self.items = item_embedding if item_embedding is not None else HashedEmbedding(num_item_buckets, dim, sparse)
        self.action = nn.Embedding(NUM_ACTION_CODES, dim, padding_idx=0)
        self.position = nn.Embedding(max_len, dim)
        nn.init.normal_(self.action.weight, std=0.05)
        nn.init.normal_(self.position.weight, std=0.05)
        with torch.no_grad():
            self.action.weight[0].zero_()
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=num_heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)

    def forward(self, item_ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        b, length = actions.shape
        if length > self.max_len:
            raise ValueError(f"HistoryEncoder: sequence length {length} > max_len {self.max_len}")
        if length == 0:
            return self.position.weight.new_zeros(b, self.dim)
        recency = torch.arange(length - 1, -1, -1, device=actions.device)  # most recent (last) -> 0
        h = self.items(item_ids) + self.action(actions) + self.position(recency)[None]
        pad = actions == 0  # [B, L]
        empty = pad.all(dim=1)  # [B]
        # A fully masked row makes attention NaN: unmask its last position, zero its output below.
        attn_pad = pad.clone()
        attn_pad[:, -1] &= ~empty
        out = self.encoder(h, src_key_padding_mask=attn_pad)  # [B, L, dim]
        m = (~pad).to(out.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (out * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
