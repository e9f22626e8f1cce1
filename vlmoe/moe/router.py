"""Top-k routing with expert capacity and Batch Priority Routing (V-MoE), as index tensors.

`route` is pure: it turns one group's logits into, for every (token, choice), the chosen
expert, the slot in that expert's buffer (-1 when the buffer is full) and the gate weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Routing of S tokens with k choices each over E experts of `capacity` slots.

    expert: [S, k] long, the chosen expert of each choice (choice 0 = the top-1 expert).
    slot:   [S, k] long, position in that expert's buffer, -1 where the choice is dropped.
    weight: [S, k] float, the softmax gate of that choice (not renormalised over the k).
    gates:  [S, E] float, the softmax over experts the choices were taken from.
    """

    expert: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor
    gates: torch.Tensor
    capacity: int

    @property
    def kept(self) -> torch.Tensor:
        """[S, k] bool: True where the choice got a buffer slot."""
        return self.slot >= 0


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """C = ceil(k * cf * S / E), at least `min_capacity` (slots per expert for one group)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(int(math.ceil(k * capacity_factor * num_tokens / num_experts)), min_capacity)


def route(logits: torch.Tensor, k: int, capacity: int, batch_priority: bool) -> Routing:
    """Route one group of tokens: top-k of softmax(logits), buffers filled k-major.

    logits: [S, E]. Every first choice is placed before any second choice. Within one choice,
    tokens take slots in token order or, with `batch_priority`, in order of their top-1 gate,
    highest first (ties in token order), so the least confident tokens are dropped first.
    Returns a `Routing` with expert/slot/weight of shape [S, k].
    """
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [S, E], got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"route: k must be in [1, E={num_experts}], got {k}")
    if capacity < 0:
        raise ValueError(f"route: capacity must be >= 0, got {capacity}")
    gates = torch.softmax(logits.float(), dim=-1)
    weight, expert = torch.topk(gates, k, dim=-1)  # [S, k], choice 0 = largest gate
    if batch_priority:
        order = torch.sort(weight[:, 0], descending=True, stable=True).indices
    else:
        order = torch.arange(num_tokens, device=logits.device)
    # Priority sequence: choice-major, tokens in priority order: [k * S].
    expert_in_priority = expert[order].t().reshape(-1)
    position = _position_within_expert(expert_in_priority, num_experts)
    slot_in_priority = torch.where(position < capacity, position, torch.full_like(position, -1))
    slot = torch.empty_like(expert)
    slot[order] = slot_in_priority.view(k, num_tokens).t()
    return Routing(expert=expert, slot=slot, weight=weight, gates=gates, capacity=capacity)


def _position_within_expert(expert_sequence: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each entry of a 1-D expert sequence, how many earlier entries chose the same expert."""
    n = expert_sequence.numel()
    # A stable sort groups entries by expert while keeping their order; the rank within a group
    # is then the sorted position minus the group's start.
    by_expert = torch.sort(expert_sequence, stable=True).indices
    counts = torch.bincount(expert_sequence, minlength=num_experts)
    group_start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=expert_sequence.device) - group_start[expert_sequence[by_expert]]
    position = torch.empty_like(expert_sequence)
    position[by_expert] = rank_sorted
    return position
