"""FLOP counts of one real forward (and backward) pass: counted by torch, and analytic.

Two independent counts of the same call, which cross-check each other:

- **counted** (`counted_flops`): ``torch.utils.flop_counter.FlopCounterMode`` around the call.
  It sees every matmul the kernels run (mm, addmm, bmm, baddbmm, einsum, convolution, fused
  attention), forward and backward; elementwise ops, norms, softmaxes and gathers count 0.
- **analytic** (`measure_flops`): forward hooks read, per module, the shapes and token counts it
  really saw and apply the formulas below. It counts the work the model needs: the experts on the
  tokens they received, attention without recomputation.

Convention (as FlopCounterMode): a multiply-add is 2 FLOPs, so a GEMM [m, k] x [k, n] is 2mkn.
Backward, per GEMM y = x W: the input-gradient GEMM (same cost) when x requires grad, the
weight-gradient GEMM (same cost) when W does. A trainable linear inside the network costs 3x its
forward in training, a frozen one whose input needs grad 2x, a trainable first layer 2x and a
frozen first layer 1x (forward only).

Where the counts differ, counted > analytic, by design:
- Sparse MoE experts (`vlmoe.moe.experts`) run over capacity buffers [E, C_buf, d]: on CPU in
  tiles of whole experts up to each tile's last filled row (one tile of all C_buf rows when the
  experts fit the tile, as for small models, and always on accelerators). Analytic counts the
  rows that hold a kept token (``rows_used``), so experts' counted / analytic = computed rows /
  kept tokens: about capacity_factor x the buffer rounding (C_buf = C, at least min_capacity,
  rounded up to 4) / the fraction kept, e.g. 16 / 6 for 6 tokens in 4 buffers of 4 rows.
- Fused attention kernels (flash / memory-efficient: what scaled_dot_product_attention runs on
  CPU without dropout and on GPUs) recompute Q K^T in the backward: 5 GEMMs where the analytic
  count has the 4 the gradients need (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q). The
  attention matmuls then cost 3.5x their forward in training against 3x analytic. (The math
  path, used with dropout on CPU, saves P and matches the analytic count.)
- Activation checkpointing re-runs forwards inside the backward: counted, not analytic.
- Matmuls outside the modules counted here (`COUNTED_TYPES`: e.g. the retrieval task's
  similarity matrices, B x B x D, or a Hugging Face backbone's attention) are counted only.

The soft mixtures of low-rank experts (`smola`) are counted exactly as implemented, forward and
backward (their routing is a custom autograd Function), so counted == analytic there.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from smola.block import SMoLALinear, as_tokens, tokens_and_masks
from smola.lora import LoRALinear
from smola.omni import OmniSMoLALinear, branch_masks
from vlmoe.model.heads import MLMHead
from vlmoe.model.multiway import SelfAttention
from vlmoe.moe.expert_layer import token_groups
from vlmoe.moe.experts import Experts
from vlmoe.moe.layer import MoE
from vlmoe.moe.soft import SoftMoE

CATEGORIES = ("embeddings", "dense", "attention", "routers", "experts", "smola_routing", "smola_experts", "lora",
              "heads")
"""Analytic breakdown: patch embedding convolutions; the backbone's linears (frozen bases of adapters
included); attention score (Q K^T) and value (P V) matmuls; MoE routers; MoE experts on their kept
tokens; SMoLA token-expert logits, dispatch and combine GEMMs; SMoLA low-rank experts; LoRA's A and
B; task or pretraining heads (every child of a model other than its ``backbone``)."""


# ------------------------------------------------------------------------------------ counted


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                       out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _inplace_baddbmm_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# Kernels FlopCounterMode has no formula for. The CPU fused attention, which
# scaled_dot_product_attention picks on CPU without dropout, counted as torch counts the CUDA ones
# (2 GEMMs forward; 5 backward, Q K^T recomputed from the saved log-sum-exp, as that kernel does).
# The in-place baddbmm_ (smola's combine under no_grad), as its out-of-place twin.
EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
    torch.ops.aten.baddbmm_: _inplace_baddbmm_flop,
}


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of every matmul-like kernel ``fn()`` runs (forward and any backward it calls), by
    FlopCounterMode (with `EXTRA_FORMULAS`); a multiply-add counts 2."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def kernel_flops(name: str, input_shapes: Sequence[Sequence[int]]) -> int:
    """FLOPs of one call of kernel `name` ("aten::mm") from its input shapes as torch.profiler records
    them (a scalar argument as []), by the formulas `counted_flops` uses; 0 for a kernel without one."""
    kernel = getattr(torch.ops.aten, name[len("aten::"):], None) if name.startswith("aten::") else None
    formula = EXTRA_FORMULAS.get(kernel) or flop_registry.get(kernel)
    if formula is None:
        return 0
    return int(formula(*[torch.Size(shape) for shape in input_shapes if shape]))


# ------------------------------------------------------------------------------------ formulas


@dataclass(frozen=True)
class Flops:
    """FLOPs of one module call: its forward, and the backward a backward pass through it runs."""

    forward: int
    backward: int = 0

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.backward + other.backward)


def linear_flops(tokens: int, d_in: int, d_out: int, input_grad: bool, weight_grad: bool) -> Flops:
    """y [tokens, d_out] = x [tokens, d_in] W [d_in, d_out] (+ bias, 0): 2 tokens d_in d_out forward;
    the same again per gradient (of x, of W) needed."""
    flops = 2 * tokens * d_in * d_out
    return Flops(flops, flops * (int(input_grad) + int(weight_grad)))


def conv2d_flops(batch: int, out_positions: int, in_channels: int, kernel: tuple[int, int], out_channels: int,
                 input_grad: bool, weight_grad: bool) -> Flops:
    """A convolution as a GEMM [batch * out_positions, in_channels * kh * kw] x [.., out_channels]
    (``in_channels`` per group for a grouped one)."""
    return linear_flops(batch * out_positions, in_channels * kernel[0] * kernel[1], out_channels, input_grad,
                        weight_grad)


def attention_flops(batch: int, heads: int, length: int, head_dim: int, needs_grad: bool) -> Flops:
    """Scores Q K^T and output P V of self-attention over ``length`` tokens (padding included: the
    kernels compute every [length, length] score); backward: the 4 GEMMs of dQ, dK, dV and dP."""
    one = 2 * batch * heads * length * length * head_dim
    return Flops(2 * one, 4 * one if needs_grad else 0)


def experts_flops(rows: int, d_model: int, d_ff: int, input_grad: bool, w_in_grad: bool, w_out_grad: bool) -> Flops:
    """FFN experts (fc1 d_model -> d_ff, GELU, fc2 d_ff -> d_model) on ``rows`` token rows in all.

    Backward as `vlmoe.moe.experts._ExpertFFN` runs it: fc2's input gradient always (it feeds
    fc1's gradients), each weight gradient when that weight trains, fc1's input gradient when the
    buffers need grad.
    """
    one = 2 * rows * d_model * d_ff
    if not (input_grad or w_in_grad or w_out_grad):
        return Flops(2 * one)
    return Flops(2 * one, one * (1 + int(w_out_grad) + int(w_in_grad) + int(input_grad)))


def soft_mixture_flops(batch: int, tokens: int, d_in: int, d_out: int, columns: int, rank: int, x_grad: bool,
                       routing_grad: bool, w_in_grad: bool, w_out_grad: bool) -> dict[str, Flops]:
    """`smola.soft_mixture.add_soft_mixture` on x [batch, tokens, d_in] with ``columns`` = G * E
    experts of rank ``rank`` -> {"smola_routing", "smola_experts"}.

    Routing (per example): logits x phi_n^T [N, d_in] x [d_in, GE]; slots = D^T x [GE, N] x [N, d_in];
    combine C y [N, GE] x [GE, d_out]. Experts: [GE] x (slot [d_in] -> [r] -> [d_out]). Masked
    tokens are in every GEMM (their weights are zero). Backward as `SoftRouting.backward` runs it:
    d_dispatch = x d_slots^T and d_phi_n = scaled^T x always, d_x = [D | scaled] [d_slots; phi_n]
    ([N, 2GE] x [2GE, d_in]) when x needs grad. ``routing_grad``: x, phi or alpha needs grad (so
    dispatch and combine do).
    """
    logits = 2 * batch * tokens * d_in * columns
    slots = 2 * batch * columns * tokens * d_in
    combine = 2 * batch * tokens * columns * d_out
    low = 2 * batch * columns * d_in * rank
    high = 2 * batch * columns * rank * d_out
    out_grad = routing_grad or w_in_grad or w_out_grad  # the experts' output needs grad
    low_grad = routing_grad or w_in_grad
    routing_backward = 0
    if routing_grad:
        routing_backward = combine + slots + logits + (2 * slots if x_grad else 0)  # d_combine, d_dispatch, d_phi, d_x
    routing_backward += combine if out_grad else 0  # d_expert_out
    experts_backward = (high * (int(low_grad) + int(w_out_grad))  # d_low, d_w_out
                        + low * (int(routing_grad) + int(w_in_grad)))  # d_slots, d_w_in
    return {"smola_routing": Flops(logits + slots + combine, routing_backward),
            "smola_experts": Flops(low + high, experts_backward)}


def soft_moe_routing_flops(batch: int, tokens: int, dim: int, slots: int, x_grad: bool, phi_grad: bool,
                           scale_grad: bool, experts_grad: bool) -> Flops:
    """`vlmoe.moe.soft.SoftMoE`'s three thin GEMMs per example (padding included): logits
    norm(x) norm(phi) [n, D] x [D, S]; slots D^T x [S, n] x [n, D]; output C y [n, S] x [S, D].
    Backward by autograd: each GEMM's gradient of each operand that needs one (dispatch and
    combine need one when x, phi or scale does; the expert outputs when anything before them does)."""
    one = 2 * batch * tokens * dim * slots
    routing_grad = x_grad or phi_grad or scale_grad
    backward = one * (int(x_grad or scale_grad) + int(phi_grad)  # logits
                      + int(routing_grad) + int(x_grad)  # slots: d_dispatch, d_x
                      + int(routing_grad) + int(routing_grad or experts_grad))  # output: d_combine, d_expert_out
    return Flops(3 * one, backward)


def lora_flops(tokens: int, d_in: int, d_out: int, rank: int, input_grad: bool, a_grad: bool, b_grad: bool) -> Flops:
    """LoRA's x A^T (d_in -> r) then (.) B^T (r -> d_out) on ``tokens`` rows (the frozen base apart)."""
    return (linear_flops(tokens, d_in, rank, input_grad, a_grad)
            + linear_flops(tokens, rank, d_out, input_grad or a_grad, b_grad))


# ------------------------------------------------------------------------------------ analytic


@dataclass(frozen=True)
class AnalyticFlops:
    """Analytic FLOPs of one call by category (`CATEGORIES`): ``forward``, and ``backward``, what a
    backward pass through that forward runs (0 under no_grad)."""

    forward: dict[str, int]
    backward: dict[str, int]

    @property
    def forward_total(self) -> int:
        return sum(self.forward.values())

    @property
    def training(self) -> dict[str, int]:
        """Forward + backward per category."""
        return {c: self.forward[c] + self.backward[c] for c in CATEGORIES}

    @property
    def training_total(self) -> int:
        return self.forward_total + sum(self.backward.values())


def _needs_grad(tensor: Optional[torch.Tensor]) -> bool:
    return tensor is not None and torch.is_grad_enabled() and tensor.requires_grad


def _any_needs_grad(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _linear(module: nn.Linear, x: torch.Tensor) -> Flops:
    return linear_flops(x.numel() // module.in_features, module.in_features, module.out_features, _needs_grad(x),
                        _needs_grad(module.weight))


def _mlm_head(module: MLMHead, x: torch.Tensor) -> Flops:
    d_out, d_in = module.weight.shape
    return linear_flops(x.numel() // d_in, d_in, d_out, _needs_grad(x), _needs_grad(module.weight))


def _conv2d(module: nn.Conv2d, x: torch.Tensor, output: torch.Tensor) -> Flops:
    return conv2d_flops(output.shape[0], output.shape[-2] * output.shape[-1], module.in_channels // module.groups,
                        module.kernel_size, module.out_channels, _needs_grad(x), _needs_grad(module.weight))


def _attention(module: SelfAttention, x: torch.Tensor) -> Flops:
    batch, length, dim = x.shape
    # Q, K and V need grad when x does or any of their projections (or adapters) trains.
    projections = (module.q_proj, module.k_proj, module.v_proj)
    needs_grad = _needs_grad(x) or any(_any_needs_grad(p) for p in projections)
    return attention_flops(batch, module.heads, length, dim // module.heads, needs_grad)


def _token_groups(args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(x, token_mask) of each group of an MoE layer's call (one, or the lists of a grouped call)."""
    return list(zip(*token_groups(args[0], _argument(args, kwargs, 1, "token_mask"))))


def _router(module: MoE, args: tuple, kwargs: dict) -> Flops:
    # The router's forward is F.linear on its weight (in fp32), not an nn.Linear: counted here.
    total = Flops(0)
    for x, token_mask in _token_groups(args, kwargs):
        tokens = int(token_mask.sum()) if token_mask is not None else x.numel() // module.d_model
        total = total + linear_flops(tokens, module.d_model, module.num_experts, _needs_grad(x),
                                     _needs_grad(module.router.weight))
    return total


def _soft_router(module: SoftMoE, args: tuple, kwargs: dict) -> Flops:
    router, total = module.router, Flops(0)
    for x, _ in _token_groups(args, kwargs):
        batch, tokens, dim = x.shape
        total = total + soft_moe_routing_flops(batch, tokens, dim, router.phi.shape[1], _needs_grad(x),
                                               _needs_grad(router.phi), _needs_grad(router.scale),
                                               _any_needs_grad(module.experts))
    return total


def _experts(module: Experts, args: tuple, kwargs: dict) -> Flops:
    buffers, rows_used = args[0], _argument(args, kwargs, 1, "rows_used")
    # rows_used [E]: the kept tokens per expert; without it (expert parallelism) every row is computed.
    rows = int(rows_used.sum()) if rows_used is not None else buffers.shape[0] * buffers.shape[1]
    return experts_flops(rows, module.d_model, module.d_ff, _needs_grad(buffers), _needs_grad(module.w_in),
                         _needs_grad(module.w_out))


def _omni_branches(module: OmniSMoLALinear, args: tuple, kwargs: dict) -> list[nn.Module]:
    """The branches an OmniSMoLALinear call ran: those with a token (same masks and rule as its forward)."""
    x = args[0]
    _, valid, visual, _ = tokens_and_masks(module, x, _argument(args, kwargs, 1, "token_mask"),
                                           _argument(args, kwargs, 2, "visual_mask"))
    masks = {"mm": valid} if visual is None else branch_masks(valid, visual)
    return [getattr(module, n) for n in module.branches
            if n in masks and (masks[n] is None or bool(masks[n].any()))]


def _soft_mixture(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Flops]:
    x = args[0]
    blocks = _omni_branches(module, args, kwargs) if isinstance(module, OmniSMoLALinear) else [module]
    if not blocks:
        return {}
    batch, tokens, _ = as_tokens(x).shape
    block = blocks[0]
    routing_grad = _needs_grad(x) or any(_needs_grad(b.phi) or _needs_grad(b.alpha) for b in blocks)
    return soft_mixture_flops(batch, tokens, module.in_features, module.out_features,
                              block.num_experts * len(blocks), block.rank, _needs_grad(x), routing_grad,
                              any(_needs_grad(b.w_in) for b in blocks), any(_needs_grad(b.w_out) for b in blocks))


def _lora(module: LoRALinear, x: torch.Tensor) -> Flops:
    return lora_flops(x.numel() // module.in_features, module.in_features, module.out_features, module.rank,
                      _needs_grad(x), _needs_grad(module.lora_a), _needs_grad(module.lora_b))


def _head_modules(model: nn.Module) -> set[int]:
    """ids of the modules of every child other than ``backbone`` (none for a model without one)."""
    children = dict(model.named_children())
    if "backbone" not in children:
        return set()
    return {id(m) for name, child in children.items() if name != "backbone" for m in child.modules()}


def _module_flops(module: nn.Module, heads: set[int], args: tuple, kwargs: dict,
                  output: Any) -> dict[str, Flops]:
    """The analytic FLOPs of one call of ``module`` by category ({} for modules counted elsewhere)."""
    if isinstance(module, nn.Linear):
        return {"heads" if id(module) in heads else "dense": _linear(module, args[0])}
    if isinstance(module, MLMHead):
        return {"heads": _mlm_head(module, args[0])}
    if isinstance(module, nn.Conv2d):
        return {"embeddings": _conv2d(module, args[0], output)}
    if isinstance(module, SelfAttention):
        return {"attention": _attention(module, args[0])}
    if isinstance(module, MoE):
        return {"routers": _router(module, args, kwargs)}
    if isinstance(module, SoftMoE):
        return {"routers": _soft_router(module, args, kwargs)}
    if isinstance(module, Experts):
        return {"experts": _experts(module, args, kwargs)}
    if isinstance(module, (SMoLALinear, OmniSMoLALinear)):
        return _soft_mixture(module, args, kwargs)
    if isinstance(module, LoRALinear):
        return {"lora": _lora(module, args[0])}
    return {}


COUNTED_TYPES = (nn.Linear, MLMHead, nn.Conv2d, SelfAttention, MoE, SoftMoE, Experts, SMoLALinear, OmniSMoLALinear, LoRALinear)


@contextmanager
def _analytic_hooks(model: nn.Module, forward: dict[str, int], backward: dict[str, int]) -> Iterator[None]:
    """Forward hooks on every counted module of ``model`` adding to ``forward`` / ``backward``."""
    heads = _head_modules(model)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # an activation-checkpoint re-run inside the backward: implementation cost, not counted
        for category, flops in _module_flops(module, heads, args, kwargs, output).items():
            forward[category] += flops.forward
            backward[category] += flops.backward

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, COUNTED_TYPES)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure_flops(model: nn.Module, fn: Callable[[], Any]) -> tuple[int, AnalyticFlops]:
    """Run ``fn()`` (a forward of ``model``, and maybe a backward) once; returns (counted FLOPs of
    everything it ran, analytic FLOPs of the module calls in it: forward, and the backward their
    forward implies). One run for both, so both see the same routing."""
    forward = dict.fromkeys(CATEGORIES, 0)
    backward = dict.fromkeys(CATEGORIES, 0)
    with _analytic_hooks(model, forward, backward):
        counted = counted_flops(fn)
    return counted, AnalyticFlops(forward, backward)
