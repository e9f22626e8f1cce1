"""Omni-SMoLA: soft mixtures of low-rank experts around frozen linears (torch only).

    import smola
    model = smola.inject(model, smola.SMoLAConfig(num_experts=48, rank=4, mode="omni"))
    print(smola.trainable_parameters(model))
    smola.save_adapter(model, "out/adapter")   # a lone LoRA in PEFT's format, others in SMoLA's own
    smola.load_adapter(fresh_base_model, "out/adapter")

Token masks (padding, visual vs text) come from ``smola.token_masks`` blocks declared by
the backbone, or from ``smola.modality_hooks`` for other models.
"""
from smola.adapter_io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from smola.block import SMoLALinear, SoftLowRankExperts
from smola.config import FullConfig, LoRAConfig, SMoLAConfig, config_from_dict, config_to_dict
from smola.context import TokenMasks, current_token_masks, token_masks
from smola.hooks import masks_from_inputs, modality_hooks
from smola.inject import adapter_parameters, adapter_stack, inject, merge_adapter, trainable_parameters
from smola.lora import LoRALinear
from smola.omni import OmniSMoLALinear
from smola.soft_mixture import add_soft_mixture, routing_weights

__all__ = [
    "SMoLALinear", "SoftLowRankExperts", "OmniSMoLALinear", "LoRALinear",
    "SMoLAConfig", "LoRAConfig", "FullConfig", "config_from_dict", "config_to_dict",
    "inject", "merge_adapter", "trainable_parameters", "adapter_parameters", "adapter_stack",
    "save_adapter", "load_adapter", "adapter_state_dict", "read_adapter_config",
    "token_masks", "current_token_masks", "TokenMasks", "modality_hooks", "masks_from_inputs",
    "add_soft_mixture", "routing_weights",
]
