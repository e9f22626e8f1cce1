"""The dense FFN of every multiway block (V-, T- and VL-FFN), and of every MoE expert's shape."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlmoe.nn.init import init_linears_


class FeedForward(nn.Module):
    """fc1 -> GELU -> fc2, the dense V/T/VL-FFN."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        init_linears_(self.fc1, self.fc2, std=init_std)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, n, D] -> [B, n, D]; token_mask is ignored (a dense FFN treats every token alike)."""
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        """Scale the output projection (BEiT depth-dependent init)."""
        self.fc2.weight.mul_(factor)
