"""SMoLALinear: a frozen linear plus a soft mixture of zero-initialised low-rank experts."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from smola.context import token_masks_for
from smola.soft_mixture import add_soft_mixture


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """View x as [B, N, d]: [B, d] is one token per example; extra leading dims fold into B."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    if x.dim() > 3:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    raise ValueError(f"SMoLA expects inputs [B, N, d] or [B, d]; got shape {tuple(x.shape)}")


def mask_as_tokens(mask: Optional[torch.Tensor], x: torch.Tensor, tokens: torch.Tensor, what: str = "token_mask") -> Optional[torch.Tensor]:
    """A bool mask over x's tokens as [B, N] matching ``tokens`` (= as_tokens(x)); None stays None."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"{what} must be a bool tensor (True = token takes part); got dtype {mask.dtype}")
    if mask.numel() != tokens.shape[0] * tokens.shape[1]:
        raise ValueError(
            f"{what} of shape {tuple(mask.shape)} does not match the input of shape {tuple(x.shape)} "
            f"(one entry per token: {tuple(x.shape[:-1])})"
        )
    return mask.reshape(tokens.shape[0], tokens.shape[1]).to(tokens.device)


def tokens_and_masks(
    owner: nn.Module, x: torch.Tensor, token_mask: Optional[torch.Tensor], visual_mask: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], bool]:
    """x as tokens [B, N, d], its padding and visual masks [B, N] (or None), and whether
    x is a pooled input that declared sequence masks do not describe.

    Masks passed in must fit x. Masks declared with ``smola.token_masks`` fill the rest:
    they fit an input [B, n, d], or [B * n, d] (flattened tokens, viewed as [B, n, d]); a
    pooled input [B, d] (one token per example, e.g. a pooler) takes none of them.
    """
    if token_mask is None or visual_mask is None:
        declared = token_masks_for(owner)
        layout = None if declared is None else next((m for m in (declared.valid, declared.visual) if m is not None), None)
        if layout is not None:
            if tuple(x.shape[:-1]) == tuple(layout.shape):
                tokens = as_tokens(x)
            elif x.dim() == 2 and x.shape[0] == layout.numel():
                tokens = x.reshape(*layout.shape, x.shape[-1])
            elif x.dim() == 2 and x.shape[0] == layout.shape[0]:
                tokens = as_tokens(x)
                declared = None
            else:
                raise ValueError(
                    f"{type(owner).__name__}: the token masks declared around this call have shape "
                    f"{tuple(layout.shape)}, which does not fit its input of shape {tuple(x.shape)}; declare masks "
                    "around the module whose inputs have that token layout (e.g. an encoder, not a whole "
                    "encoder-decoder)"
                )
            if declared is not None:
                token_mask = declared.valid if token_mask is None else token_mask
                visual_mask = declared.visual if visual_mask is None else visual_mask
            return (tokens, mask_as_tokens(token_mask, x, tokens, "token_mask (padding)"),
                    mask_as_tokens(visual_mask, x, tokens, "visual_mask"), declared is None)
    tokens = as_tokens(x)
    return (tokens, mask_as_tokens(token_mask, x, tokens, "token_mask (padding)"),
            mask_as_tokens(visual_mask, x, tokens, "visual_mask"), False)


class LinearWrapper(nn.Module):
    """A module around a frozen linear ``self.base`` that still looks like it: models read
    ``layer.weight`` / ``layer.bias`` (dtype checks, tied heads), which are the base's."""

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias


class SoftLowRankExperts(nn.Module):
    """The trainable part of a SMoLA block: routing matrix, scale and E low-rank experts.

    Parameters: phi [E, d_in], alpha [1] (the scalar), w_in [E, r, d_in], w_out [E, d_out, r]
    (zeros, so the block adds nothing at init).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int = 4) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_experts", num_experts), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SMoLA {name} must be a positive int; got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank = num_experts, rank
        # Built from tensors rather than nn.init afterwards: under deepspeed.zero.Init the
        # parameters are partitioned as the constructor returns, and w_out must be zeros.
        std = 1.0 / math.sqrt(in_features)
        self.phi = nn.Parameter(torch.randn(num_experts, in_features) * std)
        # shape [1], not 0-dim: DeepSpeed broadcasts parameters through a uint8 view, which a
        # 0-dim tensor cannot take
        self.alpha = nn.Parameter(torch.ones(1))
        self.w_in = nn.Parameter(torch.randn(num_experts, rank, in_features) * std)
        self.w_out = nn.Parameter(torch.zeros(num_experts, out_features, rank))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, rank={self.rank}"

    def add_to(self, frozen: torch.Tensor, tokens: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """frozen [B, N, d_out] + this mixture over tokens [B, N, d_in] (mask [B, N] or None)."""
        return add_soft_mixture(frozen, tokens.to(frozen.dtype), self.phi, self.alpha, self.w_in, self.w_out, token_mask)


class SMoLALinear(SoftLowRankExperts, LinearWrapper):
    """A frozen linear plus a soft mixture of E rank-r experts over all (unmasked) tokens.

    forward(x [B, N, d_in] or [B, d_in], token_mask [B, N] bool or None) -> [..., d_out]:
    base(x) + C^T [W_out_i W_in_i (D X)_i] (Omni-SMoLA eqs. 1-4). Masked tokens take no
    part in dispatch and get base(x) only. Without a token_mask argument the padding mask
    declared with ``smola.token_masks`` (by our backbone or ``smola.modality_hooks``) is
    used. At init the output equals base(x) exactly.
    """

    def __init__(self, base: nn.Module, num_experts: int, rank: int = 4) -> None:
        if not isinstance(getattr(base, "in_features", None), int) or not isinstance(getattr(base, "out_features", None), int):
            raise TypeError(f"SMoLALinear wraps a linear layer with in_features/out_features; got {type(base).__name__}")
        super().__init__(base.in_features, base.out_features, num_experts, rank)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens, mask, _, _ = tokens_and_masks(self, x, token_mask, None)
        out = self.add_to(self.base(x).reshape(*tokens.shape[:-1], self.out_features), tokens, mask)
        return out.reshape(*x.shape[:-1], self.out_features)
