"""Make the DeepSpeed engine treat our MoE layers as MoE: expert gradients reduced only within the
expert-data-parallel group (ZeRO-0/1/2), or the layer kept whole under ZeRO-3.

DeepSpeed switches on its MoE handling (expert-data-parallel reduction, per-group ZeRO
partitions) only for instances of its own `deepspeed.moe.layer.MoE`, which it refuses under
ZeRO-3. So for ZeRO <= 2 `prepare_for_deepspeed` turns each `Experts` into a
`DeepSpeedExperts` (the same module and weights, also a DeepSpeed MoE) and tags expert
parameters as DeepSpeed does (`allreduce=False`, `group_name="ep_size_P"`); under ZeRO-3 nothing
is tagged and each MoE layer (sparse or soft) becomes a ZeRO-3 leaf (all its weights gathered at once, so ranks
routing to different experts still make the same collective calls).

Expert weights stay out of DeepSpeed's model file (its MoE filter drops keys under a DeepSpeed
MoE module that contain "expert") and DeepSpeed writes no per-expert files
(`num_local_experts = 0`): save and load them with `vlmoe.moe.expert_checkpoint`, which does
not depend on the EP size. Load DeepSpeed checkpoints with `load_module_strict=False`, then
`load_experts` (which fails on anything missing).
"""
from __future__ import annotations

from typing import Any, Iterable, Union

from torch import nn

from vlmoe.moe.backbone import MOE_LAYER_TYPES, moe_layers
from vlmoe.moe.experts import Experts
from vlmoe.moe.parallel import expert_group_name

try:
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError as exc:  # deepspeed is a hard dependency of the package; say so plainly
    raise ImportError("vlmoe.moe.deepspeed_bridge needs deepspeed installed") from exc


class DeepSpeedExperts(Experts, _DeepSpeedMoE):
    """`Experts` that DeepSpeed's engine recognises as an MoE layer (made by `prepare_for_deepspeed`)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: make sure DeepSpeed's expert (data) parallel groups exist."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    forward = Experts.forward


def prepare_for_deepspeed(model: nn.Module, zero_stage: int) -> int:
    """Prepare every MoE layer of `model` for `deepspeed.initialize` at this ZeRO stage; returns
    the number of MoE layers. Call before building optimizer parameter groups."""
    layers = moe_layers(model)  # sparse and soft: both hold their expert pool as `.experts`
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if zero_stage == 3:
        expert_parallel = sorted({layer.ep_size for layer in layers if layer.ep_size > 1})
        if expert_parallel:
            raise ValueError(f"expert parallelism (ep_size={expert_parallel[0]}) is not supported under ZeRO-3 "
                             "(ZeRO-3 partitions every weight over all ranks); use ep_size=1")
        if layers:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, list(MOE_LAYER_TYPES))
        return len(layers)
    for layer in layers:
        experts = layer.experts
        if not isinstance(experts, DeepSpeedExperts):
            experts.__class__ = DeepSpeedExperts
        experts.ep_size = layer.ep_size
        experts.num_experts = layer.num_experts
        experts.expert_group_name = expert_group_name(layer.ep_size)
        experts.num_local_experts = 0  # DeepSpeed writes no per-expert files; see expert_checkpoint
        experts.use_residual = False
        experts.enable_expert_tensor_parallelism = False
        for param in experts.parameters():
            param.allreduce = False
            param.group_name = experts.expert_group_name
    return len(layers)


def moe_param_groups(params: Union[Iterable[nn.Parameter], list[dict[str, Any]]],
                     name: str = "params") -> list[dict[str, Any]]:
    """Optimizer parameter groups with expert parameters in their own groups (marked "moe"), as
    DeepSpeed's ZeRO-1/2 needs; pass the result as `model_parameters` to `deepspeed.initialize`.

    params: parameters, or groups (dicts with "params"; a missing "name" gets one)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{**group, "name": group.get("name", f"{name}_{i}"), "params": list(group["params"])}
                  for i, group in enumerate(items)]
    else:
        groups = [{"name": name, "params": [p for p in items if p.requires_grad]}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def load_experts_into_engine(engine: Any, path: str) -> None:
    """Load EP-independent expert weights (`expert_checkpoint.save_experts`) into a DeepSpeed
    engine's model after `engine.load_checkpoint(..., load_module_strict=False)`, and refresh
    ZeRO's fp32 master copy so that the next step starts from them."""
    from vlmoe.moe.expert_checkpoint import load_experts

    load_experts(engine.module, path)
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
