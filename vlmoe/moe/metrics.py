"""Routing statistics of one MoE layer, accumulated over forward calls without host syncs.

Names (under the layer's prefix, e.g. "moe/L1/v"): "dropped" (fraction of tokens that got no
expert), "dropped/<task>" (per pretraining task), "dropped/<task>/<e>" (the
fraction of the choices routed to expert e that were dropped, per task: VL-MoE Fig. 6), "load/<e>" (fraction of
routed choices that picked expert e, before capacity), "entropy" (mean router entropy, nats),
"aux/<term>" (each unweighted aux term, mean over calls), "capacity" (mean slots per expert).
Soft MoE layers keep `SoftRoutingStats` instead (extremes of their weights, combine entropy).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vlmoe.moe.counts import expert_counts
from vlmoe.moe.router import Routing


class RoutingStats:
    """Running sums of routing statistics; `summary()` turns them into floats and resets."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._tokens = 0
        self._dropped: Optional[torch.Tensor] = None
        self._load: Optional[torch.Tensor] = None
        self._entropy: Optional[torch.Tensor] = None
        self._capacity = 0
        self._calls = 0
        self._task_dropped: dict[str, torch.Tensor] = {}
        self._task_tokens: dict[str, int] = {}
        self._task_expert_routed: dict[str, torch.Tensor] = {}
        self._task_expert_dropped: dict[str, torch.Tensor] = {}
        self._aux: dict[str, torch.Tensor] = {}
        self._aux_calls = 0

    @property
    def calls(self) -> int:
        """Forward calls recorded since the last summary."""
        return self._calls

    @staticmethod
    def _add(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value

    @torch.no_grad()
    def update(self, routing: Routing, task: Optional[str], aux_terms: dict[str, torch.Tensor]) -> None:
        """Add one call's routing ([S, k] tensors) and its aux terms."""
        num_tokens = routing.expert.shape[0]  # a shape: counted on the host, no device copy
        dropped = (~routing.kept.any(dim=1)).sum().float()
        load = expert_counts(routing.expert, self.num_experts).float()
        gates = routing.gates
        entropy = -(gates * torch.log(gates.clamp_min(1e-30))).sum()
        self._tokens += num_tokens
        self._dropped = self._add(self._dropped, dropped)
        self._load = self._add(self._load, load)
        self._entropy = self._add(self._entropy, entropy)
        self._capacity += routing.capacity
        self._calls += 1
        if task is not None:
            self._task_dropped[task] = self._add(self._task_dropped.get(task), dropped)
            self._task_tokens[task] = self._task_tokens.get(task, 0) + num_tokens
            dropped_per_expert = expert_counts(routing.expert, self.num_experts, weight=(~routing.kept).float())
            self._task_expert_routed[task] = self._add(self._task_expert_routed.get(task), load)
            self._task_expert_dropped[task] = self._add(self._task_expert_dropped.get(task), dropped_per_expert)
        if aux_terms:
            for name, value in aux_terms.items():
                self._aux[name] = self._add(self._aux.get(name), value.detach().float())
            self._aux_calls += 1

    def summary(self, prefix: str) -> dict[str, float]:
        """Flat metrics named "<prefix>/<name>" since the last summary (empty if no calls); resets."""
        out: dict[str, float] = {}
        if self._calls and self._tokens > 0:
            tokens = float(self._tokens)
            out[f"{prefix}/dropped"] = float(self._dropped) / tokens
            out[f"{prefix}/entropy"] = float(self._entropy) / tokens
            out[f"{prefix}/capacity"] = self._capacity / self._calls
            load = self._load / self._load.sum()
            for expert, value in enumerate(load.tolist()):
                out[f"{prefix}/load/{expert}"] = value
            for task, dropped in self._task_dropped.items():
                task_tokens = self._task_tokens[task]
                if task_tokens > 0:
                    out[f"{prefix}/dropped/{task}"] = float(dropped) / task_tokens
                routed = self._task_expert_routed[task]
                fractions = self._task_expert_dropped[task] / routed.clamp_min(1.0)  # no tokens: none dropped
                for expert, value in enumerate(fractions.tolist()):
                    out[f"{prefix}/dropped/{task}/{expert}"] = value
        for name, total in self._aux.items():
            out[f"{prefix}/aux/{name}"] = float(total) / self._aux_calls
        self.reset()
        return out


class SoftRoutingStats:
    """Running statistics of a Soft MoE layer's weights over its real tokens; `summary()` turns them
    into floats and resets.

    Names under the layer's prefix: "dispatch/min", "dispatch/max" and "combine/min", "combine/max"
    (extremes since the last summary), "entropy" (mean entropy of a token's combine distribution
    over the slots, nats; log S = uniform).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._extremes: dict[str, torch.Tensor] = {}
        self._entropy: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None
        self._calls = 0

    @property
    def calls(self) -> int:
        """Forward calls recorded since the last summary."""
        return self._calls

    def _extreme(self, name: str, value: torch.Tensor,
                 reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        previous = self._extremes.get(name)
        self._extremes[name] = value if previous is None else reduce(previous, value)

    @torch.no_grad()
    def update(self, dispatch: torch.Tensor, combine: torch.Tensor, token_mask: Optional[torch.Tensor]) -> None:
        """Add one call: dispatch and combine [B, n, S], token_mask [B, n] bool (None = all real)."""
        real = torch.ones(combine.shape[:2], dtype=torch.bool, device=combine.device) if token_mask is None \
            else token_mask
        rows = real.unsqueeze(-1)  # padding rows are left out of the extremes via +-inf fills
        for name, weights in (("dispatch", dispatch), ("combine", combine)):
            weights = weights.float()
            self._extreme(f"{name}/min", weights.masked_fill(~rows, float("inf")).amin(), torch.minimum)
            self._extreme(f"{name}/max", weights.masked_fill(~rows, float("-inf")).amax(), torch.maximum)
        combine = combine.float()
        entropy = -(combine * torch.log(combine.clamp_min(1e-30))).sum(-1)  # [B, n]; 0 on padding
        self._entropy = RoutingStats._add(self._entropy, entropy.masked_fill(~real, 0.0).sum())
        self._tokens = RoutingStats._add(self._tokens, real.sum().float())
        self._calls += 1

    def summary(self, prefix: str) -> dict[str, float]:
        """Flat metrics named "<prefix>/<name>" since the last summary (empty if no real token); resets."""
        out: dict[str, float] = {}
        if self._calls and self._tokens is not None and float(self._tokens) > 0:
            for name, value in self._extremes.items():
                out[f"{prefix}/{name}"] = float(value)
            out[f"{prefix}/entropy"] = float(self._entropy) / float(self._tokens)
        self.reset()
        return out
