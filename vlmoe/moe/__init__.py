"""Our sparse MoE layer (top-k routing with capacity and BPR, aux losses, index dispatch, expert parallelism)
and a Soft MoE layer (`SoftMoE`, Puigcerver et al. 2023) on the same experts and expert parallelism.

DeepSpeed wiring lives in `vlmoe.moe.deepspeed_bridge` (prepare_for_deepspeed, moe_param_groups)
and EP-size-independent expert checkpoints in `vlmoe.moe.expert_checkpoint`.
"""
from vlmoe.moe import losses
from vlmoe.moe.backbone import collect_aux_loss, collect_metrics, freeze_moe, is_moe_block, moe_ffn_factory, moe_layers
from vlmoe.moe.config import MoEConfig
from vlmoe.moe.expert_checkpoint import load_experts, save_experts
from vlmoe.moe.layer import MoE
from vlmoe.moe.params import parameter_report
from vlmoe.moe.router import Routing, RouterOutput, TopKRouter, expert_capacity, route
from vlmoe.moe.soft import SoftMoE
from vlmoe.moe.soft_router import SoftRouter, SoftWeights, soft_logits, soft_weights

__all__ = ["MoE", "MoEConfig", "RouterOutput", "Routing", "SoftMoE", "SoftRouter", "SoftWeights", "TopKRouter",
           "collect_aux_loss", "collect_metrics",
           "expert_capacity", "freeze_moe", "is_moe_block", "load_experts", "losses", "moe_ffn_factory", "moe_layers",
           "parameter_report", "route", "save_experts", "soft_logits", "soft_weights"]
