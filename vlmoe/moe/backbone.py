"""MoE in the multiway backbone: where the layers go (sparse or soft), and collecting their aux losses and metrics."""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from vlmoe.moe.config import MoEConfig
from vlmoe.moe.layer import MoE
from vlmoe.moe.parallel import expert_parallel_group
from vlmoe.moe.soft import SoftMoE
from vlmoe.nn.feed_forward import FeedForward

FfnFactory = Callable[[int, str], nn.Module]
MoELayer = Union[MoE, SoftMoE]
# Both kinds hold their expert pool as `.experts` (an `Experts`) and have num_experts, ep_size,
# ep_group, pop_aux_loss and pop_metrics: the DeepSpeed bridge, expert checkpoints and the
# trainer treat them alike.
MOE_LAYER_TYPES = (MoE, SoftMoE)


def is_moe_block(block_index: int, modality: str, below: int, every: int) -> bool:
    """Whether the `modality` FFN of block `block_index` is sparse: every `every`-th V-FFN and
    T-FFN of the blocks < `below`, i.e. blocks every-1, 2*every-1, ... (GShard placement)."""
    return modality in ("v", "t") and block_index < below and block_index % every == every - 1


def moe_ffn_factory(model_cfg: Any, moe_cfg: MoEConfig, dense_factory: Optional[FfnFactory] = None,
                    ep_group: Optional[object] = None) -> FfnFactory:
    """An ffn_factory(block_index, modality) for the multiway backbone with MoE FFNs: sparse `MoE`,
    or `SoftMoE` where moe_cfg.type is "soft" (same placement).

    model_cfg needs dim, ffn_dim, vl_ffn_start, depth (and optionally init_std); dense FFNs come from
    `dense_factory` (default: the backbone's FeedForward). Vision and text get separate expert
    pools and routers. With moe_cfg.ep_size > 1, `ep_group` (default: DeepSpeed's group for that
    size, see `parallel.expert_parallel_group`) shards the experts. Layers are named
    "moe/L{block}/{modality}" in metrics.
    """
    for name in ("dim", "ffn_dim", "vl_ffn_start", "depth"):
        if not hasattr(model_cfg, name):
            raise ValueError(f"moe_ffn_factory: model config {type(model_cfg).__name__} has no field {name!r}")
    init_std = getattr(model_cfg, "init_std", 0.02)
    if dense_factory is None:
        def dense_factory(index: int, modality: str) -> nn.Module:
            return FeedForward(model_cfg.dim, model_cfg.ffn_dim, getattr(model_cfg, "dropout", 0.0), init_std)
    if moe_cfg.ep_size > 1 and ep_group is None:
        ep_group = expert_parallel_group(moe_cfg.ep_size)
    if ep_group is not None and torch.distributed.get_world_size(ep_group) != moe_cfg.ep_size:
        raise ValueError(f"moe_ffn_factory: ep_group has {torch.distributed.get_world_size(ep_group)} ranks, "
                         f"moe_cfg.ep_size={moe_cfg.ep_size}")

    below = model_cfg.vl_ffn_start if moe_cfg.placement == "lower" else model_cfg.depth

    def factory(block_index: int, modality: str) -> nn.Module:
        if not is_moe_block(block_index, modality, below, moe_cfg.every):
            return dense_factory(block_index, modality)
        prefix = f"moe/L{block_index}/{modality}"
        if moe_cfg.type == "soft":
            layer = SoftMoE(model_cfg.dim, model_cfg.ffn_dim, moe_cfg, ep_group=ep_group, init_std=init_std,
                            metric_prefix=prefix)
        else:
            layer = MoE(model_cfg.dim, model_cfg.ffn_dim, moe_cfg, modality, ep_group=ep_group, init_std=init_std,
                        metric_prefix=prefix)
        return _frozen(layer, moe_cfg.freeze)

    return factory


def _frozen(layer: nn.Module, freeze: bool) -> nn.Module:
    if freeze:
        layer.requires_grad_(False)
    return layer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model` (sparse and soft), in module order."""
    return [m for m in model.modules() if isinstance(m, MOE_LAYER_TYPES)]


def named_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(module name, layer) of every MoE layer of `model` (sparse and soft), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MOE_LAYER_TYPES)]


def collect_aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum over MoE layers of each layer's weighted aux loss since the last call (mean over its
    forward calls); None where none was measured (evaluation, no balancing loss configured).
    Call once per micro-batch, after forward, and add to the loss."""
    total: Optional[torch.Tensor] = None
    for layer in moe_layers(model):
        loss = layer.pop_aux_loss()
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """Flat routing metrics of every MoE layer since the last call in the model's current mode
    (training or evaluation: "moe/L1/v/dropped", ...); resets."""
    metrics: dict[str, float] = {}
    for layer in moe_layers(model):
        metrics.update(layer.pop_metrics())
    return metrics


def freeze_moe(model: nn.Module) -> int:
    """Freeze routers and experts of every MoE layer (fine-tuning, following ST-MoE); returns the
    number of parameters frozen."""
    frozen = 0
    for layer in moe_layers(model):
        for param in layer.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen
