"""Index-based dispatch of tokens into [E, C, d] expert buffers and the weighted combine back.

One gather each way (no dense [S, E, C] one-hot einsum, no loop over experts); empty slots
read a zero row, dropped choices contribute nothing.
"""
from __future__ import annotations

import torch

from vlmoe.moe.router import Routing


def buffer_index(routing: Routing, num_experts: int) -> torch.Tensor:
    """[S, k] long: flat index expert * C + slot of each choice in the [E * C] buffers, E * C if dropped."""
    capacity = routing.capacity
    flat = routing.expert * capacity + routing.slot
    return torch.where(routing.kept, flat, torch.full_like(flat, num_experts * capacity))


def dispatch(tokens: torch.Tensor, routing: Routing, num_experts: int) -> torch.Tensor:
    """Gather tokens [S, d] into expert buffers [E, C, d] (unused slots are zero)."""
    num_tokens, dim = tokens.shape
    capacity = routing.capacity
    slots = num_experts * capacity
    flat = buffer_index(routing, num_experts)  # [S, k]
    token_id = torch.arange(num_tokens, device=tokens.device).unsqueeze(1).expand_as(flat)
    # Which token fills each slot; num_tokens points at the appended zero row. Dropped choices
    # write to the extra slot index `slots`, which is cut off.
    token_of_slot = torch.full((slots + 1,), num_tokens, dtype=torch.long, device=tokens.device)
    token_of_slot.scatter_(0, flat.reshape(-1), token_id.reshape(-1))
    padded = torch.cat([tokens, tokens.new_zeros(1, dim)], dim=0)
    return padded.index_select(0, token_of_slot[:slots]).view(num_experts, capacity, dim)


def combine(expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Expert outputs [E, C, d] -> tokens [S, d]: sum over kept choices of gate weight * output."""
    num_experts, capacity, dim = expert_out.shape
    flat = buffer_index(routing, num_experts)  # [S, k]
    padded = torch.cat([expert_out.reshape(num_experts * capacity, dim), expert_out.new_zeros(1, dim)], dim=0)
    picked = padded.index_select(0, flat.reshape(-1)).view(*flat.shape, dim)  # [S, k, d]
    weight = routing.weight.to(expert_out.dtype).unsqueeze(-1)
    if flat.shape[1] == 1:
        return (picked * weight).squeeze(1)
    return (picked * weight).sum(dim=1)
