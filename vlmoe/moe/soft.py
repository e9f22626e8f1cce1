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

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vlmoe.moe.expert_layer import ExpertLayer, in_backward
from vlmoe.moe.experts import Experts
from vlmoe.moe.metrics import SoftRoutingStats
from vlmoe.moe.parallel import ep_rank_and_size, run_expert_parallel

# vmoe's normalize: x * rsqrt(sum(x^2) + eps), smooth at 0 (an all-zero token gets logits 0)
NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x / ||x|| along `dim` (with vmoe's eps inside the square root), same shape."""
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True) + NORM_EPS)


def soft_logits(x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, n, D], phi [D, S], scale [] or [1] -> logits [B, n, S] in float32 (float64 stays float64).

    logits[b, t, s] = <normalize(x[b, t]) * scale, normalize(phi[:, s])>.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # routing in fp32 even under bf16/fp16 or autocast
    with torch.autocast(x.device.type, enabled=False):
        tokens = l2_normalize(x.to(dtype), -1) * scale.to(dtype)
        return tokens @ l2_normalize(phi.to(dtype), 0)


@dataclass(frozen=True)
class SoftWeights:
    """dispatch [B, n, S]: per slot, a distribution over the example's real tokens (all zero for an
    example without one); combine [B, n, S]: per real token, a distribution over the slots (zero
    rows for padding)."""

    dispatch: torch.Tensor
    combine: torch.Tensor


def soft_weights(logits: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> SoftWeights:
    """Dispatch and combine weights from logits [B, n, S]; token_mask [B, n] bool (True = real token)."""
    combine = torch.softmax(logits, dim=-1)
    if token_mask is None:
        return SoftWeights(torch.softmax(logits, dim=1), combine)
    real = token_mask.unsqueeze(-1)
    # A finite fill (not -inf) keeps an all-padding example's softmax finite (uniform); the
    # multiplication by the mask then zeroes it, and is exact (0 already) for padding elsewhere.
    filled = logits.masked_fill(~real, torch.finfo(logits.dtype).min)
    return SoftWeights(torch.softmax(filled, dim=1) * real, combine * real)


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

    Router parameters: phi [D, E*p] (trunc-normal, init_std) and a scalar scale [1] (1.0). Experts are
    the sparse layer's batched `Experts` on [E, B*p, D] buffers; with an EP group they are sharded
    and the buffers move by all-to-all. Same interface as `MoE` for the backbone and trainer:
    `pop_aux_loss()` (always None), `stats` / `pop_metrics()` per mode.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, slots_per_expert: int = 1,
                 ep_group: Optional[object] = None, init_std: float = 0.02, seed: Optional[int] = None,
                 metric_prefix: str = "moe") -> None:
        super().__init__()
        if num_experts < 1 or slots_per_expert < 1:
            raise ValueError(f"SoftMoE: num_experts and slots_per_expert must be >= 1, got {num_experts}, "
                             f"{slots_per_expert}")
        ep_rank, ep_size = ep_rank_and_size(ep_group)
        if num_experts % ep_size:
            raise ValueError(f"SoftMoE: num_experts={num_experts} is not divisible by the EP group size {ep_size}")
        self.d_model, self.num_experts, self.slots_per_expert = d_model, num_experts, slots_per_expert
        self.ep_group, self.ep_size, self.metric_prefix = ep_group, ep_size, metric_prefix
        self.phi = nn.Parameter(torch.empty(d_model, num_experts * slots_per_expert))
        # shape [1], not []: DeepSpeed's broadcast of the initial weights views each as bytes (not 0-d)
        self.scale = nn.Parameter(torch.ones(1))
        if not self.phi.is_meta:  # shape-only model (parameter counting)
            nn.init.trunc_normal_(self.phi.data, std=init_std, a=-2 * init_std, b=2 * init_std)
        num_local = num_experts // ep_size
        self.experts = Experts(d_model, d_ff, num_local, first_expert=ep_rank * num_local, init_std=init_std,
                               seed=seed)
        # kept apart so that an evaluation between two log steps neither takes nor adds to training's
        self.train_stats, self.eval_stats = SoftRoutingStats(), SoftRoutingStats()

    @property
    def num_slots(self) -> int:
        """S = E * p slots per example."""
        return self.num_experts * self.slots_per_expert

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, n, d_model], token_mask [B, n] bool (True = real token; None = all) -> [B, n, d_model]."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SoftMoE: expected input [B, n, {self.d_model}], got {tuple(x.shape)}")
        if token_mask is not None and token_mask.shape != x.shape[:2]:
            raise ValueError(f"SoftMoE: token_mask shape {tuple(token_mask.shape)} does not match input "
                             f"{tuple(x.shape[:2])}")
        weights = soft_weights(soft_logits(x, self.phi, self.scale), token_mask)
        # slots mix the raw tokens (not the normalised ones the logits saw)
        slots = weights.dispatch.to(x.dtype).transpose(1, 2) @ x  # [B, S, D]
        buffers = slots_to_buffers(slots, self.num_experts)
        if self.ep_group is None:
            expert_out = self.experts(buffers)
        else:
            expert_out = run_expert_parallel(buffers, self.experts, self.ep_group)
        out_slots = buffers_to_slots(expert_out, x.shape[0])
        out = weights.combine.to(out_slots.dtype) @ out_slots  # [B, n, D]; zero rows for padding
        if not in_backward():  # an activation-checkpoint re-run must not count twice
            self.stats.update(weights.dispatch, weights.combine, token_mask)
        return out

    def pop_aux_loss(self) -> None:
        """Soft MoE has no balancing loss: always None (the trainer then logs no aux_loss)."""
        return None


    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"slots_per_expert={self.slots_per_expert}, ep_size={self.ep_size}")
