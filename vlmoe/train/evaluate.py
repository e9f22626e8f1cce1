"""``vlmoe eval RUN_DIR [key=value ...]``: evaluate a run's committed checkpoint as it was evaluated in training.

The run's own config (RUN_DIR/config.yaml, with the overrides) builds the same task, data and
model; the weights come from the checkpoint's portable export (a fine-tuning run's ``adapter/``
on its base, a pretraining run's ``model/``), so the world size, EP size and ZeRO stage may
differ from the run's. ``eval.checkpoint`` picks ``last_good`` (default), ``best`` or a tag.
Fine-tuning runs are evaluated on their task's validation split (``data.eval_max_examples``
as in training; ``data.eval_max_examples=null`` for all of it), pretraining runs on their
objectives. Prints a table; writes RUN_DIR/eval/results.json (metric -> value, plus "step",
"checkpoint" and "num_examples").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlmoe.config import ConfigError, load_config
from vlmoe.train import checkpoint
from vlmoe.train.distributed import init_distributed
from vlmoe.train.logs import show_warnings_once
from vlmoe.train.export import ADAPTER_DIR, MODEL_DIR
from vlmoe.train.run_dir import RUN_INFO_FILE
from vlmoe.train.trainer import _check_precision, build_engine, deepspeed_config, evaluate

RESULTS_FILE = Path("eval") / "results.json"
POINTERS = (checkpoint.POINTER, checkpoint.BEST_POINTER)


def checkpoint_dir(run_dir: Path, which: str) -> Path:
    """The committed checkpoint ``which`` ("last_good", "best" or a tag such as "step_00000200") names."""
    root = run_dir / "checkpoints"
    tag = checkpoint.committed_tag(root, which) if which in POINTERS else which
    if tag is None:
        raise ConfigError(f"config key 'eval.checkpoint': {run_dir} has no '{which}' checkpoint committed yet")
    if not (root / tag / checkpoint.STATE_FILE).is_file():
        tags = sorted(p.name for p in root.glob("step_*") if (p / checkpoint.STATE_FILE).is_file())
        raise ConfigError(f"config key 'eval.checkpoint': no committed checkpoint '{tag}' in {root} "
                          f"(have {tags}, or use {' / '.join(POINTERS)})")
    return root / tag


def evaluate_run(run_dir: str | os.PathLike, overrides: list[str]) -> dict:
    """Evaluate RUN_DIR's chosen checkpoint on every rank of the job; returns the results."""
    from vlmoe.train.finetune import build_finetune_task
    from vlmoe.train.pretrain import build_pretrain_task

    run_dir = Path(run_dir)
    info_file = run_dir / RUN_INFO_FILE
    if not info_file.is_file():
        raise ConfigError(f"'{run_dir}' is not a vlmoe run directory (no {RUN_INFO_FILE})")
    command = json.loads(info_file.read_text(encoding="utf-8"))["command"]
    cfg = load_config(str(run_dir / "config.yaml"), [*overrides, f"run_dir={run_dir}"])
    tag_dir = checkpoint_dir(run_dir, cfg.eval.checkpoint)

    info = init_distributed(cfg.train.dist_timeout_s, shm_comm=cfg.train.shm_comm)
    show_warnings_once(info.is_main)
    _check_precision(cfg.train.precision)
    ds_config = deepspeed_config(cfg, info.world_size)
    torch.manual_seed(cfg.seed)
    if command == "finetune":
        task = build_finetune_task(cfg, info, ds_config, adapter_dir=tag_dir / ADAPTER_DIR)
    else:
        task = build_pretrain_task(cfg, info, ds_config, model_dir=tag_dir / MODEL_DIR)
    setup = build_engine(cfg, task, info, ds_config)
    metrics = {key.removeprefix("val/"): value for key, value in evaluate(setup.engine, task, info).items()}
    state = json.loads((tag_dir / checkpoint.STATE_FILE).read_text(encoding="utf-8"))
    counts = {key: metrics.pop(key) for key in ("num_examples", "num_batches", "num_images", "num_texts")
              if key in metrics}
    results = {**metrics, "step": state["step"], "checkpoint": tag_dir.name, **counts}
    if info.is_main:
        out = run_dir / RESULTS_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(results_table(results, f"{run_dir} {tag_dir.name} ({command}, {info.world_size} rank(s))"), flush=True)
        print(f"  written to {out}", flush=True)
    return results


def results_table(results: dict, title: str) -> str:
    """Metric | value lines under a title."""
    width = max(len(k) for k in results)
    lines = [title, f"  {'metric'.ljust(width)}  value", f"  {'-' * width}  ------"]
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {key.ljust(width)}  {shown}")
    return "\n".join(lines)
