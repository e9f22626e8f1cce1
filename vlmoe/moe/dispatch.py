"""Index-based dispatch of tokens into [E, C, d] expert buffers and the weighted combine back.

Both directions are row gathers, and so are their gradients (each slot holds at most one
token, each token sits in at most k slots), so no scatter-add runs in the backward pass; there
is no dense [S, E, C] one-hot einsum and no loop over experts. Buffers are padded to a multiple
of `ALIGN` rows per expert (the extra rows stay empty): batched matmuls over an odd row count
run markedly slower on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vlmoe.moe.router import Routing

ALIGN = 4


class _GatherRows(torch.autograd.Function):
    """out = src[index] (zero where index = len(src)); grad_src = sum_r grad[inverse[:, r]].

    inverse lists, for each src row, the rows of out that hold it.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return _gather(src, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        picked = _gather(grad.contiguous(), inverse.reshape(-1))
        if inverse.shape[1] > 1:
            picked = picked.view(*inverse.shape, grad.shape[-1]).sum(dim=1)
        return picked, None, None


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [N, d] picked by index [M] -> [M, d], with zero rows where index = N ('nothing here').

    Zeroing in place after the gather, rather than gathering from a copy of `rows` with a zero
    row appended, saves a copy of the whole input in each direction.
    """
    num_rows = rows.shape[0]
    if num_rows == 0:
        return rows.new_zeros(index.shape[0], rows.shape[1])
    picked = rows.index_select(0, index.clamp(max=num_rows - 1))
    return picked.masked_fill_((index == num_rows).unsqueeze(1), 0)


@dataclass(frozen=True)
class DispatchPlan:
    """Where every (token, choice) goes in the flat [E * C_buf] buffers, and back.

    slot_of_choice: [S, k] flat buffer row of each choice, E * C_buf where dropped.
    choice_of_slot: [E * C_buf, 1] the choice (s * k + j) filling each row, S * k where empty.
    token_of_slot: [E * C_buf] the token filling each row, S where empty.
    rows_used: [E] how many leading rows of each expert's buffer hold a token (rows fill in order).
    """

    slot_of_choice: torch.Tensor
    choice_of_slot: torch.Tensor
    token_of_slot: torch.Tensor
    rows_used: torch.Tensor
    num_experts: int
    buffer_capacity: int


def buffer_capacity(capacity: int) -> int:
    """Rows per expert buffer: the capacity C rounded up to `ALIGN` (at least ALIGN)."""
    return -(-max(capacity, 1) // ALIGN) * ALIGN


def count_rows_used(routing: Routing, num_experts: int) -> torch.Tensor:
    """[E] how many leading rows of each expert's buffer hold a token (rows fill in order)."""
    # A scatter, not a bincount of the kept choices: boolean indexing would sync the device.
    return torch.zeros(num_experts, dtype=torch.long, device=routing.expert.device).scatter_add_(
        0, routing.expert.reshape(-1), routing.kept.reshape(-1).long())


def merge_routings(routings: Sequence[Routing], num_experts: int) -> Routing:
    """Several groups' routings as one routing of all their tokens into shared expert buffers.

    Each group keeps its own capacity and priority order (it was routed alone); in the shared
    buffers an expert's rows hold group 0's tokens, then group 1's, ..., so the filled rows stay
    leading: a kept choice of group i moves down by the rows that the groups before it filled in
    its expert. Capacity is the groups' sum. Tokens are the groups' in order ([sum S_i, k]).
    """
    if len(routings) == 1:
        return routings[0]
    filled = torch.zeros(num_experts, dtype=torch.long, device=routings[0].expert.device)
    slots = []
    for routing in routings:
        slots.append(torch.where(routing.kept, routing.slot + filled[routing.expert], routing.slot))
        filled = filled + count_rows_used(routing, num_experts)
    return Routing(expert=torch.cat([r.expert for r in routings]), slot=torch.cat(slots),
                   weight=torch.cat([r.weight for r in routings]), gates=torch.cat([r.gates for r in routings]),
                   capacity=sum(r.capacity for r in routings))


def plan_dispatch(routing: Routing, num_experts: int) -> DispatchPlan:
    """Index maps of a routing into buffers of C_buf = buffer_capacity(C) rows per expert."""
    num_tokens, k = routing.expert.shape
    capacity = buffer_capacity(routing.capacity)
    rows = num_experts * capacity
    flat = routing.expert * capacity + routing.slot
    slot_of_choice = torch.where(routing.kept, flat, torch.full_like(flat, rows))
    device = routing.expert.device
    # Dropped choices all write to the extra row `rows`, which is cut off.
    choice_of_slot = torch.full((rows + 1,), num_tokens * k, dtype=torch.long, device=device)
    choice_of_slot.scatter_(0, slot_of_choice.reshape(-1), torch.arange(num_tokens * k, device=device))
    choice_of_slot = choice_of_slot[:rows]
    token_of_slot = torch.where(choice_of_slot < num_tokens * k, choice_of_slot // k,
                                torch.full_like(choice_of_slot, num_tokens))
    return DispatchPlan(slot_of_choice, choice_of_slot.unsqueeze(1), token_of_slot,
                        count_rows_used(routing, num_experts), num_experts, capacity)


def dispatch(tokens: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather tokens [S, d] into expert buffers [E, C_buf, d] (unused rows are zero)."""
    buffers = _GatherRows.apply(tokens, plan.token_of_slot, plan.slot_of_choice)
    return buffers.view(plan.num_experts, plan.buffer_capacity, tokens.shape[1])


def combine(expert_out: torch.Tensor, plan: DispatchPlan, weight: torch.Tensor) -> torch.Tensor:
    """Expert outputs [E, C_buf, d] -> tokens [S, d]: sum over kept choices of weight [S, k] * output."""
    dim = expert_out.shape[-1]
    rows = expert_out.reshape(-1, dim)
    picked = _GatherRows.apply(rows, plan.slot_of_choice.reshape(-1), plan.choice_of_slot)  # [S * k, d]
    num_tokens, k = weight.shape
    weight = weight.to(expert_out.dtype)
    if k == 1:
        return picked * weight
    return (picked.view(num_tokens, k, dim) * weight.unsqueeze(-1)).sum(dim=1)


class IndexDispatcher:
    """Tokens [S, d] <-> expert buffers [E, C_buf, d] for one routing, by index gathers
    (``MoEConfig.backend = "ours"``; `vlmoe.moe.tutel_dispatch.TutelDispatcher` is the other).

    rows_used: [E] filled rows per expert (rows fill in order).
    """

    def __init__(self, routing: Routing, num_experts: int) -> None:
        self.plan = plan_dispatch(routing, num_experts)
        self.rows_used = self.plan.rows_used
        self._weight = routing.weight

    def dispatch(self, tokens: torch.Tensor) -> torch.Tensor:
        return dispatch(tokens, self.plan)

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        return combine(expert_out, self.plan, self._weight)
