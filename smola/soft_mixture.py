"""The soft mixture of low-rank experts (Omni-SMoLA eqs. 1-4) as one autograd function.

For the N tokens X [N, d_in] of one example, with phi_n = norm(Phi) [E, d_in]:
    logits = alpha * phi_n norm(X)^T           laid out here as [N, E]
    D = softmax over tokens, C = softmax over experts (fp32, masked tokens excluded)
    y_i = W_out_i W_in_i (D^T X)_i             the raw X is dispatched
    Y = frozen + C y                           added in place to the frozen output

Why a hand-written backward: autograd of the composed ops materialises norm(X), both
softmax Jacobian products and several [B, N, d] temporaries; here every [B, N, *] pass is
a GEMM except one fused elementwise pass, and d(norm X)/dX is folded into the dispatch
GEMM (see ``backward``).
"""
from __future__ import annotations

from typing import Optional

import torch

# Masked logits get this before the softmaxes: finite, so a fully masked row gives a
# uniform (then zeroed) distribution instead of NaN in the forward or backward pass.
_MASKED_LOGIT = -1e30
_NORM_EPS = 1e-12  # as F.normalize


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes and norms run in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def routing_weights(logits: torch.Tensor, token_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights (eqs. 1-2) from routing logits.

    logits: [B, N, E] float; token_mask: [B, N] bool (True = takes part) or None.
    Returns (dispatch, combine), both [B, N, E] in fp32 (or fp64 for fp64 logits): dispatch sums to 1 over the
    unmasked tokens of each expert, combine sums to 1 over experts for each unmasked
    token; masked tokens get zero in both (a fully masked example gets all zeros).
    """
    logits = logits.to(routing_dtype(logits.dtype))
    if token_mask is None:
        return logits.softmax(dim=1), logits.softmax(dim=2)
    keep = token_mask.unsqueeze(-1)
    logits = logits.masked_fill(~keep, _MASKED_LOGIT)
    return logits.softmax(dim=1) * keep, logits.softmax(dim=2) * keep


def token_cosines(x: torch.Tensor, phi_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines between tokens and experts without materialising norm(x).

    x: [B, N, d_in]; phi_n: [E, d_in] unit rows. Returns (cos [B, N, E],
    inv_norm [B, N, 1] = 1 / max(|x|, eps)), both in routing_dtype(x.dtype).
    """
    rdtype = routing_dtype(x.dtype)
    inv_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=rdtype).clamp_min(_NORM_EPS).reciprocal()
    return torch.matmul(x, phi_n.t()).to(rdtype) * inv_norm, inv_norm


def _experts(slots: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [B, E, d_in] -> (low [B, E, r], expert outputs [B, E, d_out]); low rank first."""
    low = torch.bmm(slots.transpose(0, 1), w_in.transpose(1, 2)).transpose(0, 1)
    return low, torch.bmm(low.transpose(0, 1), w_out.transpose(1, 2)).transpose(0, 1)


class SoftMixtureAdd(torch.autograd.Function):
    """frozen += C (W_out W_in (D^T x)) in place; returns frozen. Shapes in ``apply``."""

    @staticmethod
    def forward(ctx, frozen, x, phi_n, alpha, w_in, w_out, token_mask):  # type: ignore[override]
        cos, inv_norm = token_cosines(x, phi_n)
        dispatch, combine = routing_weights(cos * alpha.to(cos.dtype), token_mask)
        slots = torch.bmm(dispatch.to(x.dtype).transpose(1, 2), x)
        low, expert_out = _experts(slots, w_in, w_out)
        frozen.baddbmm_(combine.to(x.dtype), expert_out)
        ctx.mark_dirty(frozen)
        ctx.save_for_backward(x, phi_n, alpha, w_in, w_out, dispatch, combine, cos, inv_norm, slots, low, expert_out)
        return frozen

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, phi_n, alpha, w_in, w_out, dispatch, combine, cos, inv_norm, slots, low, expert_out = ctx.saved_tensors
        dtype, (batch, _, d_in) = x.dtype, x.shape
        num_experts = phi_n.shape[0]
        grad_out = grad_out.to(dtype)
        d_combine = torch.bmm(grad_out, expert_out.transpose(1, 2)).to(cos.dtype)  # [B, N, E]
        d_expert_out = torch.bmm(combine.to(dtype).transpose(1, 2), grad_out)  # [B, E, d_out]
        # Experts, batched over E: y_e = W_out_e low_e, low_e = W_in_e slot_e.
        d_eo = d_expert_out.transpose(0, 1)  # [E, B, d_out]
        d_w_out = torch.bmm(d_eo.transpose(1, 2), low.transpose(0, 1))  # [E, d_out, r]
        d_low = torch.bmm(d_eo, w_out)  # [E, B, r]
        d_w_in = torch.bmm(d_low.transpose(1, 2), slots.transpose(0, 1))  # [E, r, d_in]
        d_slots = torch.bmm(d_low, w_in).transpose(0, 1)  # [B, E, d_in]
        d_dispatch = torch.bmm(x, d_slots.transpose(1, 2)).to(cos.dtype)  # [B, N, E]
        # Softmax backward over tokens (dispatch) and over experts (combine); masked
        # entries have zero weight, so they get zero gradient.
        d_logits = dispatch * (d_dispatch - (dispatch * d_dispatch).sum(1, keepdim=True))
        d_logits += combine * (d_combine - (combine * d_combine).sum(2, keepdim=True))
        d_alpha = (d_logits * cos).sum().to(alpha.dtype).reshape(alpha.shape)
        d_cos = d_logits * alpha.to(cos.dtype)
        scaled = d_cos * inv_norm  # d loss / d (phi_n x^T), [B, N, E]
        d_phi_n = torch.mm(scaled.reshape(-1, num_experts).t().to(dtype), x.reshape(-1, d_in))
        d_x = None
        if ctx.needs_input_grad[1]:
            # d x = D d_slots + scaled phi_n - x |x|^-2 sum_e(cos d_cos): the last term is
            # the normalisation's radial part, since norm(x) . d_norm = sum_e cos d_cos.
            stacked_w = torch.cat([dispatch, scaled], dim=2).to(dtype)  # [B, N, 2E]
            stacked_v = torch.cat([d_slots, phi_n.expand(batch, num_experts, d_in)], dim=1)  # [B, 2E, d_in]
            d_x = torch.bmm(stacked_w, stacked_v)
            radial = inv_norm * inv_norm * (cos * d_cos).sum(-1, keepdim=True)
            d_x.addcmul_(x, radial.to(dtype), value=-1)
        return grad_out, d_x, d_phi_n, d_alpha, d_w_in, d_w_out, None


def add_soft_mixture(
    frozen: torch.Tensor,
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """frozen + C^T [W_out_i W_in_i (D X)_i] (eqs. 1-4), written into ``frozen`` in place.

    frozen: [B, N, d_out], the frozen layer's output for x; x: [B, N, d_in];
    phi: [E, d_in]; alpha: scalar; w_in: [E, r, d_in]; w_out: [E, d_out, r];
    token_mask: [B, N] bool or None. Matmuls run in x's dtype, softmaxes in fp32.
    Returns frozen (modified in place, autograd-aware).
    """
    dtype = x.dtype
    phi_n = torch.nn.functional.normalize(phi.to(dtype), dim=-1)
    return SoftMixtureAdd.apply(frozen, x, phi_n, alpha, w_in.to(dtype), w_out.to(dtype), token_mask)
