"""A run directory across reruns: what a rerun may change, checked before anything is written.

Rerunning a command into its run directory resumes from the committed checkpoint, so the new
config must build the same model and train the same parameters. ``check_rerun`` compares the
directory's saved config.yaml with the new one and refuses a change that cannot resume, names
(and lets pass, with a warning) a change of schedule or data that makes the resumed run differ
from an uninterrupted one, and refuses ``train.steps`` below the committed step. Only after the
task and its engine are built does ``record_run`` write the config and the run's identity files:
a command that fails leaves the directory as it was (or absent).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from vlmoe.config import ConfigError, RunConfig, dump_config, to_dict
from vlmoe.model.config import model_config
from vlmoe.train import checkpoint

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
# keys (and sections) whose change builds another model, another trainable set or another
# optimizer layout: the checkpoint cannot be loaded into it
CANNOT_CHANGE = ("model", "moe", "finetune.task", "finetune.method", "finetune.smola", "finetune.lora",
                 "finetune.generalist", "finetune.data", "finetune.max_answers", "finetune.max_items_per_source",
                 "finetune.val_fraction", "train.precision", "train.zero_stage")
# keys that do not change what is computed: cadence, logging, launch and where things are (a
# changed EP size loads the whole expert pools; the checkpoint loader warns that Adam restarts)
NO_EFFECT = ("run_dir", "moe.ep_size", "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
             "train.dist_timeout_s", "train.shm_comm", "train.progress_bar", "train.eval_at_start",
             "train.on_nonfinite", "train.max_nonfinite_skips", "data.num_workers", "data.eval_batches",
             "data.eval_max_examples", "finetune.base_run", "finetune.hf_model", "eval", "prepare")
# sections a command does not read
UNUSED = {"pretrain": ("finetune", "data.batch_size"),
          "finetune": ("pretrain", "data.image_batch", "data.text_batch", "data.pair_batch")}


@dataclass(frozen=True)
class Rerun:
    """What ``check_rerun`` found: the committed step to resume from (None: a fresh start) and the
    keys whose change makes the resumed run differ from an uninterrupted one."""

    step: Optional[int]
    changed_schedule: tuple[str, ...]


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differing_keys(old: Any, new: Any, one_sided: bool = False, prefix: str = "") -> Iterator[str]:
    """Dotted keys whose values differ between two config trees; a whole section where one side
    has none (null). A key on one side only differs where ``one_sided``; by default it comes from
    another vlmoe version (a key added since, at its default) and is no change."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = old.keys() | new.keys() if one_sided else old.keys() & new.keys()
        for key in sorted(keys):
            yield from differing_keys(old.get(key), new.get(key), one_sided, f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip(".")


def _saved_config(run_dir: Path) -> Optional[dict]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"run_dir '{run_dir}': {path} is not valid YAML ({exc}); use another run_dir") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"run_dir '{run_dir}': {path} is not a vlmoe config; use another run_dir")
    return tree


def _saved_command(run_dir: Path) -> Optional[str]:
    path = run_dir / RUN_INFO_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("command") if path.is_file() else None
    except (ValueError, AttributeError):
        return None


def check_rerun(cfg: RunConfig, command: str) -> Rerun:
    """Read-only checks of ``cfg.run_dir`` before a run writes anything into it.

    Raises ConfigError when the directory holds another command's run, when its committed
    checkpoint cannot be resumed under ``cfg`` (naming the run_dir and each differing key with
    both values), or when ``train.steps`` is below the committed step.
    """
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = checkpoint.committed_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        return Rerun(step=None, changed_schedule=())
    saved_command = _saved_command(run_dir)
    if saved_command not in (None, command):
        raise ConfigError(f"run_dir '{run_dir}' holds a {saved_command} run; this is {command}: use another run_dir")
    step = checkpoint.step_of(tag)
    saved = _saved_config(run_dir)
    changed: list[str] = []
    if saved is not None:
        old_tree, new_tree = _with_model_resolved(saved), _with_model_resolved(to_dict(cfg))
        changed = [key for key in differing_keys(old_tree, new_tree)
                   if not _under(key, NO_EFFECT + UNUSED.get(command, ()))]
        blocking = [key for key in changed if _under(key, CANNOT_CHANGE)]
        if blocking:
            details = "; ".join(f"{key}: {_value(old_tree, key)!r} -> {_value(new_tree, key)!r}" for key in blocking)
            raise ConfigError(f"run_dir '{run_dir}' holds a run at step {step} that this config cannot resume "
                              f"({details}); use another run_dir, or the run's own settings to resume it")
        changed = [key for key in changed if key not in blocking]
    if cfg.train.steps < step:
        raise ConfigError(f"config key 'train.steps' is {cfg.train.steps}, below step {step} of the checkpoint "
                          f"committed in run_dir '{run_dir}': set train.steps >= {step}, or use another run_dir")
    return Rerun(step=step, changed_schedule=tuple(changed))


def _with_model_resolved(tree: dict) -> dict:
    """The tree with its model section as the whole ModelConfig its preset and overrides make:
    a field left at the preset's value is compared as that value, not as absent."""
    section = tree.get("model")
    if not isinstance(section, dict):
        return tree
    overrides = {k: v for k, v in section.items() if k != "preset"}
    try:
        resolved = model_config(section.get("preset", "tiny"), **overrides).to_dict()
    except (TypeError, ValueError):  # a config another version wrote: compared as written
        return tree
    return {**tree, "model": {"preset": section.get("preset", "tiny"), **resolved}}


def _value(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def describe(rerun: Rerun, cfg: RunConfig) -> Optional[str]:
    """The warning for a resumed run whose schedule or data changed, or None."""
    if rerun.step is None or not rerun.changed_schedule:
        return None
    return (f"warning: resuming {cfg.run_dir} at step {rerun.step} with changed {', '.join(rerun.changed_schedule)}: "
            f"from here the run differs from an uninterrupted run of its first config")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def record_run(cfg: RunConfig, command: str, identity_files: dict[str, dict]) -> None:
    """Write the run's config, its command and the task's identity files (e.g. base.json) into
    the run directory; rank 0 only, after every check has passed."""
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG_FILE)
    _write_atomic(run_dir / RUN_INFO_FILE, json.dumps({"command": command}) + "\n")
    for name, content in identity_files.items():
        _write_atomic(run_dir / name, json.dumps(content, indent=2) + "\n")
