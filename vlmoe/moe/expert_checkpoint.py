"""Expert weights in a form independent of the expert-parallel size.

Under EP each rank holds E/P experts of every pool, so a rank's state_dict depends on P.
`global_expert_state` gathers every pool (sparse and soft layers alike) to its full [E, ...]
tensors (a collective over each layer's EP group); `load_global_expert_state` takes this rank's slice. A run saved with EP=2
resumes with EP=1 and the other way round. Files are safetensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist
from torch import nn

from vlmoe.moe.backbone import named_moe_layers
from vlmoe.zero3 import full_parameters, full_shape

EXPERT_PARAMS = ("w_in", "b_in", "w_out", "b_out")


def expert_param_names(model: nn.Module) -> set[str]:
    """state_dict keys of expert weights (their shapes depend on the EP size; exclude them from
    an EP-dependent module state and restore them with `load_global_expert_state`)."""
    return {f"{name}.experts.{p}" if name else f"experts.{p}" for name, _ in named_moe_layers(model)
            for p in EXPERT_PARAMS}


def global_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer>.experts.<param>": [E, ...]} on CPU for every MoE layer; a collective under EP."""
    state = {}
    for name, layer in named_moe_layers(model):
        with full_parameters(layer.experts):  # ZeRO-3 partitions them between forward passes
            for param_name in EXPERT_PARAMS:
                local = getattr(layer.experts, param_name).detach()
                if layer.ep_group is not None:
                    parts = [torch.empty_like(local) for _ in range(layer.ep_size)]
                    dist.all_gather(parts, local.contiguous(), group=layer.ep_group)
                    local = torch.cat(parts, dim=0)
                # clone: on CPU without EP, .cpu() would alias the live parameter
                state[f"{name}.experts.{param_name}" if name else f"experts.{param_name}"] = local.cpu().clone()
    return state


@torch.no_grad()
def load_global_expert_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy this rank's experts out of full [E, ...] tensors (from any EP size). Missing keys or a
    different expert count / shape are errors naming `source` and the key."""
    for name, layer in named_moe_layers(model):
        experts = layer.experts
        pool = {}
        for param_name in EXPERT_PARAMS:
            key = f"{name}.experts.{param_name}" if name else f"experts.{param_name}"
            if key not in state:
                raise KeyError(f"{source}: no expert weights {key!r}")
            expected = (layer.num_experts,) + full_shape(getattr(experts, param_name))[1:]
            if tuple(state[key].shape) != expected:
                raise ValueError(f"{source}: {key!r} has shape {tuple(state[key].shape)}, the model expects {expected}")
            pool[param_name] = state[key][experts.first_expert:experts.first_expert + experts.num_local]
        with full_parameters(experts):  # built under ZeRO-3, they are partitioned
            for param_name, values in pool.items():
                getattr(experts, param_name).copy_(values)


def save_experts(model: nn.Module, path: Union[str, Path]) -> None:
    """Gather every expert pool and write it to `path` (safetensors) from global rank 0 only."""
    from safetensors.torch import save_file

    state = global_expert_state(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        save_file(state, str(tmp))
        tmp.replace(path)


def load_experts(model: nn.Module, path: Union[str, Path]) -> None:
    """Load this rank's experts from a file written by `save_experts` under any EP size."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"expert checkpoint {path} not found")
    load_global_expert_state(model, load_file(str(path)), source=str(path))
