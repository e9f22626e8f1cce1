"""``python -m vlmoe.study.accounting RUN_DIR [key=value ...]``: one run's parameters and FLOPs.

The run's task is rebuilt in this one process as ``vlmoe eval`` rebuilds it (RUN_DIR/config.yaml
with the overrides; the weights of the committed checkpoint's portable export, ``eval.checkpoint``,
default ``last_good``), whole (no ZeRO partitioning, experts on one rank) and without a DeepSpeed
engine. The counts come from one real training micro-batch (forward, the MoE aux loss as the
trainer adds it, backward; train mode) and one real evaluation batch (eval mode, no_grad), both
counted by FlopCounterMode and analytically (`vlmoe.study.flops`). Per-process counts are scaled to
the run's step: x world size (of the run, from the checkpoint) x train.grad_accum. Counts run on
CPU in fp32: a FLOP count does not depend on the precision; the MoE experts' computed rows and the
attention kernel can depend on the device (see `vlmoe.study.flops`).

Writes RUN_DIR/accounting.json (flat, numbers):
    params_total, params_trainable          all parameters (every expert of every pool), trainable
    params_applied_per_token                `vlmoe.moe.parameter_report`: the model minus the experts a
                                            token does not use; adapters count fully (a soft mixture
                                            applies every expert to every token, LoRA too)
    params_adapter, params_head             added by the adapter(s) (0 for full fine-tuning and
                                            pretraining); the task head (0 for pretraining)
    train_flops_per_step                    counted, one optimizer step of the whole job
    train_flops_per_step_analytic, train_flops_ratio   analytic, and counted / analytic
    infer_flops_per_example(_analytic)      one evaluation batch's forward / its examples
    tokens_per_step, flops_per_token        the task's count_tokens of the micro-batch x world x
                                            grad_accum; train_flops_per_step / tokens_per_step
    world_size, grad_accum                  the scale factors used
    flops_breakdown.<category>              analytic training FLOPs per step by category
An evaluation "example" is what the task's model counts as one (``num_examples``: a question, an
image, a sentence pair); for batches without that count (pretraining, retrieval's dual encoding)
every item of every subset is one: a text, an image or an image-text pair (one backbone pass each).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from smola.inject import ADAPTER_TYPES
from vlmoe.config import ConfigError, RunConfig, UsageError, load_config
from vlmoe.data.loader import iterate
from vlmoe.data.sources import DataError
from vlmoe.moe import parameter_report
from vlmoe.study.flops import CATEGORIES, AnalyticFlops, measure_flops
from vlmoe.train import checkpoint
from vlmoe.train.distributed import DistInfo
from vlmoe.train.evaluate import checkpoint_dir
from vlmoe.train.export import ADAPTER_DIR, MODEL_DIR
from vlmoe.train.run_dir import RUN_INFO_FILE
from vlmoe.train.trainer import Task

ACCOUNTING_FILE = "accounting.json"
# one process, whole model: no ZeRO (the task is built without a DeepSpeed config) and no expert parallelism
SINGLE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run_command(run_dir: Path) -> str:
    """"pretrain" or "finetune": what wrote ``run_dir`` (its run.json); an error for anything else."""
    info_file = run_dir / RUN_INFO_FILE
    if not info_file.is_file():
        raise ConfigError(f"'{run_dir}' is not a vlmoe run directory (no {RUN_INFO_FILE})")
    return json.loads(info_file.read_text(encoding="utf-8"))["command"]


def run_config(run_dir: Path, overrides: Sequence[str]) -> RunConfig:
    """The run's config with ``overrides``; a sparse run's experts all on this one process."""
    config_file, fixed = str(run_dir / "config.yaml"), [*overrides, f"run_dir={run_dir}"]
    cfg = load_config(config_file, fixed)
    if cfg.moe is not None and cfg.moe.ep_size != 1:
        cfg = load_config(config_file, [*fixed, "moe.ep_size=1"])
    return cfg


def build_task(cfg: RunConfig, command: str, tag_dir: Path) -> Task:
    """The run's task on one process, with the weights of the checkpoint ``tag_dir``'s export."""
    from vlmoe.train.finetune import build_finetune_task
    from vlmoe.train.pretrain import build_pretrain_task

    torch.manual_seed(cfg.seed)
    if command == "finetune":
        return build_finetune_task(cfg, SINGLE_PROCESS, None, adapter_dir=tag_dir / ADAPTER_DIR)
    return build_pretrain_task(cfg, SINGLE_PROCESS, None, model_dir=tag_dir / MODEL_DIR)


def _numel(modules: Sequence[nn.Module], skip: Callable[[str], bool] = lambda name: False) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        seen.update({id(p): p.numel() for name, p in module.named_parameters() if not skip(name)})
    return sum(seen.values())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """params_total / _trainable / _applied_per_token (`parameter_report`, adapters included as
    applied to every token), params_adapter (tensors of the adapter modules, not their frozen
    bases) and params_head (a task model's head; 0 for a model without ``head_modules``)."""
    report = parameter_report(model)
    adapters = [m for m in model.modules() if isinstance(m, ADAPTER_TYPES)]
    heads = model.head_modules() if hasattr(model, "head_modules") else []
    return {"params_total": report["total"], "params_trainable": report["trainable"],
            "params_applied_per_token": report["applied_per_token"],
            "params_adapter": _numel(adapters, skip=lambda name: name.startswith("base.")),
            "params_head": _numel(heads)}


def batch_examples(batch: dict, out: dict) -> int:
    """Examples in an evaluation batch: the model's "num_examples" where it gives one, else every
    real item of every subset (a subset's "valid" entries, or its batch size)."""
    if "num_examples" in out:
        return int(out["num_examples"])
    count = 0
    for part in batch.values():
        if isinstance(part, dict):
            count += int(part["valid"].sum()) if "valid" in part else \
                next(v.shape[0] for v in part.values() if isinstance(v, torch.Tensor))
    if count <= 0:
        raise ValueError(f"no examples in an evaluation batch with keys {sorted(batch)}")
    return count


def training_step(task: Task, batch: dict, seed: int) -> tuple[int, AnalyticFlops]:
    """(counted, analytic) FLOPs of one micro-batch: forward, aux loss, backward, in train mode."""
    model = task.model
    model.train()
    torch.manual_seed(seed)

    def step() -> None:
        out = model(batch)
        # as the trainer adds it: None where no term was measured (Soft MoE, no balancing loss configured)
        extra = task.extra_loss(model) if task.extra_loss is not None else None
        loss = out["loss"] if extra is None else out["loss"] + extra
        loss.backward()

    counted, analytic = measure_flops(model, step)
    model.zero_grad(set_to_none=True)
    return counted, analytic


def evaluation_pass(task: Task, batch: dict) -> tuple[int, AnalyticFlops, int]:
    """(counted, analytic, examples) of one evaluation batch's forward (eval mode, no_grad)."""
    model = task.model
    model.eval()
    outputs: dict[str, Any] = {}

    def forward() -> None:
        with torch.no_grad():
            outputs.update(model(batch))

    counted, analytic = measure_flops(model, forward)
    return counted, analytic, batch_examples(batch, outputs)


def account_run(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Parameters and FLOPs of the run in ``run_dir`` (see the module docstring for the keys)."""
    run_dir = Path(run_dir)
    command = run_command(run_dir)
    cfg = run_config(run_dir, overrides)
    tag_dir = checkpoint_dir(run_dir, cfg.eval.checkpoint)
    state = json.loads((tag_dir / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
    task = build_task(cfg, command, tag_dir)
    scale = state["world_size"] * cfg.train.grad_accum

    train_batch = next(iterate(task.train_batches, 0, 0))
    train_counted, train_analytic = training_step(task, train_batch, cfg.seed)
    eval_counted, eval_analytic, examples = evaluation_pass(task, next(iterate(task.eval_batches, 0, 0)))
    tokens = task.count_tokens(train_batch) * scale
    result: dict[str, float] = {
        **parameter_counts(task.model),
        "train_flops_per_step": train_counted * scale,
        "train_flops_per_step_analytic": train_analytic.training_total * scale,
        "train_flops_ratio": train_counted / train_analytic.training_total,
        "infer_flops_per_example": eval_counted / examples,
        "infer_flops_per_example_analytic": eval_analytic.forward_total / examples,
        "tokens_per_step": tokens,
        "flops_per_token": train_counted * scale / tokens,
        "world_size": state["world_size"],
        "grad_accum": cfg.train.grad_accum,
    }
    training = train_analytic.training
    result.update({f"flops_breakdown.{c}": training[c] * scale for c in CATEGORIES})
    return result


def write_accounting(run_dir: str | os.PathLike, accounting: dict[str, float]) -> Path:
    """RUN_DIR/accounting.json, replaced atomically."""
    out = Path(run_dir) / ACCOUNTING_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(accounting, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmoe.study.accounting",
                                     description="Count a run's parameters and FLOPs; writes RUN_DIR/accounting.json.")
    parser.add_argument("run_dir", help="a run directory that `vlmoe pretrain` or `vlmoe finetune` wrote")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.checkpoint=best")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # building prints progress; stdout is the JSON alone
            accounting = account_run(args.run_dir, args.overrides)
    except (UsageError, DataError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    write_accounting(args.run_dir, accounting)
    print(json.dumps(accounting, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
