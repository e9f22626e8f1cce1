"""Pretraining heads: masked-token prediction over the text vocabulary and the visual codebook."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MLMHead(nn.Module):
    """hidden [N, D] -> vocabulary logits [N, V]; the weight may be the word-embedding table (tied)."""

    def __init__(self, dim: int, vocab_size: int, init_std: float = 0.02,
                 tied_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        if tied_weight is None:
            tied_weight = nn.Parameter(torch.empty(vocab_size, dim))
            nn.init.trunc_normal_(tied_weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        elif tuple(tied_weight.shape) != (vocab_size, dim):
            raise ValueError(f"tied MLM weight must be [{vocab_size}, {dim}], got {tuple(tied_weight.shape)}")
        self.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


class MIMHead(nn.Module):
    """hidden [N, D] -> visual-token logits [N, codebook_size]."""

    def __init__(self, dim: int, codebook_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, codebook_size)
        nn.init.trunc_normal_(self.proj.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)
