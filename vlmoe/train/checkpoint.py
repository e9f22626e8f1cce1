"""Checkpoints that survive crashes: DeepSpeed shards plus our own commit pointer.

DeepSpeed writes its ``latest`` tag before every rank has finished writing its shards, so
after a crash ``latest`` can name a torn checkpoint. We never read it. A save is committed
only when every rank has returned from ``save_checkpoint``, has left a marker, and rank 0
has found every expected shard; then rank 0 replaces ``checkpoints/last_good`` atomically
(temp file, fsync, ``os.replace``). Resume reads only that pointer. ``checkpoints/best`` is
committed the same way to the checkpoint with the best validation metric, and rotation never
deletes it.

Each committed checkpoint also holds the run's portable export (``adapter/`` of a fine-tuning
run, ``model/`` of a pretraining run), which does not depend on the world size, EP size or
ZeRO stage; the newest is published as ``RUN_DIR/adapter`` or ``RUN_DIR/model`` (hard links).

Loads go through ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from vlmoe.moe.deepspeed_bridge import load_experts_into_engine
from vlmoe.moe.expert_checkpoint import save_experts

POINTER = "last_good"
BEST_POINTER = "best"
STATE_FILE = "trainer_state.json"
EXPERTS_FILE = "experts.safetensors"
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message names the path."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step a checkpoint tag names ('step_00000600' -> 600)."""
    match = _TAG.match(tag)
    if match is None:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag like 'step_00000100'")
    return int(match.group(1))


def install_safe_loading(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = SafeTorchCheckpointEngine
    _allow_deepspeed_globals()


def _allow_deepspeed_globals() -> None:
    # Plain containers and enums DeepSpeed pickles beside the tensors in its state files.
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals(
        [collections.OrderedDict, LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]
    )


def _expected_shards(tag_dir: Path, world_size: int, zero_stage: int, experts: bool,
                     export_name: Optional[str] = None) -> list[str]:
    """Names of missing files, by DeepSpeed's naming (empty when the save is complete)."""
    required = [STATE_FILE] + ([EXPERTS_FILE] if experts else []) + ([export_name] if export_name else [])
    missing = [name for name in required if not (tag_dir / name).exists()]
    if not glob.glob(str(tag_dir / "*model_states.pt")):
        missing.append("*model_states.pt")
    if zero_stage > 0:
        for rank in range(world_size):
            pattern = f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            if not glob.glob(str(tag_dir / pattern)):
                missing.append(pattern)
    for rank in range(world_size):
        if not (tag_dir / f".rank{rank}.done").exists():
            missing.append(f".rank{rank}.done")
    return missing


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(engine: Any, root: Path, step: int, state: dict, *, rank: int, world_size: int, zero_stage: int,
         keep: int, exclude_frozen: bool = False, experts: bool = False,
         export: Optional[Callable[[Path], None]] = None, export_name: Optional[str] = None,
         best: bool = False) -> Path:
    """Save a checkpoint for ``step`` on every rank and commit it. Collective: all ranks call.

    ``state`` is the trainer's own state (JSON-able, small: step, world and EP size, the
    validation metrics of this step); rank 0 writes it to ``trainer_state.json`` in the tag
    directory. ``experts``: the model has MoE layers, whose experts go to one
    EP-size-independent file (``experts.safetensors``). ``export(tag_dir)`` (collective) writes
    ``tag_dir/<export_name>``, published as ``RUN_DIR/<export_name>`` once committed. ``best``:
    this checkpoint also becomes ``checkpoints/best`` (before older ones are pruned). Returns the
    committed tag directory.
    """
    from vlmoe.train.distributed import barrier

    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():  # a torn earlier attempt at this very step
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False, exclude_frozen_parameters=exclude_frozen)
    if rank == 0:
        (tag_dir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    if experts:
        save_experts(engine.module, tag_dir / EXPERTS_FILE)
    if export is not None:
        export(tag_dir)
    (tag_dir / f".rank{rank}.done").touch()
    barrier()
    missing = _expected_shards(tag_dir, world_size, zero_stage, experts, export_name) if rank == 0 else []
    complete = torch.tensor([0.0 if missing else 1.0], device=engine.device)
    torch.distributed.broadcast(complete, src=0)  # every rank fails together, none hangs
    if not complete.item():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete after save (missing {missing or 'shards'}); "
                              f"the previous checkpoint stays committed in {root / POINTER}")
    if rank == 0:
        _write_atomic(root / POINTER, tag + "\n")
        if best:
            _write_atomic(root / BEST_POINTER, tag + "\n")
        _prune(root, keep, keep_tag=tag)
        if export_name is not None:
            publish(tag_dir / export_name, root.parent / export_name)
    barrier()
    return tag_dir


def best_state(root: Path) -> Optional[dict]:
    """The trainer state (with its "val" metrics) of the checkpoint ``best`` names, or None; a
    pointer to a checkpoint that is gone (deleted by hand) is ignored, with a warning."""
    try:
        tag = committed_tag(root, BEST_POINTER)
    except CheckpointError as exc:
        print(f"warning: {exc}; the best checkpoint is chosen again from here on", flush=True)
        return None
    if tag is None or not (root / tag / STATE_FILE).is_file():
        return None
    return json.loads((root / tag / STATE_FILE).read_text(encoding="utf-8"))


def publish(source: Path, target: Path) -> None:
    """Make ``target`` a copy of the folder ``source`` made of hard links (no extra disk), replacing
    the old one by renames, so that a reader never sees a half-written folder."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=os.link)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep: int, keep_tag: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
    newest_committed = tags.index(keep_tag)
    best = (root / BEST_POINTER).read_text(encoding="utf-8").strip() if (root / BEST_POINTER).exists() else None
    # older committed checkpoints beyond `keep` (never the best); anything newer than the pointer is a torn save
    stale = tags[: max(0, newest_committed + 1 - keep)] + tags[newest_committed + 1:]
    for name in stale:
        if name != best:
            shutil.rmtree(root / name, ignore_errors=True)


def committed_tag(root: Path, pointer_name: str = POINTER) -> Optional[str]:
    """The tag named by a pointer (``last_good`` or ``best``), or None if it was never committed."""
    pointer = root / pointer_name
    if not pointer.exists():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not _TAG.match(tag):
        raise CheckpointError(f"{pointer} holds {tag!r}, not a checkpoint tag like 'step_00000100'")
    if not (root / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag} but {root / tag} does not exist")
    return tag


def load(engine: Any, root: Path, tag: str, *, strict: bool = True, topology: Optional[dict] = None,
         experts: bool = False) -> dict:
    """Load the committed checkpoint ``tag`` into ``engine``; returns the trainer's state.

    ``strict=False`` for checkpoints saved without frozen parameters (fine-tuning) or
    without experts (MoE: they come from ``experts.safetensors``). When ``topology`` (world
    and EP size) differs from the saved one, ZeRO's partitioned optimizer state cannot be
    mapped and is not loaded: weights resume exactly, Adam moments restart (a warning says so).
    """
    state_file = root / tag / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {root / tag} is not a committed vlmoe checkpoint")
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    same_topology = topology is None or all(saved.get(k, v) == v for k, v in topology.items())
    if not same_topology:
        print(f"warning: {root / tag} was saved with {({k: saved.get(k) for k in topology})}, this run has "
              f"{topology}: loading weights only; optimizer moments restart", flush=True)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=strict,
                                     load_optimizer_states=same_topology, load_lr_scheduler_states=same_topology)
    if path is None:
        raise CheckpointError(f"could not load checkpoint {root / tag}")
    if experts:
        load_experts_into_engine(engine, str(root / tag / EXPERTS_FILE))
    return saved
