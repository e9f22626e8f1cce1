"""Soft MoE FFN experts (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", 2023).

Each example is its own group: its S = E * p slots are softmax-weighted averages of its tokens
(dispatch: softmax over the tokens, per slot), expert e processes slots e*p .. e*p + p - 1 of
every example, and each token's output is a softmax-weighted average of the slot outputs
(combine: softmax over the slots, per token). Logits come from L2-normalised tokens (times one
learnable scale) against L2-normalised slot parameters phi, as vmoe's soft router computes them.
Nothing is dropped and there is no balancing loss; padding tokens take no part in any slot and
get zero output.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence, Union

import torch
from torch.profiler import record_function

from vlmoe.moe.config import MoEConfig
from vlmoe.moe.expert_layer import ExpertLayer, TokenInputs, TokenMasks, in_backward, token_groups
from vlmoe.moe.experts import Experts
from vlmoe.moe.metrics import SoftRoutingStats
from vlmoe.moe.parallel import ep_rank_and_size, run_experts
from vlmoe.moe.soft_router import SoftRouter


def slots_to_buffers(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """slots [B, E*p, D] -> expert buffers [E, B*p, D] (expert e takes slots e*p.. of every example)."""
    batch, num_slots, dim = slots.shape
    per_expert = num_slots // num_experts
    return slots.view(batch, num_experts, per_expert, dim).transpose(0, 1).reshape(num_experts, -1, dim)


def buffers_to_slots(buffers: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `slots_to_buffers`: [E, B*p, D] -> [B, E*p, D]."""
    num_experts, rows, dim = buffers.shape
    per_expert = rows // batch
    return buffers.view(num_experts, batch, per_expert, dim).transpose(0, 1).reshape(batch, -1, dim)


class SoftMoE(ExpertLayer):
    """Soft mixture of FFN experts replacing one FFN: forward(x [B, n, D], token_mask [B, n]) -> [B, n, D].

    From its `MoEConfig`: num_experts E and slots_per_expert p (the other fields are the sparse
    layer's). The router (`SoftRouter`: phi [D, E*p], scale [1]) gives dispatch and combine
    weights; the experts are the sparse layer's batched `Experts` on [E, B*p, D] buffers; with an
    EP group they are sharded and the buffers move by all-to-all. Same interface as `MoE` for the
    backbone and trainer: `pop_aux_loss()` (always None), `stats` / `pop_metrics()` per mode.
    """

    takes_token_groups: ClassVar[bool] = True  # forward takes lists of inputs (the backbone's protocol)

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, ep_group: Optional[object] = None,
                 init_std: float = 0.02, seed: Optional[int] = None, metric_prefix: str = "moe") -> None:
        super().__init__()
        ep_rank, ep_size = ep_rank_and_size(ep_group)
        if config.num_experts % ep_size:
            raise ValueError(f"SoftMoE: num_experts={config.num_experts} is not divisible by the EP group size "
                             f"{ep_size}")
        self.d_model, self.num_experts, self.slots_per_expert = d_model, config.num_experts, config.slots_per_expert
        self.ep_group, self.ep_size, self.metric_prefix = ep_group, ep_size, metric_prefix
        self.router = SoftRouter(d_model, self.num_slots, init_std)
        num_local = self.num_experts // ep_size
        self.experts = Experts(d_model, d_ff, num_local, first_expert=ep_rank * num_local, init_std=init_std,
                               seed=seed)
        # kept apart so that an evaluation between two log steps neither takes nor adds to training's
        self.train_stats, self.eval_stats = SoftRoutingStats(), SoftRoutingStats()

    @property
    def num_slots(self) -> int:
        """S = E * p slots per example."""
        return self.num_experts * self.slots_per_expert

    def forward(self, x: TokenInputs, token_mask: TokenMasks = None,
                tasks: Optional[Sequence[Optional[str]]] = None) -> Union[torch.Tensor, list[torch.Tensor]]:
        """x [B, n, d_model], token_mask [B, n] bool (True = real token; None = all) -> [B, n, d_model].

        Or several inputs in one call, as `MoE.forward` takes them (lists of x and token_mask;
        tasks, for the backbone's protocol, are not used): each input's examples get their own
        slots as in separate calls, and the experts run once over all of their slots.
        """
        outs = self._forward_groups(*token_groups(x, token_mask))
        return outs[0] if isinstance(x, torch.Tensor) else outs

    def _forward_groups(self, xs: list[torch.Tensor], token_masks: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        if len(xs) != len(token_masks) or not xs:
            raise ValueError(f"SoftMoE: {len(xs)} inputs and {len(token_masks)} token masks: expected one or more "
                             f"of each, as many of each")
        for x, token_mask in zip(xs, token_masks):
            if x.dim() != 3 or x.shape[-1] != self.d_model:
                raise ValueError(f"SoftMoE: expected input [B, n, {self.d_model}], got {tuple(x.shape)}")
            if token_mask is not None and token_mask.shape != x.shape[:2]:
                raise ValueError(f"SoftMoE: token_mask shape {tuple(token_mask.shape)} does not match input "
                                 f"{tuple(x.shape[:2])}")
        with record_function("vlmoe.moe.router"):
            weights = [self.router(x, token_mask) for x, token_mask in zip(xs, token_masks)]
        with record_function("vlmoe.moe.dispatch"):
            # slots mix the raw tokens (not the normalised ones the logits saw)
            buffers = [slots_to_buffers(w.dispatch.to(x.dtype).transpose(1, 2) @ x, self.num_experts)  # [B, S, D]
                       for w, x in zip(weights, xs)]
            rows = [b.shape[1] for b in buffers]
            buffers = buffers[0] if len(buffers) == 1 else torch.cat(buffers, dim=1)
        expert_out = run_experts(buffers, self.experts, self.ep_group)
        outs = []
        with record_function("vlmoe.moe.combine"):
            for w, x, group_out in zip(weights, xs, expert_out.split(rows, dim=1)):
                out_slots = buffers_to_slots(group_out, x.shape[0])
                outs.append(w.combine.to(out_slots.dtype) @ out_slots)  # [B, n, D]; zero rows for padding
        if not in_backward():  # an activation-checkpoint re-run must not count twice
            with record_function("vlmoe.moe.metrics"):
                for w, token_mask in zip(weights, token_masks):
                    self.stats.update(w.dispatch, w.combine, token_mask)
        return outs

    def pop_aux_loss(self) -> None:
        """Soft MoE has no balancing loss: always None (the trainer then logs no aux_loss)."""
        return None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"slots_per_expert={self.slots_per_expert}, ep_size={self.ep_size}")
