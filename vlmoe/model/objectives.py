"""Masked data modeling losses (BEiT-3 / VL-MoE): cross-entropy on masked positions, summed equally."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def prediction_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [N, C] against targets Long [N], in float32.

    With N == 0 the loss is a graph-connected zero, so every rank still backpropagates through
    the same parameters (collectives in ZeRO / expert parallelism stay matched).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, C] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if targets.numel() == 0:
        return logits.sum().float() * 0.0
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def prediction_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows of logits [N, C] whose argmax equals targets [N] (0 when N == 0)."""
    if targets.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return (logits.argmax(dim=-1) == targets).float().mean()


def pretraining_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Equal-weight sum of the present objectives' losses ({"mlm": .., "mim": .., "vlm": ..})."""
    if not losses:
        raise ValueError("pretraining_loss needs at least one objective loss")
    return torch.stack([loss.float() for loss in losses.values()]).sum()
