"""BEiT-style weight init that also works on models built under deepspeed.zero.Init.

zero.Init partitions a module's parameters as its constructor returns, so a parent that
initialises its children's weights afterwards would write into empty partitions and leave
the children's default init in place, silently. Init through these helpers instead: they
gather the parameters first (``vlmoe.zero3.full_parameters``).
"""
from __future__ import annotations

import torch
from torch import nn

from vlmoe.zero3 import full_parameters


def trunc_normal_(tensor: torch.Tensor, std: float) -> None:
    """Truncated normal at +-2 std (BEiT)."""
    nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def init_linears_(*linears: nn.Linear, std: float) -> None:
    """Truncated-normal weights and zero biases for already built linear layers."""
    with full_parameters(*linears):
        for linear in linears:
            trunc_normal_(linear.weight, std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
