"""The fine-tuning method: what of a task model trains (SMoLA, LoRA or full), the same path for all.

The base is frozen and the method's trainable tensors are added to ``model.backbone``
(``smola.inject``); the task head always trains. A LoRA specialist first loads a SMoLA
generalist's adapter (Omni-SMoLA 4.3.4). On a sparse base, routers and experts stay frozen under
every method, and adapters are not put on routers (an adapter there would re-route the frozen
experts).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

import smola
from vlmoe.config import ConfigError, RunConfig
from vlmoe.moe import freeze_moe, moe_layers
from vlmoe.train.export import ADAPTER_DIR, load_adapter_export, read_task_info


def adapter_config(cfg: RunConfig):
    """The configured method as a smola config (SMoLAConfig, LoRAConfig or FullConfig; checked at load)."""
    f = cfg.finetune
    return {"smola": f.smola, "lora": f.lora}.get(f.method) or smola.FullConfig()


def _without_routers(config):
    if isinstance(config, smola.FullConfig):
        return config
    excluded = config.exclude_modules
    return dataclasses.replace(config, exclude_modules=[*excluded, "router"] if isinstance(excluded, list)
                               else f"(?:{excluded})|.*\\.router")


def add_method(cfg: RunConfig, model: nn.Module) -> None:
    """Freeze the base and add the method's trainable tensors; the task head always trains."""
    if cfg.finetune.generalist is not None:
        generalist = Path(cfg.finetune.generalist) / ADAPTER_DIR
        if not generalist.is_dir():
            raise ConfigError(f"config key 'finetune.generalist': no adapter in '{generalist}'")
        info = read_task_info(generalist) or {}
        # its head only fits (and helps) the same task; a specialist for another task starts one fresh
        load_adapter_export(model, generalist, with_head=info.get("task") == cfg.finetune.task)
    config = adapter_config(cfg)
    if moe_layers(model.backbone):
        config = _without_routers(config)
    smola.inject(model.backbone, config)
    train_head(model)


def train_head(model: nn.Module) -> None:
    """MoE routers and experts frozen (full fine-tuning too: VL-MoE, ST-MoE); the head trains."""
    freeze_moe(model.backbone)
    for module in model.head_modules():
        module.requires_grad_(True)
