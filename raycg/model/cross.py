"""DCN v2 cross layers (Wang et al. 2020, "DCN V2").

One cross layer, input x0 and current x_l, both [B, D]:

    x_{l+1} = x0 * (W_l x_l + b_l) + x_l          (* is elementwise)

The bias sits *inside* the product with x0. Low-rank variant: W = U V^T with U, V [D, r].

Example:
    >>> net = CrossNetwork(dim=8, num_layers=2, low_rank=4)
    >>> net(torch.randn(3, 8)).shape
    torch.Size([3, 8])
"""
from __future__ import annotations

import torch
from torch import nn


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l; W full rank [D, D] or U V^T with rank r."""

    def __init__(self, dim: int, low_rank: int | None = None):
        super().__init__()
        if low_rank is None or low_rank <= 0 or low_rank >= dim:
            self.V = None
            self.W = nn.Linear(dim, dim, bias=True)
        else:
            self.V = nn.Linear(dim, low_rank, bias=False)  # x -> V^T x
            self.W = nn.Linear(low_rank, dim, bias=True)  # -> U (V^T x) + b
        nn.init.zeros_(self.W.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x if self.V is None else self.V(x)
        return x0 * self.W(h) + x


class CrossNetwork(nn.Module):
    """A stack of `num_layers` cross layers over the same x0. [B, D] -> [B, D]."""

    def __init__(self, dim: int, num_layers: int = 2, low_rank: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(dim, low_rank) for _ in range(num_layers))
        self.out_dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
