"""Fine-tuning as a Task for the one trainer: any downstream task, any method, any base.

Flow: the task's data (built once under ``data.dir``/tasks, then read from disk), the
vocabulary of its head (from the train split), the base (a pretraining run's exported model, or
a Hugging Face image classifier), the task head around it, the method's trainable tensors
(``vlmoe.train.adapters``), then the trainer. Every committed checkpoint carries the adapter and
head (``adapter/``), published as RUN_DIR/adapter. Nothing here is specific to a task: the task
(``vlmoe.tasks``) brings data, head, loss and metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import smola
from vlmoe import zero3
from vlmoe.config import ConfigError, RunConfig
from vlmoe.data import task_data
from vlmoe.data.loader import StepBatches
from vlmoe.data.task_data import DataSpec, TaskSplit
from vlmoe.moe import collect_aux_loss, collect_metrics, moe_layers
from vlmoe.tasks import get_task
from vlmoe.tasks.base import DownstreamTask, TaskInputs, count_tokens
from vlmoe.train.adapters import add_method, train_head
from vlmoe.train.base_model import Base, load_hf_image_classifier, load_multiway_base
from vlmoe.train.distributed import DistInfo, barrier
from vlmoe.train.export import ADAPTER_DIR, MODEL_WEIGHTS_FILE, export_adapter, load_adapter_export
from vlmoe.train.trainer import Task

BASE_FILE = "base.json"


def data_spec(cfg: RunConfig) -> DataSpec:
    f = cfg.finetune
    return DataSpec(entries=tuple(str(e) for e in f.data), max_items_per_source=f.max_items_per_source,
                    val_fraction=f.val_fraction)


def load_task_data(cfg: RunConfig, task: DownstreamTask, info: DistInfo) -> dict[str, TaskSplit]:
    """The task's splits, built first where missing (by local rank 0 of each node; the others wait)."""
    spec = data_spec(cfg)
    out = task_data.data_dir_for(cfg.data.dir, task.name, spec)
    if info.local_rank == 0:
        task_data.build(out, task.name, task.records, spec, verbose=info.is_main)
    barrier()
    return task_data.load(out)


def _usable(task: DownstreamTask, splits: dict[str, TaskSplit], inputs: TaskInputs, is_main: bool
            ) -> dict[str, TaskSplit]:
    """Leave out the rows the vocabulary cannot use (counted, printed); an emptied split is an error."""
    out = {}
    for name, split in splits.items():
        reasons = [task.unusable(row, name, inputs) for row in split.examples]
        kept = [i for i, reason in enumerate(reasons) if reason is None]
        if len(kept) < len(reasons):
            counts: dict[str, int] = {}
            for reason in filter(None, reasons):
                counts[reason] = counts.get(reason, 0) + 1
            if is_main:
                print(f"{task.name} {name}: left out {counts}", flush=True)
            if not kept:
                raise ConfigError(f"task '{task.name}': no usable example in the {name} split ({counts})")
            split = TaskSplit(split.examples.select(kept), split.images)
        out[name] = split
    return out


def load_base(cfg: RunConfig, task: DownstreamTask, vocab: dict, ds_config: Optional[dict]) -> Base:
    f = cfg.finetune
    if f.hf_model is not None:
        if not hasattr(task, "wrap_hf_model"):
            raise ConfigError(f"config key 'finetune.hf_model': task '{task.name}' needs a vlmoe multiway base "
                              f"(finetune.base_run); Hugging Face models serve image_classification")
        return load_hf_image_classifier(f.hf_model, len(vocab["labels"]), ds_config)
    if f.base_run is None:
        raise ConfigError("config section 'finetune': set base_run (a vlmoe pretraining run) or hf_model")
    return load_multiway_base(f.base_run, ds_config, router_noise=f.moe_router_noise, aux_loss=f.moe_aux_loss)


def base_identity(base: Base) -> dict:
    """What a base is, independent of where it lies: its model and MoE settings, the step it was
    exported at and the size of its weights (a Hugging Face base: its path)."""
    if "hf_model" in base.record:
        return {"hf_model": base.record["hf_model"]}
    weights = Path(base.record["model_dir"]) / MODEL_WEIGHTS_FILE
    return {"model": base.record["model"], "moe": base.record.get("moe"), "step": base.record.get("step"),
            "weights_bytes": weights.stat().st_size}


def check_same_base(run_dir: Path, base: Base) -> dict:
    """A run resumes and is evaluated on the base it started from, which RUN_DIR/base.json records
    (the trainer writes it, with the config, once every check has passed). Returns the base's identity."""
    path = run_dir / BASE_FILE
    identity = base_identity(base)
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if recorded is not None and recorded != identity:
        changed = sorted(k for k in {**recorded, **identity} if recorded.get(k) != identity.get(k))
        raise ConfigError(f"the base changed since {run_dir} started ({', '.join(changed)}: "
                          f"{[recorded.get(k) for k in changed]} -> {[identity.get(k) for k in changed]}); "
                          f"fine-tune the new base into another run_dir")
    return identity


def named_task(cfg: RunConfig) -> DownstreamTask:
    """``finetune.task`` from the registry; an unknown name is an error listing the tasks."""
    try:
        return get_task(cfg.finetune.task)
    except ValueError as exc:
        raise ConfigError(f"config key 'finetune.task': {exc}") from exc


def build_finetune_task(cfg: RunConfig, info: DistInfo, ds_config: Optional[dict] = None,
                        adapter_dir: Optional[Path] = None) -> Task:
    """The fine-tuning Task; ``adapter_dir`` (evaluation) loads an exported adapter and head
    instead of adding the configured method."""
    task = named_task(cfg)
    splits = load_task_data(cfg, task, info)
    vocab = task.vocabulary(splits["train"], cfg.finetune.max_answers)
    base = load_base(cfg, task, vocab, ds_config)
    if task.uses_text and base.text_tokenizer is None:
        raise ConfigError(f"task '{task.name}' reads text, and the base has no text tokenizer")
    identity = check_same_base(Path(cfg.run_dir), base)
    inputs = TaskInputs.create(base.text_tokenizer, base.image_size, base.max_text_len, vocab)
    splits = _usable(task, splits, inputs, info.is_main)

    with zero3.partitioned_construction(ds_config):
        model = task.wrap_hf_model(base.module) if cfg.finetune.hf_model else task.build_model(base.module, inputs)
    base_share = zero3.local_fraction(model)
    if adapter_dir is None:
        add_method(cfg, model)  # adapters are built whole; deepspeed.initialize partitions them
    else:
        load_adapter_export(model, adapter_dir)
        train_head(model)
    if info.is_main:
        print(f"finetune {task.name} {cfg.finetune.method}: {smola.trainable_parameters(model)}; "
              f"rank 0 holds {100 * base_share:.1f}% of the base", flush=True)

    batch = cfg.data.batch_size
    train, validation = splits["train"], splits["validation"]

    def batches(datasets: dict, split: TaskSplit, length: Optional[int]) -> StepBatches:
        return StepBatches(datasets, {name: batch for name in datasets}, rank=info.rank, world_size=info.world_size,
                           seed=cfg.seed, length=length,
                           load_example=lambda subset, row: task.load_subset_example(split, subset, row, inputs),
                           collate=lambda examples, step, rank: task.collate_subsets(examples, inputs, step, rank))

    layers = moe_layers(model)
    task_info = {"task": task.name, "vocab": vocab, "main_metric": task.main_metric, "base": base.record,
                 "data": list(data_spec(cfg).entries or task.records.default)}
    return Task(
        model=model,
        train_batches=batches({"examples": task.training_split(train)}, train,
                              cfg.train.steps * cfg.train.grad_accum),
        eval_batches=batches(task.eval_datasets(validation, cfg.data.eval_max_examples), validation, None),
        count_tokens=lambda b: count_tokens(b, base.tokens_per_image),
        exclude_frozen=True,
        export=lambda module, tag_dir, step: export_adapter(module, tag_dir / ADAPTER_DIR, task_info, info.is_main),
        export_name=ADAPTER_DIR,
        extra_loss=collect_aux_loss if layers and cfg.finetune.moe_aux_loss else None,
        extra_metrics=collect_metrics if layers else None,
        evaluate_outputs=task.evaluate if task.evaluates_outputs else None,
        main_metric=task.main_metric,
        lower_is_better=False,
        baseline=task.trivial_baseline(train, validation, inputs, cfg.data.eval_max_examples),
        identity_files={BASE_FILE: identity},
    )


def finetune(cfg: RunConfig, origin: str = "") -> Path:
    from vlmoe.train.trainer import run

    named_task(cfg)  # before any process group or data: a typo costs nothing
    return run(cfg, build_finetune_task, "finetune", origin)
