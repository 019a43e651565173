"""Plain MLP: Linear -> ReLU (-> LayerNorm) per hidden layer."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """[B, in_dim] -> [B, dims[-1]]; ReLU after every layer (it feeds a head, not logits)."""

    def __init__(self, in_dim: int, dims: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in dims:
            layers += [nn.Linear(d, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
