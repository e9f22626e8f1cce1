"""E feed-forward experts (fc1 -> GELU -> fc2, the FFN's shape) applied with batched matmuls."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """`num_local` experts of width d_model -> d_ff -> d_model, stored stacked.

    Holds experts first_expert .. first_expert + num_local - 1 of a pool; each expert's initial
    weights depend only on (seed, its global index), so a sharded pool (expert parallelism)
    starts from the same weights as an unsharded one.
    """

    def __init__(self, d_model: int, d_ff: int, num_local: int, first_expert: int = 0,
                 init_std: float = 0.02, seed: Optional[int] = None) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.num_local, self.first_expert = d_model, d_ff, num_local, first_expert
        self.w_in = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_local, 1, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.b_out = nn.Parameter(torch.zeros(num_local, 1, d_model))
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())
        self._init(init_std, seed)

    @torch.no_grad()
    def _init(self, std: float, seed: int) -> None:
        if self.w_in.is_meta:  # shape-only model (parameter counting)
            return
        for local in range(self.num_local):
            generator = torch.Generator().manual_seed(seed + self.first_expert + local)
            for weight in (self.w_in, self.w_out):
                values = torch.empty(weight.shape[1:])
                nn.init.trunc_normal_(values, std=std, a=-2 * std, b=2 * std, generator=generator)
                weight[local].copy_(values)

    def forward(self, buffers: torch.Tensor) -> torch.Tensor:
        """buffers [num_local, C, d_model] -> [num_local, C, d_model]."""
        hidden = F.gelu(torch.baddbmm(self.b_in, buffers, self.w_in))
        return torch.baddbmm(self.b_out, hidden, self.w_out)

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        """Scale the output projections (BEiT depth-dependent init)."""
        self.w_out.mul_(factor)
