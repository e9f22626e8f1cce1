"""Fine-tuning as a Task for the one trainer: SMoLA, LoRA or full, on our backbone or a HF model.

Flow: build the base (a vlmoe pretraining run, or a Hugging Face model), wrap it in the task
head, add the method's trainable parameters (smola.inject), train under the configured ZeRO
stage (ZeRO-3 partitions the frozen base), and after each committed checkpoint export the
adapter alone (``RUN_DIR/adapter``: PEFT-style files plus the task head) for later use.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import smola
from vlmoe import zero3
from vlmoe.config import ConfigError, RunConfig
from vlmoe.data.images import image_to_tensor
from vlmoe.data.loader import SUBSET_DIRS, DataDirError, StepBatches, check_data_dir
from vlmoe.model.classifier import HFImageClassifier, ImageClassifier
from vlmoe.model.config import ModelConfig
from vlmoe.model.multiway import MultiwayTransformer
from vlmoe.moe import MoEConfig, freeze_moe, moe_layers
from vlmoe.moe.expert_checkpoint import load_experts
from vlmoe.moe.tutel_dispatch import tutel_installed
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.train.checkpoint import EXPERTS_FILE, CheckpointError, load_module_weights
from vlmoe.train.distributed import DistInfo
from vlmoe.train.pretrain import MODEL_CONFIG_FILE, build_pretraining_model
from vlmoe.train.trainer import Task

ADAPTER_DIR = "adapter"
HEAD_FILE = "task_head.safetensors"


def load_pretrained_backbone(run_dir: str | Path, ds_config: Optional[dict] = None) -> MultiwayTransformer:
    """The backbone of a vlmoe pretraining run, with its last committed weights; under ZeRO-3
    (per ``ds_config``) built partitioned, then loaded one submodule at a time."""
    run_dir = Path(run_dir)
    config_path = run_dir / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"config key 'finetune.base_run': '{config_path}' not found (is '{run_dir}' a vlmoe "
                          f"pretraining run?)")
    record = json.loads(config_path.read_text(encoding="utf-8"))
    model_cfg = ModelConfig.from_dict(record["model"])
    moe_cfg = MoEConfig.from_dict(_moe_record_here(record["moe"], run_dir)) if record.get("moe") else None
    with zero3.partitioned_construction(ds_config):
        pretrained = build_pretraining_model(model_cfg, moe_cfg, world_size=1)
    try:
        tag_dir = load_module_weights(pretrained, run_dir / "checkpoints", strict=moe_cfg is None)
        if moe_cfg is not None:
            load_experts(pretrained, tag_dir / EXPERTS_FILE)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"config key 'finetune.base_run': {exc}") from exc
    if moe_cfg is not None:
        freeze_moe(pretrained)  # routers and experts stay frozen in fine-tuning (VL-MoE, ST-MoE)
    return pretrained.backbone


def _moe_record_here(moe: dict, run_dir: Path) -> dict:
    """A pretraining run's MoE settings for the frozen base here: one rank holds every expert,
    and tutel's dispatch, an execution choice that the weights do not depend on, falls back to
    ours where tutel is not installed (the two agree: tests/test_moe_tutel.py)."""
    moe = {**moe, "ep_size": 1}
    if moe.get("backend") == "tutel" and not tutel_installed():
        warnings.warn(f"{run_dir} was pretrained with tutel's dispatch; tutel is not installed here, so the frozen "
                      "MoE layers dispatch with ours (same routing and outputs)", RuntimeWarning, stacklevel=3)
        moe["backend"] = "ours"
    return moe


def load_hf_classifier(path: str, num_classes: int, ds_config: Optional[dict] = None) -> nn.Module:
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
            return AutoModelForImageClassification.from_config(config)
        if state is None:
            return AutoModelForImageClassification.from_pretrained(str(source), config=config,
                                                                  ignore_mismatched_sizes=True)
        # transformers takes a state dict only without a path, through the concrete class
        model_class = AutoModelForImageClassification._model_mapping[type(config)]
        return model_class.from_pretrained(None, config=config, state_dict=state)


def _without_mismatched_head(weights: list[Path], config) -> Optional[dict[str, torch.Tensor]]:
    """The pretrained tensors without those whose shape our model does not have (a head for
    another number of classes), or None if all fit. transformers' ZeRO-3 loading assumes an
    exact fit and ignores ignore_mismatched_sizes, so the head is left out here, for every stage."""
    from safetensors import safe_open
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):  # shapes only (outside zero.Init, which would partition it)
        shapes = {k: tuple(v.shape) for k, v in AutoModelForImageClassification.from_config(config).state_dict().items()}
    mismatched: set[str] = set()
    for file in weights:
        with safe_open(str(file), "pt") as f:
            mismatched |= {k for k in f.keys() if k in shapes and tuple(f.get_slice(k).get_shape()) != shapes[k]}
    if not mismatched:
        return None
    from safetensors.torch import load_file

    return {k: v for file in weights for k, v in load_file(str(file)).items() if k not in mismatched}


def adapter_config(cfg: RunConfig):
    f = cfg.finetune
    try:
        if f.method == "smola":
            return smola.SMoLAConfig(**f.smola)
        if f.method == "lora":
            return smola.LoRAConfig(**f.lora)
        return smola.FullConfig()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section 'finetune.{f.method}': {exc}") from exc


def _head(model: nn.Module) -> list[nn.Module]:
    """The task head's modules: trained by every method, saved with the adapter."""
    if isinstance(model, ImageClassifier):
        return [model.pool_norm, model.classifier]
    return [model.model.classifier]


def build_classifier(cfg: RunConfig, num_classes: int, ds_config: Optional[dict] = None) -> tuple[nn.Module, int, int]:
    """(task model, image size, tokens per image); under ZeRO-3 (per ``ds_config``) built partitioned."""
    f = cfg.finetune
    if f.hf_model is None and f.base_run is None:
        raise ConfigError("config section 'finetune': set base_run (a vlmoe pretraining run) or hf_model")
    if f.hf_model is not None:
        hf = load_hf_classifier(f.hf_model, num_classes, ds_config)
        size, patch = int(hf.config.image_size), int(getattr(hf.config, "patch_size", hf.config.image_size))
        return HFImageClassifier(hf), size, (size // patch) ** 2 + 1
    backbone = load_pretrained_backbone(f.base_run, ds_config)
    with zero3.partitioned_construction(ds_config):
        model = ImageClassifier(backbone, num_classes)
    return model, backbone.cfg.image_size, backbone.cfg.num_patches + 1


def adapter_target(model: nn.Module) -> nn.Module:
    """The module adapters go into: the backbone, not the task head."""
    return model.backbone if isinstance(model, ImageClassifier) else model.model


def add_method(cfg: RunConfig, model: nn.Module) -> None:
    """Freeze the base, add the method's trainable tensors; the task head always trains."""
    target = adapter_target(model)
    if cfg.finetune.generalist is not None:
        generalist = Path(cfg.finetune.generalist) / ADAPTER_DIR
        if not generalist.is_dir():
            raise ConfigError(f"config key 'finetune.generalist': no adapter in '{generalist}'")
        smola.load_adapter(target, generalist)
        _load_head(model, generalist)
    config = adapter_config(cfg)
    if moe_layers(target) and not isinstance(config, smola.FullConfig):
        # routers stay as pretrained: an adapter on a router would re-route the frozen experts
        config.exclude_modules = [*config.exclude_modules, "router"] if isinstance(config.exclude_modules, list) \
            else f"(?:{config.exclude_modules})|.*\\.router"
    smola.inject(target, config)
    freeze_moe(target)  # full fine-tuning too: MoE routers and experts stay frozen (VL-MoE, ST-MoE)
    for module in _head(model):
        module.requires_grad_(True)


def _load_head(model: nn.Module, adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / HEAD_FILE))
    for i, module in enumerate(_head(model)):
        zero3.load_state_dict(module, {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")},
                              source=str(adapter_dir / HEAD_FILE))


def export_adapter(model: nn.Module, out_dir: Path, is_main: bool) -> None:
    """Write the adapter and the task head, gathered from ZeRO-3 partitions. Collective."""
    from safetensors.torch import save_file

    import deepspeed

    target = adapter_target(model)
    adapter = smola.adapter_parameters(target)
    head = {f"{i}.{n}": p for i, m in enumerate(_head(model)) for n, p in m.named_parameters()}
    params = list(adapter.values()) + list(head.values())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if is_main:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            smola.save_adapter(target, tmp, state_dict={n: p.detach().cpu().clone() for n, p in adapter.items()})
            save_file({n: p.detach().cpu().clone().contiguous() for n, p in head.items()}, str(tmp / HEAD_FILE))
            _replace_dir(tmp, out_dir)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    import shutil

    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_finetuned(cfg: RunConfig, num_classes: int) -> nn.Module:
    """A fine-tuned model rebuilt on one process: the base, then the run's exported adapter and head."""
    model, _, _ = build_classifier(cfg, num_classes)
    target = adapter_target(model)
    adapter = Path(cfg.run_dir) / ADAPTER_DIR
    smola.load_adapter(target, adapter)  # the whole stack: a specialist's file holds its generalist too
    _load_head(model, adapter)
    return model.eval()


def _class_names(dataset) -> list[str]:
    return sorted({name for name in dataset["label_name"] if name})


def build_finetune_task(cfg: RunConfig, info: DistInfo, ds_config: Optional[dict] = None) -> Task:
    batch = cfg.data.image_batch
    if batch <= 0:
        raise ConfigError("config key 'data.image_batch' must be > 0 for image classification")
    root = check_data_dir(cfg.data.dir, ["image"])
    splits = _load_images(root)
    classes = _class_names(splits["train"])
    if len(classes) < 2:
        raise DataDirError(f"'{root / SUBSET_DIRS['image']}' has {len(classes)} labelled class(es); "
                           f"image classification needs at least 2")
    index = {name: i for i, name in enumerate(classes)}
    splits = {name: ds.filter(lambda n: n in index, input_columns="label_name") for name, ds in splits.items()}

    model, image_size, tokens_per_image = build_classifier(cfg, len(classes), ds_config)
    base_share = zero3.local_fraction(model)
    add_method(cfg, model)  # adapters are built whole; deepspeed.initialize partitions them
    if info.is_main:
        print(f"finetune {cfg.finetune.method}: {smola.trainable_parameters(model)}; "
              f"rank 0 holds {100 * base_share:.1f}% of the base", flush=True)

    def load_example(subset: str, row: dict) -> dict:
        return {"pixels": image_to_tensor(row["image"], image_size), "label": index[row["label_name"]]}

    def collate(examples: dict, step: int, rank: int) -> dict:
        rows = examples["image"]
        return {"pixels": torch.stack([r["pixels"] for r in rows]),
                "labels": torch.tensor([r["label"] if r["valid"] else IGNORE_INDEX for r in rows], dtype=torch.long)}

    def batches(split: str, length: Optional[int]) -> StepBatches:
        return StepBatches({"image": splits[split]}, {"image": batch}, rank=info.rank, world_size=info.world_size,
                           seed=cfg.seed, load_example=load_example, collate=collate, length=length)

    run_dir = Path(cfg.run_dir)
    return Task(model=model, train_batches=batches("train", cfg.train.steps * cfg.train.grad_accum),
                eval_batches=batches("validation", None),  # accuracy over the whole split
                count_tokens=lambda b: b["pixels"].shape[0] * tokens_per_image, exclude_frozen=True,
                export=lambda module: export_adapter(module, run_dir / ADAPTER_DIR, info.is_main))


def _load_images(root: Path) -> dict:
    import datasets

    path = root / SUBSET_DIRS["image"]
    dataset = datasets.load_from_disk(str(path))
    for split in ("train", "validation"):
        if split not in dataset or len(dataset[split]) == 0:
            raise DataDirError(f"'{path}' has no (or an empty) '{split}' split")
    return {"train": dataset["train"], "validation": dataset["validation"]}


def finetune(cfg: RunConfig) -> Path:
    from vlmoe.train.trainer import run

    return run(cfg, build_finetune_task)
