"""Omni-SMoLA: MM, V and T mixtures around one frozen linear (paper sec. 3.3).

Y = X W* + SMoLA_MM(all tokens) + SMoLA_V(visual tokens) + SMoLA_T(text tokens): the V
and T outputs land back at their tokens' positions. The branches run as one mixture of
G*E experts whose groups have their own token masks and combine softmaxes (see
smola.soft_mixture): a masked token takes no part in a group, which equals gathering the
group's tokens, running its block on them alone and scattering the outputs back. Which tokens are visual comes from
``smola.token_masks`` (declared by our multiway backbone, or by ``smola.modality_hooks``)
or from the ``visual_mask`` argument.

A model may also declare, statically, which of its sub-modules only ever see one modality
(``MODALITY_ATTR``; our multiway backbone does, for its V-FFN and T-FFN): ``smola.inject``
then gives the linears inside them only the branches their tokens can reach, mm plus that
modality's (``reachable_branches``), instead of a V or T block that never receives a token.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from smola.block import LinearWrapper, SoftLowRankExperts, tokens_and_masks
from smola.soft_mixture import add_soft_mixture

BRANCHES = ("mm", "v", "t")
MODALITIES = ("v", "t")
MODALITY_ATTR = "smola_modalities"
"""A module attribute (class or instance) ``{child name: "v" | "t"}``: every token that enters that
child is visual ("v") or text ("t"), e.g. ``{"ffn_v": "v", "ffn_t": "t"}`` on a multiway block.
On a Hugging Face model, set it on the parent of a vision-only or text-only tower."""
_warned_no_modality = False


def reachable_branches(branches: Sequence[str], modality: Optional[str]) -> tuple[str, ...]:
    """The branches of ``branches`` whose tokens can reach a linear that only ``modality`` tokens
    enter ("v" or "t"; None = any token): mm and that modality's branch, in ``BRANCHES`` order."""
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"a linear's token modality must be one of {MODALITIES} or None; got {modality!r}")
    live = BRANCHES if modality is None else ("mm", modality)
    return tuple(b for b in BRANCHES if b in branches and b in live)


def _warn_no_modality_once() -> None:
    global _warned_no_modality
    if not _warned_no_modality:
        _warned_no_modality = True
        warnings.warn(
            "Omni-SMoLA got no modality information (no visual mask declared with smola.token_masks or "
            "smola.modality_hooks, none passed): its V and T experts are skipped and it runs as SMoLA_MM. "
            "Warned once per process.",
            RuntimeWarning,
            stacklevel=3,
        )


def branch_masks(valid: Optional[torch.Tensor], visual: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
    """Token masks [B, N] of each branch: mm = valid, v = valid & visual, t = valid & ~visual."""
    if valid is None:
        return {"mm": None, "v": visual, "t": ~visual}
    return {"mm": valid, "v": valid & visual, "t": valid & ~visual}


class OmniSMoLALinear(LinearWrapper):
    """A frozen linear plus SMoLA mixtures per token group: any of mm (all), v, t.

    Submodules ``mm``, ``v``, ``t`` (those in ``branches``) each hold phi, alpha, w_in, w_out.
    forward(x [B, N, d_in] or [B, d_in], token_mask [B, N] bool = real tokens or None,
    visual_mask [B, N] bool = visual tokens or None) -> [..., d_out]. Masks not passed are
    read from ``smola.token_masks``. With no visual mask anywhere, the mm branch runs alone
    (one warning per process; silently for a pooled [B, d] input inside a masked region);
    a block without an mm branch then raises.
    """

    def __init__(self, base: nn.Module, num_experts: int, rank: int = 4, branches: Sequence[str] = BRANCHES) -> None:
        super().__init__()
        if not isinstance(getattr(base, "in_features", None), int) or not isinstance(getattr(base, "out_features", None), int):
            raise TypeError(f"OmniSMoLALinear wraps a linear layer with in_features/out_features; got {type(base).__name__}")
        unknown = [b for b in branches if b not in BRANCHES]
        if unknown or not branches or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be distinct names from {BRANCHES}; got {list(branches)}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.branches = tuple(b for b in BRANCHES if b in branches)
        for p in base.parameters():
            p.requires_grad_(False)
        for name in self.branches:
            self.add_module(name, SoftLowRankExperts(base.in_features, base.out_features, num_experts, rank))

    def extra_repr(self) -> str:
        return f"branches={self.branches}"

    def forward(
        self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, visual_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        tokens, valid, visual, pooled = tokens_and_masks(self, x, token_mask, visual_mask)
        if visual is None:
            if "mm" not in self.branches:
                raise ValueError(
                    f"SMoLA branches {self.branches} adapt only visual or text tokens, but no visual mask was "
                    "given: declare one with smola.token_masks / smola.modality_hooks, or use mode='mm'"
                )
            if len(self.branches) > 1 and not pooled:  # a pooled token has no modality to miss
                _warn_no_modality_once()
            masks: dict[str, Optional[torch.Tensor]] = {"mm": valid}
        else:
            masks = branch_masks(valid, visual)
        out = self.base(x).reshape(*tokens.shape[:-1], self.out_features)
        # Branches with no token here (e.g. T on an image-only input) add nothing and are left out.
        active = [n for n in self.branches if n in masks and (masks[n] is None or bool(masks[n].any()))]
        if not active:
            return out.reshape(*x.shape[:-1], self.out_features)
        group_masks = [masks[n] for n in active]
        token_mask = None
        if any(m is not None for m in group_masks):
            all_tokens = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            token_mask = torch.stack([all_tokens if m is None else m for m in group_masks], dim=-1)
        blocks = [getattr(self, n) for n in active]
        out = add_soft_mixture(
            out, tokens.to(out.dtype),
            [b.phi for b in blocks], [b.alpha for b in blocks], [b.w_in for b in blocks], [b.w_out for b in blocks],
            token_mask,
        )
        return out.reshape(*x.shape[:-1], self.out_features)
