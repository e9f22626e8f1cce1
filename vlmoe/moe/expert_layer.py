"""What the sparse and the soft MoE layers share: experts, routing statistics kept per mode, and
the two forms of their call (one input, or lists of inputs: see `token_groups`).

Training and evaluation keep their own statistics (``train_stats`` / ``eval_stats``, set by the
subclass): an evaluation between two log steps must neither take the training steps' routing
(and report it as validation) nor add to it. ``pop_metrics`` reads the current mode's.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

TokenInputs = Union[torch.Tensor, Sequence[torch.Tensor]]
TokenMasks = Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]


def token_groups(x: TokenInputs, token_mask: TokenMasks) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """An expert layer's call as lists of inputs and masks: one input x with its token_mask, or a
    grouped call's lists (token_mask None: every input all real). Lengths are the caller's to check."""
    if isinstance(x, torch.Tensor):
        return [x], [token_mask]
    xs = list(x)
    return xs, list(token_mask) if token_mask is not None else [None] * len(xs)


def in_backward() -> bool:
    """Whether this forward is an activation-checkpoint re-run inside backward (not to be counted twice)."""
    return torch._C._current_graph_task_id() != -1


class ExpertLayer(nn.Module):
    """Base of MoE and SoftMoE: ``experts``, ``metric_prefix``, ``train_stats`` and ``eval_stats``
    are set by the subclass; each stats object has ``summary(prefix)``."""

    @property
    def stats(self):
        """The statistics of the current mode (training or evaluation)."""
        return self.train_stats if self.training else self.eval_stats

    def pop_metrics(self) -> dict[str, float]:
        """Metrics of the current mode since its last pop, named under `metric_prefix`; resets."""
        return self.stats.summary(self.metric_prefix)

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        """BEiT depth rescale of the experts' output projections (called by the backbone)."""
        self.experts.rescale_output_(factor)
