"""Heads: masked-token prediction (MLM, MIM) for pretraining, and the pooler and MLP of BEiT-3's task heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.nn.init import init_linears_, trunc_normal_
from vlmoe.zero3 import full_shape


class MLMHead(nn.Module):
    """hidden [N, D] -> vocabulary logits [N, V]; the weight may be the word-embedding table (tied)."""

    def __init__(self, dim: int, vocab_size: int, init_std: float = 0.02,
                 tied_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        if tied_weight is None:
            tied_weight = nn.Parameter(torch.empty(vocab_size, dim))
            trunc_normal_(tied_weight, init_std)
        elif full_shape(tied_weight) != (vocab_size, dim):
            raise ValueError(f"tied MLM weight must be [{vocab_size}, {dim}], got {full_shape(tied_weight)}")
        self.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


class MIMHead(nn.Module):
    """hidden [N, D] -> visual-token logits [N, codebook_size]."""

    def __init__(self, dim: int, codebook_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, codebook_size)
        init_linears_(self.proj, std=init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class Pooler(nn.Module):
    """BEiT-3's pooler of one token's state: LayerNorm, linear, tanh. [B, D] -> [B, D]."""

    def __init__(self, dim: int, init_std: float = 0.02, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)
        init_linears_(self.dense, std=init_std)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(token)))


class MLPClassifier(nn.Module):
    """BEiT-3's two-layer head: linear (D_in -> H), LayerNorm, GELU, linear (H -> classes).
    [B, D_in] -> logits [B, classes]."""

    def __init__(self, dim_in: int, hidden: int, num_classes: int, init_std: float = 0.02, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, num_classes)
        init_linears_(self.fc1, self.fc2, std=init_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(features))))
