"""Soft mixtures of low-rank experts (Omni-SMoLA eqs. 1-4): routing as one autograd function.

For the N tokens X [N, d_in] of one example, with phi_n = norm(Phi) [E, d_in]:
    logits = alpha * phi_n norm(X)^T           laid out here as [N, E]
    D = softmax over tokens, C = softmax over experts (fp32, masked tokens excluded)
    y_i = W_out_i W_in_i (D^T X)_i             the raw X is dispatched
    Y = frozen + C y                           added in place to the frozen output

G groups of E experts run as one mixture of G*E experts: each group has its own alpha,
its own token mask (Omni-SMoLA's MM, V and T blocks) and its own combine softmax, while
logits, dispatch, experts and combine are single GEMMs over all G*E columns.

Why a hand-written backward: autograd of the composed ops materialises norm(X), both
softmax Jacobian products and several [B, N, d] temporaries; here every [B, N, *] pass is
a GEMM except one fused elementwise pass, and d(norm X)/dX is folded into the dispatch
GEMM (see ``backward``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

# Masked logits get this before the softmaxes: finite, so a fully masked row gives a
# uniform (then zeroed) distribution instead of NaN in the forward or backward pass.
_MASKED_LOGIT = -1e30
_NORM_EPS = 1e-12  # as F.normalize


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes and norms run in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def routing_weights(
    logits: torch.Tensor, token_mask: Optional[torch.Tensor], groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights (eqs. 1-2) from routing logits.

    logits: [B, N, G*E] float, G groups of E experts; token_mask: [B, N, G] bool (True =
    the token takes part in that group) or [B, N] for G = 1, or None.
    Returns (dispatch, combine), both [B, N, G*E] in fp32 (fp64 for fp64 logits): dispatch
    sums to 1 over each expert's unmasked tokens, combine sums to 1 over each group's
    experts for every unmasked token; masked entries are zero (a group with no token:
    all zeros).
    """
    batch, tokens, columns = logits.shape
    grouped = logits.to(routing_dtype(logits.dtype)).view(batch, tokens, groups, columns // groups)
    if token_mask is None:
        return grouped.softmax(dim=1).view_as(logits), grouped.softmax(dim=3).view_as(logits)
    keep = token_mask.view(batch, tokens, groups, 1)
    grouped = grouped.masked_fill(~keep, _MASKED_LOGIT)
    dispatch = (grouped.softmax(dim=1) * keep).view(batch, tokens, columns)
    return dispatch, (grouped.softmax(dim=3) * keep).view(batch, tokens, columns)


def token_cosines(x: torch.Tensor, phi_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines between tokens and experts without materialising norm(x).

    x: [B, N, d_in]; phi_n: [E, d_in] unit rows. Returns (cos [B, N, E],
    inv_norm [B, N, 1] = 1 / max(|x|, eps)), both in routing_dtype(x.dtype).
    """
    rdtype = routing_dtype(x.dtype)
    inv_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=rdtype).clamp_min(_NORM_EPS).reciprocal()
    return torch.matmul(x, phi_n.t()).to(rdtype) * inv_norm, inv_norm


class SoftRouting(torch.autograd.Function):
    """Dispatch and combine (eqs. 1-2) for G groups of E experts, with a fused backward.

    forward(x [B, N, d_in], phi_n [G*E, d_in] unit rows, alpha [G], token_mask [B, N, G]
    bool or None) -> (slots = D^T x [B, G*E, d_in], combine [B, N, G*E]), both in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, phi_n, alpha, token_mask):  # type: ignore[override]
        groups = alpha.shape[0]
        cos, inv_norm = token_cosines(x, phi_n)
        column_alpha = alpha.to(cos.dtype).repeat_interleave(phi_n.shape[0] // groups)
        dispatch, combine = routing_weights(cos * column_alpha, token_mask, groups)
        slots = torch.bmm(dispatch.to(x.dtype).transpose(1, 2), x)
        ctx.save_for_backward(x, phi_n, column_alpha, dispatch, combine, cos, inv_norm)
        ctx.groups = groups
        return slots, combine.to(x.dtype)

    @staticmethod
    def backward(ctx, d_slots, d_combine):  # type: ignore[override]
        x, phi_n, column_alpha, dispatch, combine, cos, inv_norm = ctx.saved_tensors
        dtype, (batch, tokens, d_in), groups = x.dtype, x.shape, ctx.groups
        columns = phi_n.shape[0]
        d_slots = torch.zeros(batch, columns, d_in, dtype=dtype, device=x.device) if d_slots is None else d_slots.to(dtype)
        d_dispatch = torch.bmm(x, d_slots.transpose(1, 2)).to(cos.dtype)  # [B, N, GE]
        # Softmax backward over tokens (dispatch, per column) and over each group's experts
        # (combine); masked entries have zero weight, so they get zero gradient.
        d_logits = dispatch * (d_dispatch - (dispatch * d_dispatch).sum(1, keepdim=True))
        if d_combine is not None:
            d_combine = d_combine.to(cos.dtype)
            per_group = (combine * d_combine).view(batch, tokens, groups, -1).sum(3, keepdim=True)
            d_logits += combine * (d_combine - per_group.expand(-1, -1, -1, columns // groups).reshape_as(d_combine))
        d_alpha = (d_logits * cos).view(batch, tokens, groups, -1).sum((0, 1, 3))
        d_cos = d_logits * column_alpha
        scaled = d_cos * inv_norm  # d loss / d (phi_n x^T), [B, N, GE]
        d_phi_n = torch.mm(scaled.reshape(-1, columns).t().to(dtype), x.reshape(-1, d_in))
        d_x = None
        if ctx.needs_input_grad[0]:
            # d x = D d_slots + scaled phi_n - x |x|^-2 sum_e(cos d_cos): the last term is
            # the normalisation's radial part, since norm(x) . d_norm = sum_e cos d_cos.
            stacked_w = torch.cat([dispatch, scaled], dim=2).to(dtype)  # [B, N, 2GE]
            stacked_v = torch.cat([d_slots, phi_n.expand(batch, columns, d_in)], dim=1)  # [B, 2GE, d_in]
            d_x = torch.bmm(stacked_w, stacked_v)
            radial = inv_norm * inv_norm * (cos * d_cos).sum(-1, keepdim=True)
            d_x.addcmul_(x, radial.to(dtype), value=-1)
        return d_x, d_phi_n, d_alpha, None


def _as_groups(value: Union[torch.Tensor, Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def add_soft_mixture(
    frozen: torch.Tensor,
    x: torch.Tensor,
    phi: Union[torch.Tensor, Sequence[torch.Tensor]],
    alpha: Union[torch.Tensor, Sequence[torch.Tensor]],
    w_in: Union[torch.Tensor, Sequence[torch.Tensor]],
    w_out: Union[torch.Tensor, Sequence[torch.Tensor]],
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """frozen + sum over groups g of C_g^T [W_out_i W_in_i (D_g X)_i] (eqs. 1-4), in place.

    frozen: [B, N, d_out], the frozen layer's output for x; x: [B, N, d_in].
    One block: phi [E, d_in], alpha scalar, w_in [E, r, d_in], w_out [E, d_out, r],
    token_mask [B, N] bool or None. G blocks: sequences of G such tensors (same E) and
    token_mask [B, N, G] bool or None. Matmuls run in x's dtype, softmaxes in fp32.
    Returns frozen updated in place when autograd records nothing, else a new tensor.
    """
    phis, alphas, w_ins, w_outs = _as_groups(phi), _as_groups(alpha), _as_groups(w_in), _as_groups(w_out)
    groups, experts = len(phis), phis[0].shape[0]
    if isinstance(phi, torch.Tensor) and token_mask is not None:
        token_mask = token_mask[..., None]
    if not (len(alphas) == len(w_ins) == len(w_outs) == groups) or any(
        p.shape[0] != experts or wi.shape[0] != experts or wo.shape[0] != experts for p, wi, wo in zip(phis, w_ins, w_outs)
    ):
        raise ValueError(f"soft mixture groups disagree: {groups} phi, {len(alphas)} alpha, {len(w_ins)} w_in, "
                         f"{len(w_outs)} w_out with experts {[p.shape[0] for p in phis]}")
    if token_mask is not None and token_mask.shape != (*x.shape[:2], groups):
        raise ValueError(f"token_mask of shape {tuple(token_mask.shape)} does not fit x {tuple(x.shape)} with {groups} group(s)")
    dtype = x.dtype
    phi_n = torch.nn.functional.normalize(torch.cat(phis).to(dtype), dim=-1)
    slots, combine = SoftRouting.apply(x, phi_n, torch.stack([a.reshape(()) for a in alphas]), token_mask)
    # Each group's experts, batched over its E (low rank first): y_e = W_out_e W_in_e slot_e.
    outputs = []
    for g, (wi, wo) in enumerate(zip(w_ins, w_outs)):
        low = torch.einsum("bed,erd->ber", slots[:, g * experts:(g + 1) * experts], wi.to(dtype))
        outputs.append(torch.einsum("ber,eor->beo", low, wo.to(dtype)))
    expert_out = outputs[0] if groups == 1 else torch.cat(outputs, dim=1)
    if frozen.requires_grad or combine.requires_grad or expert_out.requires_grad:
        # Out of place under autograd: frozen is usually a view of the linear's 2-D output, and
        # an in-place op on a view makes the backward copy the whole [B, N, d_out] gradient
        # three times (CopySlices).
        return torch.baddbmm(frozen, combine, expert_out)
    return frozen.baddbmm_(combine, expert_out)
