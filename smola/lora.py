"""LoRA around a frozen linear: the baseline and the per-task specialist on top of SMoLA."""
from __future__ import annotations

import math

import torch
from torch import nn

from smola.block import LinearWrapper


class LoRALinear(LinearWrapper):
    """base(x) + scale * x A^T B^T with A = lora_a [r, d_in], B = lora_b [d_out, r] (zeros).

    forward(x [..., d_in]) -> [..., d_out]; equals base(x) at init. LoRA ignores token
    masks: padding positions are discarded downstream anyway.
    """

    def __init__(self, base: nn.Module, rank: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        if not isinstance(getattr(base, "in_features", None), int) or not isinstance(getattr(base, "out_features", None), int):
            raise TypeError(f"LoRALinear wraps a linear layer with in_features/out_features; got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int; got {rank!r}")
        self.base = base
        self.in_features, self.out_features, self.rank, self.scale = base.in_features, base.out_features, rank, float(scale)
        for p in base.parameters():
            p.requires_grad_(False)
        # From tensors, not nn.init afterwards, so that zero.Init keeps lora_b at zero.
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale}"

    def delta_weight(self) -> torch.Tensor:
        """scale * B A: [d_out, d_in], what merging adds to the base weight."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.linear(x, self.lora_a.to(x.dtype))
        return self.base(x) + self.scale * torch.nn.functional.linear(low, self.lora_b.to(x.dtype))
