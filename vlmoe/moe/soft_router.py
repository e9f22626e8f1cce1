"""Soft MoE's router (Puigcerver et al. 2023, as vmoe's soft router computes it): per example,
logits from L2-normalised tokens (times one learnable scale) against L2-normalised slot
parameters phi; dispatch weights are a softmax over the example's real tokens, combine weights
a softmax over the slots. `SoftRouter` owns phi and the scale; the functions are pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from vlmoe.nn.init import trunc_normal_

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


class SoftRouter(nn.Module):
    """phi [D, S] (truncated normal, init_std) and scale [1] (1.0) of one Soft MoE layer with S slots
    per example: forward(x [B, n, D], token_mask [B, n] | None) -> `SoftWeights`."""

    def __init__(self, d_model: int, num_slots: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.empty(d_model, num_slots))
        # shape [1], not []: DeepSpeed's broadcast of the initial weights views each as bytes (not 0-d)
        self.scale = nn.Parameter(torch.ones(1))
        if not self.phi.is_meta:  # shape-only model (parameter counting)
            trunc_normal_(self.phi.data, init_std)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> SoftWeights:
        return soft_weights(soft_logits(x, self.phi, self.scale), token_mask)

    def extra_repr(self) -> str:
        return f"d_model={self.phi.shape[0]}, num_slots={self.phi.shape[1]}"
