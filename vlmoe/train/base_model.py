"""The base a fine-tuning starts from: a vlmoe pretraining run's exported model, or a Hugging Face model.

A pretraining run exports ``RUN_DIR/model/`` after every committed checkpoint (whatever its
ZeRO stage, EP size and world size); ``finetune.base_run`` names the run (or that folder).
The base brings its own text tokenizer: a task's text is always tokenized with it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vlmoe import zero3
from vlmoe.config import ConfigError
from vlmoe.data.loader import TEXT_TOKENIZER_FILE
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.model.config import ModelConfig
from vlmoe.moe import MoEConfig, freeze_moe
from vlmoe.moe.losses import NEEDS_NOISE
from vlmoe.moe.backends import tutel_installed
from vlmoe.train.export import MODEL_CONFIG_FILE, MODEL_DIR, load_model_weights, read_model_record


@dataclass
class Base:
    """A loaded base: ``module`` (our multiway backbone, or a HF model), its text tokenizer (None
    for image-only HF models), image side, text length, tokens per image, and ``record``, what the
    export says it is ({"model", "moe", "step"}; {"hf_model": path} for HF)."""

    module: nn.Module
    text_tokenizer: Optional[TextTokenizer]
    image_size: int
    max_text_len: int
    tokens_per_image: int
    record: dict


def model_dir_of(base_run: str | Path) -> Path:
    """A pretraining run's exported model folder, given the run directory or the folder itself."""
    path = Path(base_run)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / MODEL_CONFIG_FILE).is_file():
            return candidate
    raise ConfigError(f"config key 'finetune.base_run': no exported model in '{path}' (expected "
                      f"'{path / MODEL_DIR / MODEL_CONFIG_FILE}': is it a vlmoe pretraining run that committed a "
                      f"checkpoint?)")


def frozen_moe_settings(moe: dict, where: Path, router_noise: bool, aux_loss: bool) -> dict:
    """A pretraining run's MoE settings for its frozen layers here: one rank holds every expert;
    router noise and balancing losses are off unless asked for (their gradient would reach the
    adapters through the frozen router); tutel's dispatch, an execution choice the weights do not
    depend on, falls back to ours where tutel is missing (the two agree: tests/test_moe_tutel.py)."""
    moe = {**moe, "ep_size": 1, "freeze": True}
    noisy_losses = sorted({n for names in moe.get("aux_losses", {}).values() for n in names} & NEEDS_NOISE)
    if aux_loss and not router_noise and noisy_losses:
        raise ConfigError(f"config key 'finetune.moe_aux_loss': the base's balancing losses {noisy_losses} need "
                          f"router noise; set finetune.moe_router_noise=true as well")
    if not aux_loss:
        moe.update(aux_losses={"v": [], "t": []}, z_loss_weight=0.0)
    if not router_noise:
        moe["noise_std"] = 0.0
    if moe.get("backend") == "tutel" and not tutel_installed():
        warnings.warn(f"{where} was pretrained with tutel's dispatch; tutel is not installed here, so the frozen "
                      "MoE layers dispatch with ours (same routing and outputs)", RuntimeWarning, stacklevel=3)
        moe["backend"] = "ours"
    return moe


def build_exported_model(model_dir: Path, ds_config: Optional[dict], moe: Optional[dict] = None,
                         world_size: int = 1) -> nn.Module:
    """The pretraining model (backbone and heads) of an export, with its weights; under ZeRO-3 (per
    ``ds_config``) built partitioned, then loaded one submodule at a time. ``moe`` replaces the
    recorded MoE settings (fine-tuning freezes them)."""
    from vlmoe.train.pretrain import build_pretraining_model

    record = read_model_record(model_dir)
    model_cfg = ModelConfig.from_dict(record["model"])
    moe_record = moe if moe is not None else record.get("moe")
    moe_cfg = MoEConfig.from_dict(moe_record) if moe_record else None
    with zero3.partitioned_construction(ds_config):
        model = build_pretraining_model(model_cfg, moe_cfg, world_size)
    try:
        load_model_weights(model, model_dir)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'finetune.base_run': {exc}") from exc
    return model


def load_multiway_base(base_run: str | Path, ds_config: Optional[dict], router_noise: bool = False,
                       aux_loss: bool = False) -> Base:
    """Our backbone from a pretraining run's export; MoE routers and experts frozen (VL-MoE, ST-MoE)."""
    model_dir = model_dir_of(base_run)
    record = read_model_record(model_dir)
    moe = frozen_moe_settings(record["moe"], model_dir, router_noise, aux_loss) if record.get("moe") else None
    backbone = build_exported_model(model_dir, ds_config, moe).backbone
    freeze_moe(backbone)
    cfg = backbone.cfg
    return Base(backbone, TextTokenizer.load(model_dir / TEXT_TOKENIZER_FILE), cfg.image_size, cfg.max_text_len,
                cfg.num_patches + 1, {**record, "model_dir": str(model_dir.resolve())})


def load_hf_image_classifier(path: str, num_classes: int, ds_config: Optional[dict] = None) -> Base:
    """A transformers image classifier: pretrained from a local directory (a head of another size
    starts fresh), or random from a config.json.

    Under ZeRO-3 (per ``ds_config``) transformers builds it partitioned, initialises it on
    gathered weights and loads pretrained weights one module at a time.
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    source = Path(path)
    if not source.exists():
        raise ConfigError(f"config key 'finetune.hf_model': '{source}' does not exist")
    config = AutoConfig.from_pretrained(str(source), num_labels=num_classes)
    weights = [] if source.is_file() else sorted(source.glob("*.safetensors"))
    pretrained = bool(weights) or source.is_dir() and any(source.glob("*.bin"))
    state = _without_mismatched_head(weights, config) if weights else None
    with zero3.hf_partitioning(ds_config):
        if not pretrained:
            model = AutoModelForImageClassification.from_config(config)
        elif state is None:
            model = AutoModelForImageClassification.from_pretrained(str(source), config=config,
                                                                   ignore_mismatched_sizes=True)
        else:  # transformers takes a state dict only without a path, through the concrete class
            model_class = AutoModelForImageClassification._model_mapping[type(config)]
            model = model_class.from_pretrained(None, config=config, state_dict=state)
    size = int(model.config.image_size)
    patch = int(getattr(model.config, "patch_size", size))
    return Base(model, None, size, 0, (size // patch) ** 2 + 1, {"hf_model": str(source.resolve())})


def _without_mismatched_head(weights: list[Path], config: Any) -> Optional[dict[str, torch.Tensor]]:
    """The pretrained tensors without those whose shape our model does not have (a head for
    another number of classes), or None if all fit. transformers' ZeRO-3 loading assumes an
    exact fit and ignores ignore_mismatched_sizes, so the head is left out here, for every stage."""
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):  # shapes only (outside zero.Init, which would partition it)
        state = AutoModelForImageClassification.from_config(config).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    mismatched: set[str] = set()
    for file in weights:
        with safe_open(str(file), "pt") as f:
            mismatched |= {k for k in f.keys() if k in shapes and tuple(f.get_slice(k).get_shape()) != shapes[k]}
    if not mismatched:
        return None
    from safetensors.torch import load_file

    return {k: v for file in weights for k, v in load_file(str(file)).items() if k not in mismatched}
