"""Repeat match: "this candidate is one of my recent items" as part of the inner product.

A two-tower score <u, v> cannot say "item i is in my history" for every history item at once:
u would have to sit near all of them. On small real logs most conversions are repeats (63% on
the Tmall sample, all of them on the Taobao one), and a re-engagement list beat the towers
there. This channel adds an exact-match term to both vectors:

    c(i)   = a fixed pseudo-random code of item id i, entries +-1/sqrt(D)          [D]
    m(u)   = sum_j w[action_j, r_j] * c(item_j)   over the valid history positions  [D]
    score += <m(u), c(i)> = sum_j w[action_j, r_j] * <c(item_j), c(i)>

<c(i), c(i)> = 1, and for two different ids <c(i), c(k)> has mean 0 and standard deviation
1/sqrt(D). So a candidate in the history gains w for each time it appears there (w learned
per action type and recency r = L - 1 - j, most recent r = 0), others gain noise of order
w * sqrt(L / D). It reads the last `model.history.match_length` actions, the history encoder
only the last `model.history.length` of them (a repeat is often further back: on the Tmall
sample 39% of repeat conversions are among the user's last 10 actions, 92% among the last 100). Codes come from a hash of the raw id: no table, out-of-vocabulary items
match too, and the exported towers compute them the same way.

Served like the item bias (raycg.model.two_tower): the user vector gains T * m(u), the item
vector c(i), and <[u, T m], [v, c]> / T = <u, v> / T + <m, c>.

Tiny example (D = 4096, w = 2 everywhere): history [-1, 12, 40], actions [0, 1, 4]
    m = 2 c(12) + 2 c(40);  <m, c(40)> ~ 2;  <m, c(7)> ~ 0 (+- 2 sqrt(2 / 4096))
"""
from __future__ import annotations

import torch
from torch import nn

from raycg.model.history import NUM_ACTION_CODES

_MIX = (0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask the sign's copies)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def item_codes(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """c(i) for every id of `ids` [...] -> [..., dim] float32, entries +-1/sqrt(dim): the sign
    of bit 0 of splitmix64(id * dim + j). int64 arithmetic wraps, the same on CPU and GPU."""
    x = ids.to(torch.int64).unsqueeze(-1) * dim + torch.arange(dim, device=ids.device, dtype=torch.int64)
    x = x + _MIX[0]
    x = (x ^ _shift_right(x, 30)) * _MIX[1]
    x = (x ^ _shift_right(x, 27)) * _MIX[2]
    x = x ^ _shift_right(x, 31)
    return ((x & 1).to(torch.float32) * 2 - 1) * dim ** -0.5


def history_lookup_length(history_cfg: dict) -> int:
    """How many recent actions the data packs per row (FeatureSpec.history_length): the
    encoder's `length`, or more when the match channel reads further back (`match_length`)."""
    length = int(history_cfg["length"])
    if length > 0 and int(history_cfg.get("match_dim", 0)) > 0:
        return max(length, int(history_cfg.get("match_length", 0)))
    return length


class RepeatMatch(nn.Module):
    """m(u) from the history (module docstring): `forward(hist_items [B, L], hist_actions [B, L])`
    -> [B, dim]; rows with no history are zeros. `codes(item_ids [B])` -> [B, dim]."""

    def __init__(self, dim: int, max_len: int, init: float = 1.0):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.full((NUM_ACTION_CODES, max_len), float(init)))  # [action, recency]

    def codes(self, item_ids: torch.Tensor) -> torch.Tensor:
        """c(i) for every id of `item_ids` [...] -> [..., dim]. Eager on a CPU, each distinct id is
        hashed once (a batch of 512 x 50 history items repeats most ids: 65 -> 13 ms per step
        with backward); compiled or on a GPU, every id (static shapes, and hashing is cheap there)."""
        if item_ids.device.type != "cpu" or torch.compiler.is_compiling():
            return item_codes(item_ids, self.dim)
        distinct, where = torch.unique(item_ids, return_inverse=True)
        return item_codes(distinct, self.dim)[where]

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor) -> torch.Tensor:
        L = hist_items.shape[1]
        recency = torch.arange(L - 1, -1, -1, device=hist_items.device)  # left-padded: last = most recent
        w = self.weight[hist_actions, recency] * (hist_actions != 0)  # [B, L], padding 0
        return torch.einsum("bl,bld->bd", w, self.codes(hist_items.clamp(min=0)))
