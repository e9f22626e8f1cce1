"""Parameter accounting of a sparse model: total, applied per token, routers."""
from __future__ import annotations

from torch import nn

from vlmoe.moe.backbone import moe_layers
from vlmoe.moe.soft import SoftMoE


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts of `model` (on this rank; experts held by other EP ranks are added).

    total: all parameters of the full model (every expert of every pool).
    applied_per_token: total minus, per MoE layer, the experts a token does not use (E - k).
    routers: router weights. experts: all expert parameters. trainable: with requires_grad.
    For a multiway backbone `applied_per_token` still counts both modality FFN stacks: it is the
    parameters applied to an image-text token pair (LIMoE's count, used by VL-MoE Table 1), i.e.
    the dense model's size plus the routers. BASE/32E: 201M with BEiT-3's 64k text vocabulary;
    with VLMO's 30522-token vocabulary 176M, the paper's "180M per token".
    A Soft MoE layer applies all its experts to every token (each output mixes every slot's), so
    all its experts count as applied; its routers are phi and the scale.
    """
    report = {"total": 0, "applied_per_token": 0, "routers": 0, "experts": 0, "trainable": 0}
    expert_param_ids = set()
    for layer in moe_layers(model):
        experts = layer.experts
        local = sum(p.numel() for p in experts.parameters())
        per_expert = local // experts.num_local
        full_pool = per_expert * layer.num_experts
        report["experts"] += full_pool
        soft = isinstance(layer, SoftMoE)
        report["routers"] += sum(p.numel() for p in layer.router.parameters())
        report["total"] += full_pool
        report["applied_per_token"] += per_expert * (layer.num_experts if soft else layer.k)
        report["trainable"] += full_pool if experts.w_in.requires_grad else 0
        expert_param_ids.update(id(p) for p in experts.parameters())
    for param in model.parameters():
        if id(param) in expert_param_ids:
            continue
        report["total"] += param.numel()
        report["applied_per_token"] += param.numel()
        report["trainable"] += param.numel() if param.requires_grad else 0
    return report
