"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

The config records every adapter injected, in order ("stack"), so a fresh base model gets
the same wrappers before the tensors load. Only adapter tensors are written.

Files written before ``smola.inject`` left out the SMoLA blocks no token can reach (a T block on
a V-FFN linear) hold those blocks too: they never trained (their w_out is still zero, so they
added nothing), and ``load_adapter`` drops them with a warning.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from smola.config import config_from_dict
from smola.inject import STACK_ATTR, adapter_parameters, adapter_stack, declared_modality, inject
from smola.omni import MODALITIES

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
TORCH_NAME = "adapter_model.bin"  # written only where safetensors is not installed
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every adapter tensor (see ``adapter_parameters``)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, directory: Union[str, Path], state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into ``directory``.

    state_dict: the adapter tensors to write, if the caller gathered them (ZeRO-3);
    by default the model's own. Empty tensors (unGathered ZeRO-3 partitions) are refused.
    Returns the directory.
    """
    stack = adapter_stack(model)
    if not stack:
        raise ValueError(f"save_adapter: {type(model).__name__} has no injected adapter (call smola.inject first)")
    expected = adapter_parameters(model)
    tensors = adapter_state_dict(model) if state_dict is None else dict(state_dict)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"save_adapter: state_dict does not match the adapter: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in tensors.items():
        want = tuple(getattr(expected[name], "ds_shape", expected[name].shape))
        if tensor.numel() == 0 or tuple(tensor.shape) != want:
            raise ValueError(f"save_adapter: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} "
                             "(under ZeRO-3, gather the parameters before saving)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, directory / TORCH_NAME)
    else:
        save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    config = {"peft_type": "SMOLA", "format_version": FORMAT_VERSION, "stack": stack}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def read_adapter_config(directory: Union[str, Path]) -> list[dict]:
    """The validated adapter stack recorded in ``directory/adapter_config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("peft_type") != "SMOLA":
        raise ValueError(f"{path}: 'peft_type' must be 'SMOLA'; got {data.get('peft_type') if isinstance(data, dict) else data!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {data.get('format_version')!r} (expected {FORMAT_VERSION})")
    stack = data.get("stack")
    if not isinstance(stack, list) or not stack:
        raise ValueError(f"{path}: 'stack' must be a non-empty list of adapter configs")
    for i, cfg in enumerate(stack):
        config_from_dict(cfg, where=f"{path} stack[{i}]")
    return stack


def read_adapter_tensors(directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The tensors in ``directory`` (safetensors, or a weights-only torch file)."""
    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / SAFETENSORS_NAME))
    if (directory / TORCH_NAME).is_file():
        return torch.load(directory / TORCH_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} (or {TORCH_NAME}) in {directory}")


def _copy_into_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(dtype=params[name].dtype, device=params[name].device))


_BLOCK_TENSORS = ("phi", "alpha", "w_in", "w_out")


def _unreachable_blocks(model: nn.Module, tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, list[str]]:
    """Block name -> tensor names of the untrained V/T blocks in ``tensors`` (an older file) that this
    model does not create because no token of theirs reaches their linear (see
    ``smola.inject.declared_modality``)."""
    blocks: dict[str, list[str]] = {}
    for name in set(tensors) - expected:
        block, _, tensor = name.rpartition(".")
        linear, _, branch = block.rpartition(".")
        if tensor in _BLOCK_TENSORS and branch in MODALITIES and linear:
            blocks.setdefault(block, []).append(name)
    unreachable = {}
    for block, names in sorted(blocks.items()):
        linear, _, branch = block.rpartition(".")
        try:
            model.get_submodule(linear)
        except AttributeError:
            continue
        modality = declared_modality(model, linear)
        w_out = tensors.get(f"{block}.w_out")
        if modality is None or modality == branch or w_out is None or bool(w_out.any()):
            continue  # reachable, or trained: left for load_adapter's error
        unreachable[block] = names
    return unreachable


def load_adapter(model: nn.Module, directory: Union[str, Path],
                 copy: Callable[[nn.Module, dict[str, torch.Tensor]], None] = _copy_into_parameters) -> nn.Module:
    """Inject the adapters recorded in ``directory`` (those the model lacks) and load their tensors.

    The model must be the base the adapter was trained on, bare or already carrying a
    prefix of the recorded stack. Every adapter tensor must be present with its shape.
    ``copy(model, tensors)`` writes the checked tensors into the parameters of those names;
    pass one that gathers partitioned parameters (ZeRO-3) where a full fine-tuning's base is
    partitioned.
    """
    directory = Path(directory)
    stack = read_adapter_config(directory)
    have = adapter_stack(model)
    if have != stack[: len(have)]:
        raise ValueError(f"load_adapter: the model already carries adapters {have}, which are not a prefix of "
                         f"those in {directory / CONFIG_NAME}: {stack}")
    tensors = read_adapter_tensors(directory)
    for cfg in stack[len(have):]:
        inject(model, config_from_dict(cfg))
    params = adapter_parameters(model)
    unreachable = _unreachable_blocks(model, tensors, set(params))
    dropped = {n for names in unreachable.values() for n in names}
    tensors = {n: t for n, t in tensors.items() if n not in dropped}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"load_adapter: {directory} does not fit this model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, param in params.items():
        want = tuple(getattr(param, "ds_shape", param.shape))  # a partitioned parameter's full shape
        if tuple(tensors[name].shape) != want:
            raise ValueError(f"load_adapter: {name!r} has shape {tuple(tensors[name].shape)} in {directory}, "
                             f"the model expects {want}")
    if unreachable:
        warnings.warn(f"load_adapter: {directory} holds {len(unreachable)} SMoLA blocks that no token reaches in this "
                      f"model (e.g. {next(iter(unreachable))!r}; written before smola left such blocks out); they never "
                      "trained (w_out is zero, they added nothing) and are dropped", RuntimeWarning, stacklevel=2)
    copy(model, tensors)
    model.__dict__[STACK_ATTR] = list(stack)
    return model
