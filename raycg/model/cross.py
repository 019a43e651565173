"""DCN v2 cross layers (Wang et al. 2020, "DCN V2").

One cross layer, input x0 and current x_l, both [B, D]:

    x_{l+1} = x0 * (W_l x_l + b_l) + x_l          (* is elementwise)

The bias sits *inside* the product with x0. Low-rank variant: W = U V^T with U, V [D, r].

Mixture of low-rank experts (DCN v2 section 5.2), K experts with gate G(x_l) = softmax(g x_l):

    E_k(x_l)  = x0 * (U_k act(C_k act(V_k^T x_l)) + b_l)
    x_{l+1}   = sum_k G_k(x_l) E_k(x_l) + x_l

The bias b_l belongs to the layer and is shared by its experts, as in the paper's formula
and TorchRec's `LowRankMixtureCrossNet` (one bias per layer). A rank r >= D is allowed for
the experts; the single cross layer then uses a full-rank W.

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


class MixtureCrossLayer(nn.Module):
    """x_{l+1} = sum_k G_k(x_l) * x0 * (U_k act(C_k act(V_k^T x_l)) + b) + x_l, one b per layer."""

    def __init__(self, dim: int, low_rank: int, num_experts: int):
        super().__init__()
        if not low_rank or low_rank <= 0:
            raise ValueError("model.num_experts > 1 needs model.low_rank (the experts are low rank)")
        self.V = nn.ModuleList(nn.Linear(dim, low_rank, bias=False) for _ in range(num_experts))
        self.C = nn.ModuleList(nn.Linear(low_rank, low_rank, bias=False) for _ in range(num_experts))
        self.U = nn.ModuleList(nn.Linear(low_rank, dim, bias=False) for _ in range(num_experts))
        self.bias = nn.Parameter(torch.zeros(dim))  # b_l, shared by the experts
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        experts = torch.stack(
            [x0 * (u(torch.relu(c(torch.relu(v(x))))) + self.bias) for u, c, v in zip(self.U, self.C, self.V)], dim=1
        )  # [B, K, D]
        gates = torch.softmax(self.gate(x), dim=-1)  # [B, K]
        return (gates.unsqueeze(-1) * experts).sum(dim=1) + x


class CrossNetwork(nn.Module):
    """A stack of `num_layers` cross layers over the same x0. [B, D] -> [B, D].

    num_experts > 1 uses `MixtureCrossLayer` (mixture of low-rank experts)."""

    def __init__(self, dim: int, num_layers: int = 2, low_rank: int | None = None, num_experts: int = 1):
        super().__init__()
        if num_experts and num_experts > 1:
            self.layers = nn.ModuleList(MixtureCrossLayer(dim, low_rank, num_experts) for _ in range(num_layers))
        else:
            self.layers = nn.ModuleList(CrossLayer(dim, low_rank) for _ in range(num_layers))
        self.out_dim = dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
