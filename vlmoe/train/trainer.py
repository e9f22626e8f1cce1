"""The one DeepSpeed training loop. Every command (pretrain, finetune) is a Task run by it.

Read top to bottom: join the job, set up the run directory, build the task (data and
model), wrap it in a DeepSpeed engine, resume from the last committed checkpoint, then
step / log / evaluate / save until ``train.steps``. An evaluation that improves the task's
main metric also saves, and that checkpoint is committed as ``checkpoints/best``.
"""
from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from vlmoe.allocator import active_allocator
from vlmoe.config import ConfigError, RunConfig, merge_dicts
from vlmoe.data.loader import StepBatches, iterate, to_device
from vlmoe.moe import moe_layers
from vlmoe.moe.deepspeed_bridge import moe_param_groups, prepare_for_deepspeed
from vlmoe.train import checkpoint
from vlmoe.train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from vlmoe.train.logs import run_header, run_summary, show_warnings_once
from vlmoe.train.metrics import MetricsLog
from vlmoe.train.nonfinite import NonFiniteError, local_weights_finite, nonfinite_outputs
from vlmoe.train.preemption import Preempted, preemption_signals
from vlmoe.train.run_dir import check_rerun, describe, record_run
from vlmoe.train.schedule import lr_at


@dataclass
class Task:
    """What a command trains: the model, its batches, and its hooks.

    ``model(batch)`` returns a dict with "loss" and any scalar metrics to log ("num_examples"
    weighs evaluation batches).
    ``extra_loss(model)``: a term added to each micro-batch's loss after its forward (the MoE
    layers' auxiliary losses), logged as "aux_loss"; None where nothing was measured (evaluation).
    ``extra_metrics(model)``: metrics gathered during forward passes of the model's current mode,
    read at log steps (training) and after each evaluation (MoE routing statistics).
    ``evaluate_outputs(outputs, device)``: validation metrics from the model's outputs over this
    rank's share of the evaluation pass, where batch means are not the metric (retrieval); collective.
    ``main_metric``: the validation metric (higher is better, or lower when ``lower_is_better``)
    whose best value commits ``checkpoints/best``.
    ``exclude_frozen``: checkpoints leave out frozen parameters (they come from the base).
    ``export(model, directory, step)``: writes the run's portable weights (an adapter, or the
    whole model) into a checkpoint before it is committed; collective. The newest is published as RUN_DIR/<export_name>.
    ``baseline``: metrics of a trivial predictor, logged at step 0 (majority class, chance).
    ``identity_files``: JSON files that pin what the run is built on (``base.json``), written into
    the run directory with its config once the task and its engine are built.
    """

    model: torch.nn.Module
    train_batches: StepBatches
    eval_batches: Optional[StepBatches]
    count_tokens: Callable[[dict], int]
    exclude_frozen: bool = False
    export: Optional[Callable[[torch.nn.Module, Path, int], None]] = None
    export_name: Optional[str] = None
    extra_loss: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None
    extra_metrics: Optional[Callable[[torch.nn.Module], dict[str, float]]] = None
    evaluate_outputs: Optional[Callable[[list[dict], torch.device], dict[str, float]]] = None
    main_metric: str = "loss"
    lower_is_better: bool = True
    baseline: dict = field(default_factory=dict)
    identity_files: dict[str, dict] = field(default_factory=dict)


def _seed_step(seed: int, step: int, micro: int, rank: int) -> None:
    # Stochastic depth and any other torch randomness depend on (seed, step, rank) only,
    # so a resumed run draws what the uninterrupted run drew without saving RNG state.
    digest = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """DeepSpeed settings generated from the run config; ``cfg.deepspeed`` overrides them."""
    t = cfg.train
    ds = {
        # Our micro-batch is a dict of subsets; DeepSpeed uses this only for its own counters.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                  "weight_decay": t.weight_decay, "torch_adam": True,
                                                  "fused": _fused_adamw_supported()}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.ds_config:
        ds = merge_dicts(ds, _read_ds_file(cfg.ds_config))
    return merge_dicts(ds, cfg.deepspeed)


def _fused_adamw_supported() -> bool:
    """torch's fused AdamW (one pass over each tensor, no temporaries) where it has a kernel for this
    accelerator. On CPU the unfused step allocates a temporary per operation on ZeRO's flat
    partitions, whose page faults made it a third of a sparse model's step (scripts/bench_pretrain.py)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() in ("cpu", "cuda")


def _read_ds_file(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        path = Path(__file__).resolve().parents[2] / "ds_configs" / (name if name.endswith(".json") else name + ".json")
    if not path.is_file():
        raise ConfigError(f"config key 'ds_config': file '{name}' not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'ds_config': '{path}' is not valid JSON: {exc}") from exc


# parameters named so are never decayed: the experts' stacked biases ([E, 1, d]) are not matrices either
NO_DECAY_NAMES = ("cls_token", "mask_token", "positions", "b_in", "b_out")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on biases (the MoE experts' too), norms, the
    [CLS]/[MASK] tokens and the position embeddings (as BEiT-3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def _scalars(out: dict) -> dict[str, float]:
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()
            if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float))}


def _forward(engine, batch: dict, info: DistInfo, task: Task) -> dict:
    out = engine(to_device(batch, info.device, _dtype(engine)))
    aux_loss = task.extra_loss(engine.module) if task.extra_loss is not None else None
    if aux_loss is not None:
        out["aux_loss"] = aux_loss
        out["loss"] = out["loss"] + aux_loss
    return out


@torch.no_grad()
def evaluate(engine, task: Task, info: DistInfo) -> dict[str, float]:
    """Validation metrics over all of ``task.eval_batches``, named "val/...": the task's own
    (``evaluate_outputs``), or the model's scalar outputs averaged over batches and ranks, each
    batch weighted by its "num_examples" output where the model gives one."""
    engine.eval()
    sums: dict[str, float] = {}
    outputs: list[dict] = []
    counted = "num_batches"
    for batch in iterate(task.eval_batches, 0, 0):
        out = _forward(engine, batch, info, task)
        if task.evaluate_outputs is not None:
            outputs.append({k: v.detach() for k, v in out.items() if torch.is_tensor(v)})
            continue
        scalars = _scalars(out)
        if "num_examples" in scalars:
            counted = "num_examples"
        weight = scalars.pop("num_examples", 1.0)
        for key, value in {**scalars, "num_examples": 1.0}.items():
            sums[key] = sums.get(key, 0.0) + value * weight
    if task.evaluate_outputs is not None:
        values = task.evaluate_outputs(outputs, info.device)
    else:
        totals = all_reduce_mean(sums, info.device)  # means of sums: the common factor cancels below
        count = totals.pop("num_examples")
        values = {k: v / count for k, v in totals.items()}
        values[counted] = round(count * info.world_size)  # examples (or batches) over all ranks
    if task.extra_metrics is not None:  # e.g. routing at the evaluation capacity factor
        values.update(all_reduce_mean(task.extra_metrics(engine.module), info.device))
    engine.train()
    _forget_zero3_trace(engine)
    return {f"val/{k}": v for k, v in values.items()}


def _ep_size(cfg: RunConfig) -> int:
    return cfg.moe.ep_size if cfg.moe is not None else 1


def _forget_zero3_trace(engine) -> None:
    # ZeRO-3 prefetches parameters along the module order it traced in a training step; a
    # trace that lived through forward-only evaluation can mismatch the next backward
    # ("tracing error ... expected the next N parameters"). Re-record it instead.
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:
        offload.get_param_coordinator()._invalidate_trace()


@dataclass
class EngineSetup:
    """A task's model in its DeepSpeed engine, and what saving and loading its checkpoints need."""

    engine: object
    zero_stage: int
    topology: dict
    experts_file: bool  # experts go to their own EP-independent file, unless frozen ones come from the base
    moe: bool


def build_engine(cfg: RunConfig, task: Task, info: DistInfo, ds_config: dict) -> EngineSetup:
    """Wrap the task's model in a DeepSpeed engine (expert parallelism and ZeRO as configured)."""
    import deepspeed

    zero_stage = ds_config["zero_optimization"].get("stage", 0)
    groups = param_groups(task.model, cfg.train.weight_decay)
    layers = moe_layers(task.model)
    trainable_experts = any(p.requires_grad for layer in layers for p in layer.experts.parameters())
    if layers:  # expert grads reduce within their expert-data-parallel group only
        prepare_for_deepspeed(task.model, zero_stage)
        groups = moe_param_groups(groups)
    engine, _, _, _ = deepspeed.initialize(model=task.model, model_parameters=groups, config=ds_config)
    checkpoint.install_safe_loading(engine)
    return EngineSetup(engine, zero_stage, {"world_size": info.world_size, "ep_size": _ep_size(cfg)},
                       experts_file=bool(layers) and (trainable_experts or not task.exclude_frozen), moe=bool(layers))


def _max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` of all ranks, on every rank (so that all ranks take the same branch)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    buffer = torch.tensor([float(value)], device=device)
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.MAX)
    return buffer.item()


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    return _max_over_ranks(float(flag), device) > 0


def _last_good(ckpt_dir: Path) -> str:
    tag = checkpoint.committed_tag(ckpt_dir)
    return f"last_good is still {ckpt_dir / tag}" if tag else "no checkpoint was committed"


def _nonfinite_loss(t, step: int, bad: list[str], skips: int) -> int:
    """The skip count after a non-finite loss at ``step``; raises under ``stop`` or past the limit."""
    what = f"non-finite {', '.join(bad) or 'loss on another rank'}"
    if t.on_nonfinite == "stop":
        raise NonFiniteError(f"step {step}: {what}; stopped before the update (train.on_nonfinite=stop)")
    if skips + 1 > t.max_nonfinite_skips:
        raise NonFiniteError(f"step {step}: {what}, the {skips + 1}th skipped step (train.max_nonfinite_skips="
                             f"{t.max_nonfinite_skips}); stopped")
    print(f"warning: step {step}: {what}; its update skipped ({skips + 1} of at most {t.max_nonfinite_skips})",
          flush=True)
    return skips + 1


def _check_grad_norm(engine, step: int, info: DistInfo) -> None:
    # A non-finite gradient of a finite loss has reached the weights already (only fp16's loss
    # scaler skips such steps, and counts them): stop under either policy.
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    norm = float(norm) if norm is not None else 0.0
    if not engine.fp16_enabled() and _on_any_rank(not math.isfinite(norm), info.device):
        raise NonFiniteError(f"step {step}: non-finite gradient norm {norm}; stopped")


def _improves(value: Optional[float], best: Optional[float], lower_is_better: bool) -> bool:
    if value is None or value != value:  # absent or NaN
        return False
    return best is None or (value < best if lower_is_better else value > best)


def run(cfg: RunConfig, build_task: Callable[[RunConfig, DistInfo, dict], Task], command: str,
        origin: str = "") -> Path:
    """Train ``build_task``'s task under ``cfg``; resumes if the run directory has a checkpoint.

    ``build_task(cfg, info, ds_config)`` builds its model inside
    ``vlmoe.zero3.partitioned_construction(ds_config)`` (``hf_partitioning`` for Hugging Face
    models) and loads weights outside it, so that under ZeRO-3 no rank holds the model whole.
    ``command`` ("pretrain", "finetune") is recorded in RUN_DIR/run.json for ``vlmoe eval``;
    ``origin`` (the config and overrides it came from) is named in the run's first line.
    """
    info = init_distributed(cfg.train.dist_timeout_s, shm_comm=cfg.train.shm_comm)
    show_warnings_once(info.is_main)
    _check_precision(cfg.train.precision)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    rerun = check_rerun(cfg, command)  # reads the run directory only

    ds_config = deepspeed_config(cfg, info.world_size)
    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed, on any launcher
    task = build_task(cfg, info, ds_config)
    setup = build_engine(cfg, task, info, ds_config)
    engine, t = setup.engine, cfg.train
    # Every check has passed: now the run directory is written. Every rank has read it (the
    # rerun and base checks) before rank 0 writes, and no rank goes on before it has.
    barrier()
    if info.is_main:
        record_run(cfg, command, task.identity_files)
        warning = describe(rerun, cfg)
        if warning:
            print(warning, flush=True)
    barrier()

    start_step, nonfinite_skips = 0, 0
    tag = checkpoint.committed_tag(ckpt_dir)
    if tag is not None:
        state = checkpoint.load(engine, ckpt_dir, tag, strict=not (task.exclude_frozen or setup.moe),
                                topology=setup.topology, experts=setup.experts_file)
        start_step, nonfinite_skips = state["step"], state.get("nonfinite_skips", 0)
        if info.is_main:
            print(f"resuming from {ckpt_dir / tag} at step {start_step}", flush=True)
    if info.is_main:
        print(run_header(command, cfg.run_dir, origin, info.world_size, setup.zero_stage, _ep_size(cfg),
                         "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
                         start_step, t.steps, active_allocator()), flush=True)
    main_key = f"val/{task.main_metric}"
    best = (checkpoint.best_state(ckpt_dir) or {}).get("val", {}).get(main_key)

    log = MetricsLog(run_dir, start_step, enabled=info.is_main)
    if start_step == 0 and task.eval_batches is not None and t.eval_at_start:  # the untrained head
        log.log(0, {**{f"baseline/{k}": v for k, v in task.baseline.items()}, **evaluate(engine, task, info)})
    progress = _progress_bar(cfg, start_step, info)
    batches = iterate(task.train_batches, start_step * t.grad_accum, cfg.data.num_workers)
    window_start, window_tokens = time.perf_counter(), 0
    invocation_start, invocation_tokens = window_start, 0
    # wall-clock of training so far ("time_s", logged on rank 0's clock): a resumed run goes on from its last record
    clock_start = window_start - all_reduce_mean({"t": log.resumed_time_s}, info.device)["t"] * info.world_size

    def save(step: int, val: dict, improved: bool, nonfinite_skips: int) -> None:
        if _on_any_rank(not local_weights_finite(engine.module), info.device):
            raise NonFiniteError(f"step {step}: the weights are not finite (the update of a finite loss made "
                                 f"them so); nothing saved, {_last_good(ckpt_dir)}")
        export = None if task.export is None else partial(task.export, engine.module, step=step)
        state = {"step": step, **setup.topology, "val": val, "nonfinite_skips": nonfinite_skips}
        checkpoint.save(engine, ckpt_dir, step, state, rank=info.rank, world_size=info.world_size,
                        zero_stage=setup.zero_stage, keep=t.keep_checkpoints, exclude_frozen=task.exclude_frozen,
                        experts=setup.experts_file, export=export, export_name=task.export_name, best=improved)

    with preemption_signals() as preemption:
        for step in range(start_step, t.steps):
            lr = lr_at(step, peak_lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            step_metrics: dict[str, float] = {}
            done = step + 1
            for micro in range(t.grad_accum):
                _seed_step(cfg.seed, step, micro, info.rank)
                batch = next(batches)
                tokens = task.count_tokens(batch)
                window_tokens += tokens
                invocation_tokens += tokens
                out = _forward(engine, batch, info, task)
                bad = nonfinite_outputs(out)
                if _on_any_rank(bool(bad), info.device):  # before the update: the weights stay as they were
                    nonfinite_skips = _nonfinite_loss(t, done, bad, nonfinite_skips)
                    step_metrics = {"nonfinite_skips": nonfinite_skips}
                    break
                engine.backward(out["loss"])
                engine.step()
                for key, value in _scalars(out).items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value / t.grad_accum
            step_metrics.pop("num_examples", None)
            _check_grad_norm(engine, done, info)
            if done % t.log_every == 0 or done == t.steps:
                if task.extra_metrics is not None:
                    step_metrics.update(task.extra_metrics(engine.module))
                elapsed = time.perf_counter() - window_start
                step_metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                step_metrics["peak_mem_mb"] = peak_memory_mb(info.device)
                values = all_reduce_mean(step_metrics, info.device)
                values["tokens_per_s"] *= info.world_size  # each rank counted its own tokens
                values["lr"] = lr
                values["time_s"] = time.perf_counter() - clock_start
                if engine.fp16_enabled():  # overflow steps the loss scaler skipped: counted, not failures
                    values["fp16_overflow_skips"] = engine.skipped_steps
                log.log(done, values)
                progress.set_postfix(loss=f"{values.get('loss', math.nan):.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
                window_start, window_tokens = time.perf_counter(), 0
            val: dict[str, float] = {}
            if task.eval_batches is not None and (done % t.eval_every == 0 or done == t.steps):
                val = evaluate(engine, task, info)
                log.log(done, {**val, "time_s": time.perf_counter() - clock_start})
            improved = _improves(val.get(main_key), best, task.lower_is_better)
            saved = done % t.save_every == 0 or done == t.steps or improved
            if saved:
                save(done, val, improved, nonfinite_skips)
            if improved:
                best = val[main_key]
            progress.update(1)
            signum = int(_max_over_ranks(preemption.received or 0, info.device))  # a signal on any rank stops all
            if signum:
                if not saved:
                    save(done, val, False, nonfinite_skips)
                raise Preempted(f"step {done}: {signal.Signals(signum).name}; checkpoint "
                                f"{checkpoint.tag_for(done)} committed; run the same command to resume")

    progress.close()
    log.close()
    seconds = time.perf_counter() - invocation_start
    tokens = all_reduce_mean({"tokens": invocation_tokens}, info.device)["tokens"] * info.world_size
    if info.is_main:
        print(f"{run_summary(start_step, t.steps, seconds, tokens)}\n  checkpoint: {ckpt_dir / checkpoint.committed_tag(ckpt_dir)}\n"
              f"  metrics:    {run_dir / 'metrics.jsonl'}\n  tensorboard: {run_dir / 'tensorboard'}", flush=True)
    return run_dir


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated on the accelerator, resident (max RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check_precision(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(f"config key 'train.precision': {precision} is not supported by DeepSpeed's "
                          f"{accelerator.device_name()} accelerator on this machine; use bf16 or fp32")


def _progress_bar(cfg: RunConfig, start_step: int, info: DistInfo):
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                disable=not (info.is_main and cfg.train.progress_bar))
