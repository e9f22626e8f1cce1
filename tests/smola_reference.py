"""A direct, loop-based transcription of Omni-SMoLA eqs. 1-4 (float64), for the tests.

One example, one expert, one token at a time, exactly as the paper writes it:
logits[i, n] = alpha * <Phi_i / |Phi_i|, x_n / |x_n|>, D = softmax over the example's
(unmasked) tokens, C = softmax over experts, slot_i = sum_n D[i, n] x_n,
y_i = W_out_i W_in_i slot_i, Y_n = base(x_n) + sum_i C[i, n] y_i for unmasked n.
"""
from __future__ import annotations

import torch


def smola_delta(x, phi, alpha, w_in, w_out, mask=None):
    """x [B, N, d_in] -> expert contribution [B, N, d_out]; mask [B, N] bool or None."""
    batch, tokens, _ = x.shape
    experts, d_out = phi.shape[0], w_out.shape[1]
    out = []
    for b in range(batch):
        keep = [n for n in range(tokens) if mask is None or bool(mask[b, n])]
        rows = [torch.zeros(d_out, dtype=x.dtype) for _ in range(tokens)]
        if keep:
            logits = {}
            for i in range(experts):
                for n in keep:
                    logits[i, n] = alpha * torch.dot(phi[i] / phi[i].norm(), x[b, n] / x[b, n].norm())
            ys = []
            for i in range(experts):
                denom = sum(torch.exp(logits[i, m]) for m in keep)
                slot = sum(torch.exp(logits[i, n]) / denom * x[b, n] for n in keep)
                ys.append(w_out[i] @ (w_in[i] @ slot))
            for n in keep:
                denom = sum(torch.exp(logits[j, n]) for j in range(experts))
                rows[n] = sum(torch.exp(logits[i, n]) / denom * ys[i] for i in range(experts))
        out.append(torch.stack(rows))
    return torch.stack(out)


def gathered_delta(x, params, group_mask):
    """The V / T reading of sec. 3.3: gather each example's tokens of the group, run the
    block on them alone, put the outputs back at their positions (zeros elsewhere)."""
    batch, tokens, _ = x.shape
    out = torch.zeros(batch, tokens, params[3].shape[1], dtype=x.dtype)
    for b in range(batch):
        idx = [n for n in range(tokens) if bool(group_mask[b, n])]
        if idx:
            delta = smola_delta(x[b, idx].unsqueeze(0), *params)[0]
            for k, n in enumerate(idx):
                out[b, n] = delta[k]
    return out
