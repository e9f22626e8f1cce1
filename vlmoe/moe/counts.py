"""Counting tokens per expert without a device synchronisation.

`torch.bincount` sizes its output by the largest input value, which it reads back to the host: a
GPU synchronisation in every routing call. The number of experts is known, so a scatter-add
into E counters gives the same counts with the work left queued on the device.
"""
from __future__ import annotations

from typing import Optional

import torch


def expert_counts(expert: torch.Tensor, num_experts: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Long [E] (float [E] with `weight`): how many entries of `expert` (any shape, values in
    [0, E)) name each expert, or the sum of `weight` (same shape as `expert`) over them."""
    index = expert.reshape(-1)
    values = torch.ones_like(index) if weight is None else weight.reshape(-1)
    counts = torch.zeros(num_experts, dtype=values.dtype, device=index.device)
    return counts.scatter_add_(0, index, values)
