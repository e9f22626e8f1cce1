"""The sparse layer's router: gating, noise, capacity, top-k routing with Batch Priority Routing
(V-MoE) and the auxiliary terms, in one place.

`route` is pure: it turns one group's logits into, for every (token, choice), the chosen
expert, the slot in that expert's buffer (-1 when the buffer is full) and the gate weight.
`TopKRouter` owns the gating weight and returns, per call, what the dispatcher needs (a
`Routing`) with the aux terms computed from the same logits (`RouterOutput`); it keeps no state
between calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.moe.config import MoEConfig
from vlmoe.moe.counts import expert_counts
from vlmoe.moe.losses import RouterTensors, aux_loss_terms, weighted_aux_loss
from vlmoe.nn.init import trunc_normal_


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
    counts = expert_counts(expert_sequence, num_experts)
    group_start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=expert_sequence.device) - group_start[expert_sequence[by_expert]]
    position = torch.empty_like(expert_sequence)
    position[by_expert] = rank_sorted
    return position


@dataclass(frozen=True)
class RouterOutput:
    """One call's routing and its aux terms.

    routing: what the dispatcher needs ([S, k] experts, slots, weights; [S, E] gates).
    aux_terms: each configured balancing term (and "z"), unweighted scalars; empty in evaluation.
    aux_loss: their weighted sum (aux_weight, z_loss_weight), None when there are none.
    """

    routing: Routing
    aux_terms: dict[str, torch.Tensor]
    aux_loss: Optional[torch.Tensor]


class TopKRouter(nn.Module):
    """Gating weight [E, d] of one sparse MoE layer, with the routing options of its `MoEConfig`.

    forward(tokens [S, d]) -> `RouterOutput` for that group. In training the logits get Gaussian
    noise of std noise_std / E and the capacity uses capacity_factor; in evaluation no noise and
    eval_capacity_factor. Logits and gates are float32 whatever the input dtype or autocast.
    """

    def __init__(self, d_model: int, config: MoEConfig, aux_losses: Sequence[str], init_std: float = 0.02) -> None:
        super().__init__()
        self.config, self.aux_losses, self.d_model = config, tuple(aux_losses), d_model
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))
        if not self.weight.is_meta:  # shape-only model (parameter counting)
            trunc_normal_(self.weight.data, init_std)  # whole here: zero.Init partitions after __init__

    def noise_std(self) -> float:
        """The std of the logit noise of a call in the current mode (0: none)."""
        cfg = self.config
        return cfg.noise_std / cfg.num_experts if self.training and cfg.noise_std > 0 else 0.0

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for a group of `num_tokens` tokens in the current mode."""
        cfg = self.config
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return expert_capacity(num_tokens, cfg.num_experts, cfg.k, factor, cfg.min_capacity)

    def forward(self, tokens: torch.Tensor) -> RouterOutput:
        cfg = self.config
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.weight.float())  # [S, E]
        noise_std = self.noise_std()
        noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
        routing = route(noisy, cfg.k, self.capacity(tokens.shape[0]), cfg.batch_priority)
        terms = self._aux_terms(routing, logits, noisy, noise_std)
        return RouterOutput(routing, terms, weighted_aux_loss(terms, cfg.aux_weight, cfg.z_loss_weight))

    def _aux_terms(self, routing: Routing, logits: torch.Tensor, noisy: torch.Tensor,
                   noise_std: float) -> dict[str, torch.Tensor]:
        if not self.training or logits.shape[0] == 0:
            return {}
        # Importance uses the clean gates; routing used the noisy ones (as in vmoe).
        clean_gates = torch.softmax(logits, dim=-1) if noise_std > 0 else routing.gates
        tensors = RouterTensors(logits=logits, noisy_logits=noisy, gates=clean_gates, expert=routing.expert,
                                k=self.config.k, noise_std=noise_std)
        return aux_loss_terms(self.aux_losses, tensors, self.config.z_loss_weight)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, num_experts={cfg.num_experts}, k={cfg.k}, "
                f"capacity_factor={cfg.capacity_factor}/{cfg.eval_capacity_factor}, "
                f"batch_priority={cfg.batch_priority}, noise_std={cfg.noise_std}, aux={self.aux_losses}")
