"""E feed-forward experts (fc1 -> GELU -> fc2, the FFN's shape) applied with batched matmuls."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.moe.grad_buffers import GradientBuffers

# On CPU the experts run in tiles of whole experts whose hidden activations fit in about this many
# bytes, so GELU and the second matmul read the first matmul's output from cache, and every
# temporary comes from reusable heap memory (large fresh buffers cost page faults on every
# step). The tile count follows the token volume, not the number of experts. Accelerators run
# all experts as one tile.
CPU_TILE_BYTES = 8 << 20


def experts_per_tile(buffers: torch.Tensor, d_ff: int) -> int:
    """How many experts of buffers [E, C, d] one tile holds."""
    num_experts, capacity = buffers.shape[:2]
    if buffers.device.type != "cpu":
        return max(num_experts, 1)
    per_expert = max(capacity * d_ff * buffers.element_size(), 1)
    return max(1, min(num_experts, CPU_TILE_BYTES // per_expert))


def tile_rows(rows_used: Optional[torch.Tensor], capacity: int, num_experts: int, tile: int) -> list[int]:
    """Rows each tile computes: the most any of its experts uses (rows fill in order), else all C.

    With one tile (accelerators) all C rows run: reading the counts would cost a device sync.
    """
    if rows_used is None or tile >= num_experts:
        return [capacity] * -(-num_experts // tile)
    used = rows_used.tolist()
    return [max(used[start:start + tile]) for start in range(0, num_experts, tile)]


class _ExpertFFN(torch.autograd.Function):
    """out = GELU(x @ w_in + b_in) @ w_out + b_out per expert, tile by tile.

    Each tile computes only its first `rows` rows; the rows after them are empty in every expert
    of the tile, so their output is set to zero and they add nothing to any gradient. Saves
    only the pre-activation (GELU is recomputed in backward, one tile at a time), which halves
    the activation memory of the experts, and skips the weight gradients of frozen experts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor,
                b_out: torch.Tensor, tile: int, rows: list[int], grad_buffers: GradientBuffers) -> torch.Tensor:
        out = x.new_empty(x.shape[0], x.shape[1], w_out.shape[2])
        pre_activations = []
        for index, start in enumerate(range(0, x.shape[0], tile)):
            t, used = slice(start, start + tile), rows[index]
            pre = torch.baddbmm(b_in[t], x[t, :used], w_in[t])
            pre_activations.append(pre)
            torch.baddbmm(b_out[t], F.gelu(pre), w_out[t], out=out[t, :used])
            out[t, used:] = 0
        ctx.tile, ctx.rows, ctx.grad_buffers = tile, rows, grad_buffers
        ctx.save_for_backward(x, w_in, w_out, *pre_activations)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w_in, w_out, *pre_activations = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_in = ctx.grad_buffers.take("w_in", w_in) if need_w_in else None
        grad_w_out = ctx.grad_buffers.take("w_out", w_out) if need_w_out else None
        grad_b_in = x.new_empty(x.shape[0], 1, w_in.shape[2]) if need_b_in else None
        grad_b_out = x.new_empty(x.shape[0], 1, w_out.shape[2]) if need_b_out else None
        for index, start in enumerate(range(0, x.shape[0], ctx.tile)):
            t, used = slice(start, start + ctx.tile), ctx.rows[index]
            pre, grad_tile = pre_activations[index], grad[t, :used]
            if need_w_out:
                torch.bmm(F.gelu(pre).transpose(1, 2), grad_tile, out=grad_w_out[t])
            if need_b_out:
                torch.sum(grad_tile, dim=1, keepdim=True, out=grad_b_out[t])
            grad_pre = torch.ops.aten.gelu_backward(torch.bmm(grad_tile, w_out[t].transpose(1, 2)), pre)
            if need_b_in:
                torch.sum(grad_pre, dim=1, keepdim=True, out=grad_b_in[t])
            if need_w_in:
                torch.bmm(x[t, :used].transpose(1, 2), grad_pre, out=grad_w_in[t])
            if need_x:
                torch.bmm(grad_pre, w_in[t].transpose(1, 2), out=grad_x[t, :used])
                grad_x[t, used:] = 0
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


class Experts(nn.Module):
    """`num_local` experts of width d_model -> d_ff -> d_model, stored stacked.

    Holds experts first_expert .. first_expert + num_local - 1 of a pool; each expert's initial
    weights depend only on (seed, its global index), so a sharded pool (expert parallelism)
    starts from the same weights as an unsharded one.
    """

    def __init__(self, d_model: int, d_ff: int, num_local: int, first_expert: int = 0,
                 init_std: float = 0.02, seed: Optional[int] = None) -> None:
        super().__init__()
        self.d_model, self.d_ff, self.num_local, self.first_expert = d_model, d_ff, num_local, first_expert
        self.w_in = nn.Parameter(torch.empty(num_local, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_local, 1, d_ff))
        self.w_out = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        self.b_out = nn.Parameter(torch.zeros(num_local, 1, d_model))
        self.grad_buffers = GradientBuffers()
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())
        self._init(init_std, seed)

    @torch.no_grad()
    def _init(self, std: float, seed: int) -> None:
        if self.w_in.is_meta:  # shape-only model (parameter counting)
            return
        for local in range(self.num_local):
            generator = torch.Generator().manual_seed(seed + self.first_expert + local)
            for weight in (self.w_in, self.w_out):
                values = torch.empty(weight.shape[1:])
                nn.init.trunc_normal_(values, std=std, a=-2 * std, b=2 * std, generator=generator)
                weight[local].copy_(values)

    def forward(self, buffers: torch.Tensor, rows_used: Optional[torch.Tensor] = None) -> torch.Tensor:
        """buffers [num_local, C, d_model] -> [num_local, C, d_model].

        rows_used: [num_local] how many leading rows of each buffer hold tokens (None = all). The
        output of the empty rows after them is unspecified (zero, or the FFN of a zero row): the
        combine never reads it, and it adds nothing to any gradient.
        """
        tile = experts_per_tile(buffers, self.d_ff)
        rows = tile_rows(rows_used, buffers.shape[1], buffers.shape[0], tile)
        # Autocast does not reach inside a custom autograd function: cast here (differentiably, a
        # no-op without autocast) so that the expert GEMMs run in the autocast dtype, as nn.Linear's.
        device = buffers.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else buffers.dtype
        weights = [p.to(dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out)]
        with torch.autocast(device, enabled=False):
            return _ExpertFFN.apply(buffers.to(dtype), *weights, tile, rows, self.grad_buffers)

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        """Scale the output projections (BEiT depth-dependent init)."""
        self.w_out.mul_(factor)
