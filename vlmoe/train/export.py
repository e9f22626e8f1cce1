"""Portable exports written into every committed checkpoint, and read back.

- A pretraining run's ``model/``: ``model_config.json`` (model and MoE settings, the step),
  ``model.safetensors`` (every weight, experts as whole [E, ...] pools), and the text and visual
  tokenizers the model was trained with. Fine-tuning and ``vlmoe eval`` build bases from it.
- A fine-tuning run's ``adapter/``: ``adapter_config.json`` + ``adapter_model.safetensors`` (the
  whole adapter stack: in PEFT's LoRA format for a plain LoRA, which ``peft.PeftModel`` loads onto
  the base, in SMoLA's own otherwise; see ``smola.adapter_io``), ``task_head.safetensors`` and
  ``task.json`` (task, vocabulary, base).

Both are gathered from ZeRO-3 partitions and expert-parallel shards, so they depend on neither
the world size, the EP size nor the ZeRO stage; both are written to a temporary folder and
renamed. Every rank calls the export functions (they gather); rank 0 writes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from torch import nn

import smola
from vlmoe import zero3
from vlmoe.moe.expert_checkpoint import expert_param_names, global_expert_state, load_global_expert_state

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
MODEL_CONFIG_FILE = "model_config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "task_head.safetensors"
TASK_FILE = "task.json"


def _write_dir(out_dir: Path, write) -> None:
    """Run ``write(tmp)`` then rename tmp to ``out_dir`` (replacing an older one)."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def export_model(model: nn.Module, out_dir: Path, record: dict, extra_files: list[Path], is_main: bool) -> None:
    """Write ``out_dir`` = model_config.json (``record``) + model.safetensors + ``extra_files``
    (tokenizers). Collective."""
    from safetensors.torch import save_file

    experts = expert_param_names(model)
    state = zero3.gathered_state_dict(model, keep=is_main, skip=frozenset(experts))
    state.update(global_expert_state(model))  # a collective over each layer's EP group
    if not is_main:
        return

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / MODEL_WEIGHTS_FILE))
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for file in extra_files:
            shutil.copy2(file, tmp / file.name)

    _write_dir(out_dir, write)


def read_model_record(model_dir: Path) -> dict:
    """model_config.json of an exported model: {"model": ModelConfig fields, "moe": MoEConfig fields
    or None, "step": int}."""
    return json.loads((model_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))


def load_model_weights(model: nn.Module, model_dir: Path) -> None:
    """Load an exported model.safetensors into ``model`` (built from the same record, any EP size,
    partitioned or not); experts take this rank's slice. Every key must fit."""
    from safetensors.torch import load_file

    path = model_dir / MODEL_WEIGHTS_FILE
    state = load_file(str(path))
    experts = expert_param_names(model)
    zero3.load_state_dict(model, {k: v for k, v in state.items() if k not in experts}, strict=False, source=str(path))
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()) - experts)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model of {model_dir / MODEL_CONFIG_FILE}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if experts:
        load_global_expert_state(model, {k: state[k] for k in experts if k in state}, source=str(path))


def export_adapter(model: nn.Module, out_dir: Path, task_info: dict, is_main: bool) -> None:
    """Write ``out_dir`` = the adapter stack of ``model.backbone``, the task head (every module of
    ``model.head_modules()``) and ``task_info`` as task.json; a PEFT config names a Hugging Face
    base by its ``finetune.hf_model`` path. Collective."""
    import deepspeed
    from safetensors.torch import save_file

    adapter = smola.adapter_parameters(model.backbone)
    head = {f"{i}.{n}": p for i, m in enumerate(model.head_modules()) for n, p in m.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(adapter.values()) + list(head.values()), modifier_rank=None):
        if not is_main:
            return
        adapter_state = {n: p.detach().cpu().clone() for n, p in adapter.items()}
        head_state = {n: p.detach().cpu().clone().contiguous() for n, p in head.items()}

    def write(tmp: Path) -> None:
        smola.save_adapter(model.backbone, tmp, state_dict=adapter_state,
                           base_model_name_or_path=task_info["base"].get("hf_model"))
        save_file(head_state, str(tmp / HEAD_FILE))
        (tmp / TASK_FILE).write_text(json.dumps(task_info, indent=2) + "\n", encoding="utf-8")

    _write_dir(out_dir, write)


def load_adapter_export(model: nn.Module, adapter_dir: Path, with_head: bool = True) -> None:
    """Inject and load an exported adapter stack into ``model.backbone`` (partitioned or not), and
    the task head unless ``with_head`` is False."""
    smola.load_adapter(model.backbone, adapter_dir,
                       copy=lambda module, tensors: zero3.load_state_dict(module, tensors, strict=False,
                                                                          source=str(adapter_dir)))
    if with_head:
        load_head(model, adapter_dir)


def load_head(model: nn.Module, adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    path = adapter_dir / HEAD_FILE
    state = load_file(str(path))
    modules = model.head_modules()
    prefixes = {key.split(".", 1)[0] for key in state}
    if prefixes != {str(i) for i in range(len(modules))}:
        raise ValueError(f"{path} holds {len(prefixes)} head module(s); this task's head has {len(modules)}")
    for i, module in enumerate(modules):
        zero3.load_state_dict(module, {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")},
                              source=str(path))


def read_task_info(adapter_dir: Path) -> Optional[dict]:
    path = adapter_dir / TASK_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
