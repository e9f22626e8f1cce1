"""Masked data modeling pretraining (MLM, MIM, VLM) as a Task for the one trainer.

Every committed checkpoint carries the whole model as ``model/`` (config, weights with whole
expert pools, the tokenizers), published as RUN_DIR/model: the base of fine-tuning and of
``vlmoe eval``, whatever the ZeRO stage, EP size and world size of the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from vlmoe.config import ConfigError, RunConfig
from vlmoe.data.collate import PretrainCollator
from vlmoe.data.images import image_to_tensor
from vlmoe.data.layout import load_split
from vlmoe.data.loader import (
    SUBSET_DIRS,
    TEXT_TOKENIZER_FILE,
    DataDirError,
    StepBatches,
    check_data_dir,
    prepared_image_side,
)
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.data.visual_tokenizer import load_prepared_visual_tokenizer, prepared_visual_tokenizer_file
from vlmoe.model.config import ModelConfig, model_config
from vlmoe.model.pretraining import VLMoEForPretraining
from vlmoe.moe import collect_aux_loss, collect_metrics
from vlmoe.train.distributed import DistInfo
from vlmoe.train.export import MODEL_DIR, export_model, load_model_weights
from vlmoe.train.trainer import Task
from vlmoe.zero3 import partitioned_construction, zero3_enabled

# fields of the model that come from the prepared data, not from the config
DERIVED_FIELDS = ("vocab_size", "codebook_size")


def batch_sizes(cfg: RunConfig) -> dict[str, int]:
    return {"image": cfg.data.image_batch, "text": cfg.data.text_batch, "pair": cfg.data.pair_batch}


def resolve_model_config(cfg: RunConfig, text_tokenizer: TextTokenizer, visual_tokenizer) -> ModelConfig:
    """The preset, the config's overrides, and the sizes fixed by the tokenizers."""
    for key in DERIVED_FIELDS:
        if key in cfg.model.overrides:
            raise ConfigError(f"config key 'model.{key}' is set by the prepared tokenizers; remove it")
    derived = {"vocab_size": text_tokenizer.vocab_size}
    if visual_tokenizer is not None:
        derived["codebook_size"] = visual_tokenizer.codebook_size
    try:
        model_cfg = model_config(cfg.model.preset, **cfg.model.overrides, **derived)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config section 'model': {exc}") from exc
    if visual_tokenizer is not None and visual_tokenizer.patch_size != model_cfg.patch_size:
        raise ConfigError(f"model.patch_size={model_cfg.patch_size} but the visual tokenizer in {cfg.data.dir} was "
                          f"fitted on {visual_tokenizer.patch_size}-pixel patches: prepare again with this config")
    return model_cfg


def count_tokens(batch: dict) -> int:
    """Tokens the backbone processes in one micro-batch (patches + real text tokens)."""
    tokens = 0
    for part in batch.values():
        if "mim_targets" in part:
            tokens += part["mim_targets"].numel()
        if "pad_mask" in part:
            tokens += int(part["pad_mask"].sum())
    return tokens


def build_pretrain_task(cfg: RunConfig, info: DistInfo, ds_config: Optional[dict] = None,
                        model_dir: Optional[Path] = None) -> Task:
    """The pretraining Task; ``model_dir`` (evaluation) loads an exported model's weights.
    ``data.eval_batches=0``: no evaluation (``task.eval_batches`` is None)."""
    if model_dir is not None and cfg.data.eval_batches == 0:
        raise ConfigError("config key 'data.eval_batches' is 0 (no evaluation): evaluating a pretraining run "
                          "needs data.eval_batches >= 1, e.g. the override data.eval_batches=4")
    moe_cfg = cfg.moe
    if moe_cfg is not None and not moe_cfg.freeze and zero3_enabled(ds_config):
        # DeepSpeed 0.19's ZeRO-3 step fails on trainable expert parameters ("unknown parameter
        # type"), after a backward that does pass now that a step calls each MoE layer once.
        raise ConfigError("config: sparse VL-MoE pretraining cannot run under ZeRO-3 (train.zero_stage / "
                          "ds_config): DeepSpeed's ZeRO-3 optimizer step does not take trainable MoE experts; "
                          "pretrain with ZeRO-1/2 (expert parallelism works there) or set moe.freeze=true")
    sizes = batch_sizes(cfg)
    subsets = [s for s, b in sizes.items() if b > 0]
    root = check_data_dir(cfg.data.dir, subsets)
    text_tokenizer = TextTokenizer.load(str(root / TEXT_TOKENIZER_FILE))
    needs_images = sizes["image"] > 0 or sizes["pair"] > 0
    visual_file = prepared_visual_tokenizer_file(root)
    try:
        visual_tokenizer = load_prepared_visual_tokenizer(visual_file) if needs_images else None
    except ValueError as exc:
        raise DataDirError(f"the prepared data's visual tokenizer: {exc}") from exc
    model_cfg = resolve_model_config(cfg, text_tokenizer, visual_tokenizer)
    stored_side = prepared_image_side(root)
    if needs_images and stored_side is not None and stored_side < model_cfg.image_size:
        raise ConfigError(f"model.image_size={model_cfg.image_size} but {root} stores images of at most {stored_side} px "
                          f"(prepare.max_image_side): prepare again with this config")

    collator = PretrainCollator(text_tokenizer, visual_tokenizer, max_text_len=model_cfg.max_text_len,
                                mlm_prob=cfg.pretrain.mlm_prob, mim_ratio=cfg.pretrain.mim_ratio,
                                vlm_text_prob=cfg.pretrain.vlm_text_prob,
                                vlm_image_ratio=cfg.pretrain.vlm_image_ratio, seed=cfg.seed)

    def load_example(subset: str, row: dict) -> dict:
        example = {}
        if subset in ("image", "pair"):
            example["pixels"] = image_to_tensor(row["image"], model_cfg.image_size)
        if subset in ("text", "pair"):
            example["text"] = row["text"]
        return example

    def batches(split: str, length: int) -> StepBatches:
        datasets = {s: _load_split(root, s, split) for s in subsets}
        return StepBatches(datasets, sizes, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                           load_example=load_example, collate=collator, length=length)

    total_micro_steps = cfg.train.steps * cfg.train.grad_accum
    with partitioned_construction(ds_config):
        model = build_pretraining_model(model_cfg, moe_cfg, info.world_size)
    if model_dir is not None:
        load_model_weights(model, model_dir)
    # what `vlmoe finetune` and `vlmoe eval` rebuild the model from
    record = {"model": model_cfg.to_dict(), "moe": moe_cfg.to_dict() if moe_cfg else None}
    tokenizers = [path for path in (root / TEXT_TOKENIZER_FILE, visual_file) if path is not None and path.is_file()]

    def export(module: torch.nn.Module, tag_dir: Path, step: int) -> None:
        export_model(module, tag_dir / MODEL_DIR, {**record, "step": step}, tokenizers, info.is_main)

    sparse = moe_cfg is not None
    return Task(model=model,
                train_batches=batches("train", total_micro_steps),
                eval_batches=batches("validation", cfg.data.eval_batches) if cfg.data.eval_batches > 0 else None,
                count_tokens=count_tokens,
                export=export, export_name=MODEL_DIR,
                extra_loss=collect_aux_loss if sparse else None, extra_metrics=collect_metrics if sparse else None)


def build_pretraining_model(model_cfg: ModelConfig, moe_cfg, world_size: int) -> VLMoEForPretraining:
    """The dense multiway model, or VL-MoE with sparse V/T FFNs when ``moe_cfg`` is set."""
    if moe_cfg is None:
        return VLMoEForPretraining(model_cfg)
    from vlmoe.moe import moe_ffn_factory

    try:
        moe_cfg.check_world(world_size)
    except ValueError as exc:
        raise ConfigError(f"config section 'moe': {exc}") from exc
    return VLMoEForPretraining(model_cfg, moe_ffn_factory(model_cfg, moe_cfg))


def _load_split(root: Path, subset: str, split: str):
    dataset = load_split(root, SUBSET_DIRS[subset], split)
    if len(dataset) == 0:
        instead = "data.eval_batches=0 to pretrain without evaluation" if split == "validation" else \
            f"data.{subset}_batch=0 to train without it"
        raise DataDirError(f"'{root}' has no {SUBSET_DIRS[subset]} in its '{split}' split; set {instead}")
    return dataset


def pretrain(cfg: RunConfig, origin: str = "") -> Path:
    from vlmoe.train.trainer import run

    torch.set_float32_matmul_precision("high")
    return run(cfg, build_pretrain_task, "pretrain", origin)
