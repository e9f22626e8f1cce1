"""Adapter files: adapter_config.json + adapter_model.safetensors, in one of two formats.

- PEFT's LoRA format, for an adapter that is exactly one LoRA (``smola.LoRAConfig``), whatever the
  base: ``peft.PeftModel.from_pretrained(base, directory)`` loads it onto the base it was trained
  on, a Hugging Face model (what ``vlmoe finetune finetune.method=lora finetune.hf_model=...``
  trains) or any torch module, our multiway backbone included (PEFT's "custom models"). The
  format thus depends on the adapter only, never on what the base is. adapter_config.json is
  PEFT's LoraConfig: ``r``, ``lora_alpha`` = scale * r (PEFT scales B A x by lora_alpha / r, we by
  ``scale``), ``target_modules`` = the full names of the wrapped linears, no bias, dropout or
  modules_to_save; the tensors are named as a PeftModel names them,
  ``base_model.model.<linear>.lora_A.weight`` [r, d_in] and ``.lora_B.weight`` [d_out, r]. The
  LoRAConfig smola injected ("stack", as below) is kept in smola_config.json beside it: PEFT warns
  about unknown keys in its own config, and ignores other files.
- SMoLA's own format, with PEFT's file names only, for every other adapter: SMoLA, full
  fine-tuning and stacks (a LoRA specialist on a SMoLA generalist). PEFT cannot load these.
  adapter_config.json (``peft_type: "SMOLA"``) records every adapter injected, in order
  ("stack"), so that a fresh base gets the same wrappers before the tensors load; tensors keep
  their names in the wrapped model (``<linear>.mm.phi``, ``<linear>.lora_a``, ...).

Only adapter tensors are written. ``load_adapter`` reads both formats, and LoRA files written in
SMoLA's format before the PEFT one existed.

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
from smola.lora import LoRALinear
from smola.omni import MODALITIES

CONFIG_NAME = "adapter_config.json"
SMOLA_CONFIG_NAME = "smola_config.json"  # beside a PEFT LoRA config: the LoRAConfig smola injected
SAFETENSORS_NAME = "adapter_model.safetensors"
TORCH_NAME = "adapter_model.bin"  # written only where safetensors is not installed
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."  # a PeftModel holds a LoraModel (base_model), which holds the base (model)
PEFT_LORA_TENSORS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
# The LoraConfig keys that change what PEFT computes: load_adapter refuses a file whose values differ
# from what the LoRA in smola_config.json makes, or PEFT and smola would load different adapters.
PEFT_CHECKED_KEYS = ("r", "lora_alpha", "target_modules", "bias", "fan_in_fan_out", "use_rslora", "use_dora",
                     "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every adapter tensor (see ``adapter_parameters``)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in adapter_parameters(model).items()}


def is_peft_lora(stack: list[dict]) -> bool:
    """Whether an adapter stack is written in PEFT's LoRA format: it is exactly one LoRA."""
    return len(stack) == 1 and stack[0]["method"] == "lora"


def peft_tensor_name(name: str) -> str:
    """PEFT's name for our LoRA tensor ``<linear>.lora_a`` / ``<linear>.lora_b``."""
    linear, _, tensor = name.rpartition(".")
    return f"{PEFT_PREFIX}{linear}.{PEFT_LORA_TENSORS[tensor]}"


def peft_lora_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """PEFT's LoraConfig, as adapter_config.json holds it, for the one LoRA injected into ``model``."""
    (config,) = adapter_stack(model)
    alpha = config["rank"] * config["scale"]  # PEFT scales B A x by lora_alpha / r, LoRALinear by scale
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": None,  # a plain PeftModel, which calls the base unchanged (task types add their own heads)
        "inference_mode": True,
        "r": config["rank"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _checked_state(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU copies of ``state_dict`` (by default the model's adapter tensors), refused unless it holds
    every adapter tensor at its full shape."""
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
    return {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}


def _write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON in ``path``."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_adapter(model: nn.Module, directory: Union[str, Path], state_dict: Optional[dict[str, torch.Tensor]] = None,
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into ``directory``: PEFT's LoRA format
    for exactly one LoRA (with smola_config.json), SMoLA's own otherwise (see the module docstring).

    state_dict: the adapter tensors to write (named as ``adapter_parameters`` names them), if the
    caller gathered them (ZeRO-3); by default the model's own. Empty tensors (unGathered ZeRO-3
    partitions) are refused. base_model_name_or_path: recorded in a PEFT config; by default the
    model's own ``name_or_path`` (what transformers' from_pretrained loaded), else null.
    Returns the directory.
    """
    stack = adapter_stack(model)
    if not stack:
        raise ValueError(f"save_adapter: {type(model).__name__} has no injected adapter (call smola.inject first)")
    tensors = _checked_state(model, state_dict)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_peft_lora(stack):
        tensors = {peft_tensor_name(n): t for n, t in tensors.items()}
        config = peft_lora_config(model, base_model_name_or_path or getattr(model, "name_or_path", None) or None)
        _write_json(directory / SMOLA_CONFIG_NAME, {"format_version": FORMAT_VERSION, "stack": stack})
    else:
        config = {"peft_type": "SMOLA", "format_version": FORMAT_VERSION, "stack": stack}
        (directory / SMOLA_CONFIG_NAME).unlink(missing_ok=True)  # an older PEFT-format save's: it would mislead
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, directory / TORCH_NAME)
    else:
        save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    _write_json(directory / CONFIG_NAME, config)
    return directory


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; an error naming the file if it is missing or not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(data).__name__}")
    return data


def _read_stack(path: Path, data: dict) -> list[dict]:
    """The validated "stack" of the config ``data`` read from ``path``."""
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {data.get('format_version')!r} (expected {FORMAT_VERSION})")
    stack = data.get("stack")
    if not isinstance(stack, list) or not stack:
        raise ValueError(f"{path}: 'stack' must be a non-empty list of adapter configs")
    for i, cfg in enumerate(stack):
        config_from_dict(cfg, where=f"{path} stack[{i}]")
    return stack


def read_adapter_config(directory: Union[str, Path]) -> list[dict]:
    """The validated adapter stack of the adapter in ``directory``: from adapter_config.json in
    SMoLA's format, from smola_config.json beside a PEFT LoRA config."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    data = _read_json(path)
    peft_type = data.get("peft_type")
    if peft_type == "SMOLA":
        return _read_stack(path, data)
    if peft_type != "LORA":
        raise ValueError(f"{path}: 'peft_type' must be 'SMOLA' (SMoLA's format) or 'LORA' (PEFT's LoRA format, "
                         f"as smola writes it); got {peft_type!r}")
    smola_path = directory / SMOLA_CONFIG_NAME
    if not smola_path.is_file():
        raise FileNotFoundError(f"{path} is a PEFT LoRA adapter without {smola_path.name} beside it: smola loads the "
                                "PEFT LoRA adapters that smola.save_adapter wrote")
    stack = _read_stack(smola_path, _read_json(smola_path))
    if not is_peft_lora(stack):
        raise ValueError(f"{smola_path}: beside a PEFT LoRA config, 'stack' must be exactly one LoRA; got methods "
                         f"{[cfg['method'] for cfg in stack]}")
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


def _check_tensors(tensors: dict[str, torch.Tensor], names: dict[str, str], params: dict[str, nn.Parameter],
                   directory: Path) -> None:
    """Refuse ``tensors`` (from ``directory``) unless they are exactly those ``names`` maps (file name ->
    parameter name), each with its parameter's full shape."""
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"load_adapter: {directory} does not fit this model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for file_name, name in names.items():
        want = tuple(getattr(params[name], "ds_shape", params[name].shape))  # a partitioned parameter's full shape
        if tuple(tensors[file_name].shape) != want:
            raise ValueError(f"load_adapter: {file_name!r} has shape {tuple(tensors[file_name].shape)} in {directory}, "
                             f"the model expects {want}")


def _check_peft_config(model: nn.Module, directory: Path) -> None:
    """Refuse a PEFT LoRA config whose ``PEFT_CHECKED_KEYS`` differ from what the LoRA recorded in
    smola_config.json makes on ``model`` (an edited file): PEFT would load another adapter than smola."""
    path = directory / CONFIG_NAME
    data = _read_json(path)
    expected = peft_lora_config(model)
    for key in PEFT_CHECKED_KEYS:
        if key not in data:
            raise ValueError(f"load_adapter: {path} lacks the key {key!r}")
        got, want = data[key], expected[key]
        if key == "target_modules" and isinstance(got, list):
            if sorted(got) != want:  # PEFT matches names in any order
                raise ValueError(f"load_adapter: {path} key 'target_modules' names {sorted(set(got) - set(want))[:5]} "
                                 f"that the LoRA in {SMOLA_CONFIG_NAME} does not wrap on this model, and lacks "
                                 f"{sorted(set(want) - set(got))[:5]}")
        elif got != want:
            raise ValueError(f"load_adapter: {path} key {key!r} is {got!r}; the LoRA in {SMOLA_CONFIG_NAME} makes it "
                             f"{want!r} on this model")


def load_adapter(model: nn.Module, directory: Union[str, Path],
                 copy: Callable[[nn.Module, dict[str, torch.Tensor]], None] = _copy_into_parameters) -> nn.Module:
    """Inject the adapters recorded in ``directory`` (those the model lacks) and load their tensors,
    from either format (see the module docstring).

    The model must be the base the adapter was trained on, bare or already carrying a
    prefix of the recorded stack. Every adapter tensor must be present with its shape, and a
    PEFT config must describe the recorded LoRA. ``copy(model, tensors)`` writes the checked
    tensors (by parameter name) into the parameters of those names; pass one that gathers
    partitioned parameters (ZeRO-3) where a full fine-tuning's base is partitioned.
    """
    directory = Path(directory)
    stack = read_adapter_config(directory)
    have = adapter_stack(model)
    if have != stack[: len(have)]:
        raise ValueError(f"load_adapter: the model already carries adapters {have}, which are not a prefix of "
                         f"those in {directory}: {stack}")
    tensors = read_adapter_tensors(directory)
    for cfg in stack[len(have):]:
        inject(model, config_from_dict(cfg))
    params = adapter_parameters(model)
    peft = is_peft_lora(stack)
    unreachable = {} if peft else _unreachable_blocks(model, tensors, set(params))
    dropped = {n for names in unreachable.values() for n in names}
    tensors = {n: t for n, t in tensors.items() if n not in dropped}
    names = {peft_tensor_name(n) if peft else n: n for n in params}  # file name -> parameter name
    _check_tensors(tensors, names, params, directory)
    if peft:
        _check_peft_config(model, directory)
    if unreachable:
        warnings.warn(f"load_adapter: {directory} holds {len(unreachable)} SMoLA blocks that no token reaches in this "
                      f"model (e.g. {next(iter(unreachable))!r}; written before smola left such blocks out); they never "
                      "trained (w_out is zero, they added nothing) and are dropped", RuntimeWarning, stacklevel=2)
    copy(model, {names[n]: t for n, t in tensors.items()})
    model.__dict__[STACK_ATTR] = list(stack)
    return model
