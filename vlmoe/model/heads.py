"""Pretraining heads: masked-token prediction over the text vocabulary and the visual codebook."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.model.init import init_linears_, trunc_normal_
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
