"""Whole pretraining steps (forward of MLM + MIM + VLM, MoE aux loss, backward, optimizer step, the
trainer's per-step checks and metrics) of the real pretraining model in DeepSpeed engines on 2 ranks:
dense against sparse MoE at several E and EP sizes and against Soft MoE, one step of each model in
turn, printed as median step times, tokens/s and ratios to dense; --profile adds a per-phase
breakdown of one sparse configuration's step (torch.profiler, rank 0).

    python scripts/bench_pretrain.py                              # launches itself on 2 ranks
    deepspeed --num_gpus 2 scripts/bench_pretrain.py              # one launch under a launcher
    python scripts/bench_pretrain.py --steps 10 --experts 8:1,8,32 --soft 8 --profile
    python scripts/bench_pretrain.py --profile --profile-config 8:1 --log-every 0
    python scripts/bench_pretrain.py --dim 192 --ffn-dim 768 --heads 3   # small enough for E=128 on a 24 GB box
    python scripts/bench_pretrain.py --device cuda                # 2 GPUs (nccl), each rank on its own

--experts lists sparse configurations as E or E:EP (a bare E runs at EP = the world size); --soft
likewise for Soft MoE ('' = none), with --soft-slots slots per expert and example (0: about one
slot per image token, (patches + 1) / E). The shape defaults to SMALL's backbone (dim 384, FFN 1536,
depth 8, 6 heads) at 64-pixel images of 8-pixel patches and 32-token texts, MoE in the V- and T-FFNs
of every second block (placement "all"), fp32, ZeRO stage 1 (--zero-stage): a shape where the FFN GEMMs
dominate the dense step. On 2 CPU cores a dense step of the default batch takes ~10 s, hence the few steps.

Memory (CPU): every engine of a launch lives until its end (DeepSpeed's gradient hooks keep an
engine alive), so `python scripts/bench_pretrain.py` splits the configurations into launches whose
engines fit in memory together, each with its own dense baseline (its ratios are to that one), and
skips a configuration that fits in none (E=128 at the default shape needs ~16 GiB per rank); under a
launcher the script runs one launch and leaves out what does not fit in it.

Batches come from the real PretrainCollator (MLM 15%, block-wise MIM 40%, VLM 50% / 40%) on
synthetic examples: texts are id strings of --min-text-len..--text-len ids (padded to the batch's
longest), read by a pass-through tokenizer with the real tokenizer's special ids, images are smooth
random pixels coded by a k-means visual tokenizer with random centroids. Every model sees the same
batches and the same random draws (router noise, stochastic depth) at the same step.

Each step is what the trainer's loop runs (vlmoe/train/trainer.py): forward, + collect_aux_loss, the
non-finite check, engine.backward, engine.step, the gradient-norm check and, every --log-every
steps (default: each, 0 = never), collect_metrics and the all-reduce of the step's metrics; the
"no-metrics" column subtracts that collection from each step (the layers' own statistics in the
forward stay; the profile shows them). The profile attributes each instant of the step on rank 0's
thread to the innermost of the script's scopes (bench.*) and the MoE layers' ("vlmoe.moe.router",
".dispatch", ".experts", ".combine", ".all_to_all", ".metrics"), and each backward node to the phase
of the forward op that made it (autograd sequence numbers), and each operator run directly in the
optimizer step to what it does (the torch optimizer's update; DeepSpeed's gradient norm, flattening,
clipping and copy back), so the phases sum to the profiled step.
MoE scopes missing from vlmoe/moe/ leave their work in "rest of model". On CUDA the phases are host
time (run with CUDA_LAUNCH_BLOCKING=1 to make them device time too).
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vlmoe.allocator import active_allocator, use_tcmalloc

if __name__ == "__main__":  # before torch loads: measure on the allocator `vlmoe` runs on (vlmoe/allocator.py)
    use_tcmalloc()

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_device, beside this file
from bench_device import add_device_option, bench_device  # noqa: E402

# Expected bytes per parameter on its rank: fp32 weight, gradient, ZeRO's fp32 partition and the
# two AdamW moments (an upper bound: ZeRO-1 splits the dense parameters' states over ranks).
BYTES_PER_PARAM = 20
# activations kept for backward, in floats per row of hidden states, block, and unit of dim / ffn_dim
ACT_PER_DIM, ACT_PER_FFN = 16, 4


# ---------------------------------------------------------------- configurations and launch

@dataclass(frozen=True)
class Variant:
    """One model of the comparison: dense, sparse (E experts over EP ranks) or soft."""

    kind: str  # "dense" | "sparse" | "soft"
    experts: int = 0
    ep: int = 1

    @property
    def name(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind} E={self.experts} EP={self.ep}"


def parse_variants(spec: str, kind: str, world: int) -> list[Variant]:
    """'8:1,8,32' -> sparse E=8 EP=1, E=8 EP=world, E=32 EP=world."""
    variants = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        experts, _, ep = item.partition(":")
        variants.append(Variant(kind, int(experts), int(ep) if ep else world))
    return variants


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="ranks to launch when not under a launcher")
    p.add_argument("--steps", type=int, default=3, help="measured steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=2,
                   help="warm-up steps per model (interleaved, not timed; the first allocates the optimizer states, "
                        "and the allocator's heap grows over the first few: with 1, E=128's first timed steps ran "
                        "2.6x its steady step)")
    p.add_argument("--experts", default="8:1,8:2,32:2,128:2", help="sparse configurations, E or E:EP, comma-separated")
    p.add_argument("--soft", default="8", help="Soft MoE configurations, E or E:EP ('' = none)")
    p.add_argument("--soft-slots", type=int, default=0, help="Soft MoE slots per expert (0: (patches + 1) / E)")
    p.add_argument("--capacity-factor", type=float, default=1.05)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--ffn-dim", type=int, default=1536)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--text-len", type=int, default=32, help="max text length (ids, [T_CLS] and [T_SEP] included)")
    p.add_argument("--min-text-len", type=int, default=8,
                   help="shortest synthetic text (a batch's texts are padded to its longest)")
    p.add_argument("--vocab", type=int, default=8192, help="text vocabulary (the tied embedding and MLM head)")
    p.add_argument("--codebook", type=int, default=8192, help="visual tokenizer codebook (the MIM head)")
    p.add_argument("--image-batch", type=int, default=32, help="per-rank images (MIM)")
    p.add_argument("--text-batch", type=int, default=32, help="per-rank texts (MLM)")
    p.add_argument("--pair-batch", type=int, default=32, help="per-rank image-text pairs (VLM)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per rank, cycled")
    p.add_argument("--log-every", type=int, default=1, help="collect MoE metrics every N steps (0 = never)")
    p.add_argument("--profile", action="store_true", help="profile --profile-config's steps and print their breakdown")
    p.add_argument("--profile-config", default="32:2",
                   help="the profiled configuration: sparse E[:EP], soft:E[:EP] or dense")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks on this node)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=1,
                   help="ZeRO stage of every engine (the sparse pretraining config's is 1)")
    p.add_argument("--memory-check", choices=("skip", "off"), default="skip",
                   help="split the configurations into launches that fit in memory, skip what fits in none "
                        "(off: all in one launch)")
    p.add_argument("--memory-gib", type=float, default=0.0,
                   help="memory for all ranks of this machine (default: 80%% of what /proc/meminfo says is available)")
    p.add_argument("--results", default="", help=argparse.SUPPRESS)  # rank 0 writes its times there (JSON)
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    add_device_option(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batches < 1 or args.profile_steps < 1:
        p.error("--steps, --batches and --profile-steps must be >= 1, --warmup >= 0")
    if not 2 <= args.min_text_len <= args.text_len:
        p.error("need 2 <= --min-text-len <= --text-len")
    if torch.device(args.device).type == "cuda":
        bench_device(p, args.device)  # says so plainly when torch sees no CUDA device
    return args


# ------------------------------------------------------------------------------- batches

class IdTextTokenizer:
    """The collator's text-tokenizer interface for synthetic texts that are already ids ("17 503 9"),
    with TextTokenizer's special ids ([PAD]=0, [T_CLS]=2, [T_SEP]=3, [MASK]=4)."""

    def __init__(self, vocab_size: int) -> None:
        from vlmoe.data.text_tokenizer import TextTokenizer

        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (TextTokenizer.pad_id, TextTokenizer.cls_id,
                                                               TextTokenizer.sep_id, TextTokenizer.mask_id)
        self.special_ids = TextTokenizer.special_ids
        self.vocab_size = vocab_size
        self.first_ordinary = max(self.special_ids) + 2  # above <unk> too

    def encode(self, text: str, max_len: int) -> list[int]:
        return [self.cls_id, *(int(t) for t in text.split()[:max_len - 2]), self.sep_id]


def make_batches(args: argparse.Namespace, model_cfg, rank: int) -> list[dict]:
    """`args.batches` pretraining batches of this rank, from the real collator on synthetic examples."""
    from vlmoe.config import PretrainConfig
    from vlmoe.data.collate import PretrainCollator
    from vlmoe.data.visual_tokenizer import KMeansVisualTokenizer

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    text_tok = IdTextTokenizer(model_cfg.vocab_size)
    centroids = torch.randn(model_cfg.codebook_size, 3 * model_cfg.patch_size ** 2, generator=gen)
    visual_tok = KMeansVisualTokenizer(centroids, model_cfg.patch_size)
    pre = PretrainConfig()
    collator = PretrainCollator(text_tok, visual_tok, max_text_len=model_cfg.max_text_len, mlm_prob=pre.mlm_prob,
                                mim_ratio=pre.mim_ratio, vlm_text_prob=pre.vlm_text_prob,
                                vlm_image_ratio=pre.vlm_image_ratio, seed=args.seed)
    side = model_cfg.image_size

    def text() -> str:
        length = int(torch.randint(args.min_text_len, args.text_len + 1, (), generator=gen)) - 2
        ids = torch.randint(text_tok.first_ordinary, model_cfg.vocab_size, (length,), generator=gen)
        return " ".join(str(int(i)) for i in ids)

    def pixels() -> torch.Tensor:
        # smooth random images (8x8 noise, upsampled): patches with structure, as photos have
        coarse = torch.rand(1, 3, 8, 8, generator=gen) * 2 - 1
        return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[0]

    batches = []
    for step in range(args.batches):
        examples = {}
        if args.image_batch:
            examples["image"] = [{"pixels": pixels()} for _ in range(args.image_batch)]
        if args.text_batch:
            examples["text"] = [{"text": text()} for _ in range(args.text_batch)]
        if args.pair_batch:
            examples["pair"] = [{"pixels": pixels(), "text": text()} for _ in range(args.pair_batch)]
        batches.append(collator(examples, step, rank))
    return batches


# ------------------------------------------------------------------------------- models

@dataclass
class Model:
    variant: Variant
    engine: object
    sparse: bool  # has MoE layers (sparse or soft)
    params: int  # on this rank
    times: list[float] = field(default_factory=list)  # seconds per measured step
    metric_times: list[float] = field(default_factory=list)  # of which metrics collection

    @property
    def name(self) -> str:
        return self.variant.name


def model_config_for(args: argparse.Namespace):
    from vlmoe.model.config import model_config

    return model_config("small", dim=args.dim, ffn_dim=args.ffn_dim, depth=args.depth, heads=args.heads,
                        vl_ffn_start=args.depth - 1, image_size=args.image_size, patch_size=args.patch_size,
                        max_text_len=args.text_len, vocab_size=args.vocab, codebook_size=args.codebook)


def moe_config_for(variant: Variant, args: argparse.Namespace, model_cfg):
    from vlmoe.moe.config import MoEConfig

    if variant.kind == "dense":
        return None
    if variant.kind == "soft":
        return MoEConfig(type="soft", num_experts=variant.experts, ep_size=variant.ep,
                         slots_per_expert=soft_slots(args, model_cfg, variant.experts))
    return MoEConfig(type="sparse", num_experts=variant.experts, ep_size=variant.ep,
                     capacity_factor=args.capacity_factor)


def soft_slots(args: argparse.Namespace, model_cfg, experts: int) -> int:
    return args.soft_slots or max(1, round((model_cfg.num_patches + 1) / experts))


def run_config_for(variant: Variant, args: argparse.Namespace, model_cfg):
    """The RunConfig the trainer would hold for this model: fp32, --zero-stage, the MoE section."""
    from vlmoe.config import ModelSection, RunConfig, TrainConfig

    train = TrainConfig(precision="fp32", zero_stage=args.zero_stage, shm_comm=False, progress_bar=False,
                        log_every=max(1, args.log_every))
    return RunConfig(seed=args.seed, model=ModelSection(preset="small", overrides={}), train=train,
                     moe=moe_config_for(variant, args, model_cfg))


def estimated_params(variant: Variant, args: argparse.Namespace, model_cfg, dense_params: int) -> int:
    """Parameters of this variant on one rank (the dense model's, with its MoE FFNs replaced)."""
    from vlmoe.moe.backbone import is_moe_block

    if variant.kind == "dense":
        return dense_params
    moe_cfg = moe_config_for(variant, args, model_cfg)
    below = model_cfg.vl_ffn_start if moe_cfg.placement == "lower" else model_cfg.depth
    layers = sum(is_moe_block(i, m, below, moe_cfg.every) for i in range(model_cfg.depth) for m in ("v", "t"))
    d, f = model_cfg.dim, model_cfg.ffn_dim
    ffn = 2 * d * f + d + f
    router = d * variant.experts * (moe_cfg.slots_per_expert if variant.kind == "soft" else 1)
    return dense_params + layers * (variant.experts // variant.ep * ffn + router - ffn)


def build_model(variant: Variant, args: argparse.Namespace, model_cfg, info) -> Model:
    """The pretraining model in its DeepSpeed engine, built as the trainer builds it."""
    from vlmoe.moe import collect_aux_loss, collect_metrics
    from vlmoe.train.pretrain import build_pretraining_model, count_tokens
    from vlmoe.train.trainer import Task, build_engine, deepspeed_config

    cfg = run_config_for(variant, args, model_cfg)
    ds_config = deepspeed_config(cfg, info.world_size)
    torch.manual_seed(cfg.seed)  # the same dense weights in every model, as the trainer seeds
    model = build_pretraining_model(model_cfg, cfg.moe, info.world_size)
    sparse = cfg.moe is not None
    task = Task(model=model, train_batches=None, eval_batches=None, count_tokens=count_tokens,
                extra_loss=collect_aux_loss if sparse else None, extra_metrics=collect_metrics if sparse else None)
    setup = build_engine(cfg, task, info, ds_config)
    setup.engine.train()
    return Model(variant, setup.engine, sparse, sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------- the step

def seed_step(seed: int, step: int, rank: int) -> None:
    """Randomness (router noise, stochastic depth) by (seed, step, rank), as the trainer seeds its
    single micro-step: the same in every model."""
    from vlmoe.train.trainer import _seed_step

    _seed_step(seed, step, 0, rank)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: Model, batch: dict, step: int, log: bool, info) -> tuple[float, float]:
    """One training step as the trainer's loop runs it; -> (seconds, of which metrics collection)."""
    from torch.profiler import record_function

    from vlmoe.data.loader import to_device
    from vlmoe.moe import collect_aux_loss, collect_metrics
    from vlmoe.train.distributed import all_reduce_mean
    from vlmoe.train.nonfinite import nonfinite_outputs
    from vlmoe.train.trainer import _check_grad_norm, _on_any_rank, _scalars

    engine = model.engine
    torch.distributed.barrier()
    synchronize(info.device)
    start = time.perf_counter()
    metrics_s = 0.0
    with record_function("bench.step"):
        with record_function("bench.forward"):
            out = engine(to_device(batch, info.device, torch.float32))
        if model.sparse:
            with record_function("bench.aux_loss"):
                aux = collect_aux_loss(engine.module)
                if aux is not None:
                    out["aux_loss"] = aux
                    out["loss"] = out["loss"] + aux
        with record_function("bench.checks"):
            bad = nonfinite_outputs(out)
            if _on_any_rank(bool(bad), info.device):
                raise RuntimeError(f"{model.variant.name}: non-finite {bad or 'loss on another rank'}")
        with record_function("bench.backward"):
            engine.backward(out["loss"])
        with record_function("bench.optimizer"):
            engine.step()
        with record_function("bench.checks"):
            scalars = _scalars(out)
            _check_grad_norm(engine, step, info)
        if log:
            synchronize(info.device)
            metrics_start = time.perf_counter()
            with record_function("bench.metrics"):
                if model.sparse:
                    scalars.update(collect_metrics(engine.module))
                all_reduce_mean(scalars, info.device)
            synchronize(info.device)
            metrics_s = time.perf_counter() - metrics_start
    synchronize(info.device)
    return time.perf_counter() - start, metrics_s


def measure(models: list[Model], batches: list[dict], args: argparse.Namespace, info) -> None:
    """Warm-up, then `args.steps` rounds of one step per model (order rotated each round)."""
    total = args.warmup + args.steps
    for step in range(total):
        order = models[step % len(models):] + models[:step % len(models)]
        log = args.log_every > 0 and (step + 1) % args.log_every == 0
        for model in order:
            seed_step(args.seed, step, info.rank)
            seconds, metrics_s = train_step(model, batches[step % len(batches)], step + 1, log, info)
            if step >= args.warmup:
                model.times.append(seconds)
                model.metric_times.append(metrics_s)
        if info.is_main:
            print(f"  step {step + 1}/{total}{' (warm-up)' if step < args.warmup else ''}: "
                  + ", ".join(f"{m.variant.name} {m.times[-1] * 1000:.0f} ms" if step >= args.warmup else m.variant.name
                              for m in models), flush=True)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def report(groups: list[list], tokens: float, args: argparse.Namespace) -> None:
    """The table: each group's models (things with name, params, times, metric_times; the group's
    first is dense) with ratios to that group's dense."""
    metrics_note = ("every step" if args.log_every == 1 else f"every {args.log_every} steps" if args.log_every
                    else "never")
    print(f"\nmedian of {len(groups[0][0].times)} interleaved steps per model (rank 0, after a barrier); "
          f"{tokens:.0f} tokens per step over all ranks; metrics collected {metrics_note}"
          + (f"; {len(groups)} launches, ratios to each one's dense" if len(groups) > 1 else ""))
    print(f"  {'model':22s} {'params/rank':>11s} {'step ms':>9s} {'min ms':>8s} {'tokens/s':>9s} {'x dense':>8s}"
          f" {'metrics ms':>10s} {'metrics %':>9s} {'no-metrics x':>12s}")
    for index, group in enumerate(groups):
        dense = statistics.median(group[0].times)
        dense_plain = statistics.median(t - m for t, m in zip(group[0].times, group[0].metric_times))
        for m in group:
            median = statistics.median(m.times)
            plain = statistics.median(t - s for t, s in zip(m.times, m.metric_times))
            metrics = statistics.median(m.metric_times)
            name = f"{m.name} ({index + 1})" if len(groups) > 1 and m is group[0] else m.name
            print(f"  {name:22s} {_count(m.params):>11s} {median * 1000:9.1f} {min(m.times) * 1000:8.1f} "
                  f"{tokens / median:9.0f} {median / dense:8.2f} {metrics * 1000:10.1f} {100 * metrics / median:9.2f} "
                  f"{plain / dense_plain:12.2f}")


# ------------------------------------------------------------------------------- profile

# The operators run directly in the optimizer step, by what they do: DeepSpeed's ZeRO step is a
# chain of passes over every parameter around the torch optimizer's update.
_OPTIMIZER_OPS = (
    ("optimizer: weight update (torch optimizer)", ("Optimizer.step",)),
    ("optimizer: gradient norm (casts, norms)", ("aten::to", "aten::_to_copy", "aten::linalg_vector_norm",
                                                  "aten::norm", "aten::_foreach_norm")),
    ("optimizer: flatten gradients (cat)", ("aten::flatten_dense_tensors", "aten::cat")),
    ("optimizer: scale gradients (clip, mul_)", ("aten::mul_", "aten::_foreach_mul_")),
    ("optimizer: copy weights back (copy_)", ("aten::copy_",)),
    ("optimizer: collectives", ("c10d::",)),
)
PHASE_ORDER = [
    "forward: router", "forward: aux-loss collection", "forward: dispatch", "forward: experts", "forward: combine",
    "forward: all-to-all", "forward: MoE metrics (layer)", "forward: rest of model",
    "backward: router", "backward: dispatch", "backward: experts", "backward: combine", "backward: all-to-all",
    "backward: MoE metrics (layer)", "backward: rest of model", "backward: gradient accumulation + DeepSpeed hooks",
    "backward: engine (gradient reduction)",
    *(phase for phase, _ in _OPTIMIZER_OPS),
    "optimizer: other", "metrics collection (log step)", "trainer checks (non-finite, grad norm)", "other (step loop)",
]
_BENCH_PHASES = {"bench.step": "other (step loop)", "bench.forward": "forward: rest of model",
                 "bench.aux_loss": "forward: aux-loss collection",
                 "bench.checks": "trainer checks (non-finite, grad norm)",
                 "bench.backward": "backward: engine (gradient reduction)", "bench.optimizer": "optimizer: other",
                 "bench.metrics": "metrics collection (log step)"}
_MOE_NAMES = {"router": "router", "dispatch": "dispatch", "experts": "experts", "combine": "combine",
              "all_to_all": "all-to-all", "metrics": "MoE metrics (layer)"}
_EVALUATE = "autograd::engine::evaluate_function: "


def _scope_phase(name: str, direction: str) -> Optional[str]:
    """The phase of one of the named scopes (bench.*, vlmoe.moe.*), None for any other event."""
    if name in _BENCH_PHASES:
        return _BENCH_PHASES[name]
    if name.startswith("vlmoe.moe."):
        short = name[len("vlmoe.moe."):]
        return f"{direction}: {_MOE_NAMES.get(short, short)}"
    return None


def _optimizer_op_phase(event) -> Optional[str]:
    """The optimizer phase of an operator run directly in the optimizer step (None for any other
    event; an operator of no known kind stays in "optimizer: other")."""
    if event.cpu_parent is None or event.cpu_parent.name != "bench.optimizer":
        return None
    return next((phase for phase, prefixes in _OPTIMIZER_OPS if event.name.startswith(prefixes)), None)


def _forward_phase_of(event) -> Optional[str]:
    """The forward phase an event ran in: its innermost named scope (None inside a backward node)."""
    node = event
    while node is not None:
        if node.name.startswith(_EVALUATE):
            return None
        phase = _scope_phase(node.name, "forward")
        if phase is not None:
            return phase
        node = node.cpu_parent
    return None


def phase_breakdown(events) -> tuple[dict[str, float], list[float], bool]:
    """Per-phase self time (µs, summed over the profiled steps) on the thread that ran bench.step,
    the bench.step durations (µs), and whether any vlmoe.moe.* scope was seen.

    Each instant of a step goes to the innermost "marker" around it: a named scope, or a backward
    node (autograd::engine::evaluate_function), which takes the phase of the forward op that made it
    (same sequence number on the forward thread): "backward: <forward phase>"."""
    steps = [e for e in events if e.name == "bench.step"]
    if not steps:
        raise RuntimeError("the profile holds no bench.step event")
    thread = steps[0].thread
    forward_phase: dict[tuple[int, int], str] = {}
    saw_moe = False
    for e in events:
        if e.name.startswith("vlmoe.moe."):
            saw_moe = True
        if e.sequence_nr >= 0 and not e.name.startswith(_EVALUATE):
            key = (e.thread, e.sequence_nr)
            if key not in forward_phase:
                phase = _forward_phase_of(e)
                if phase is not None:
                    forward_phase[key] = phase
    markers = []
    for e in events:
        if e.thread != thread:
            continue
        phase = _scope_phase(e.name, "forward") or _optimizer_op_phase(e)
        if phase is None and e.name.startswith(_EVALUATE):
            if "AccumulateGrad" in e.name:
                phase = "backward: gradient accumulation + DeepSpeed hooks"
            else:
                made_in = forward_phase.get((e.fwd_thread, e.sequence_nr), "")
                moe = made_in.startswith("forward: ") and made_in not in _BENCH_PHASES.values()
                phase = "backward: " + (made_in[len("forward: "):] if moe else "rest of model")
        if phase is not None:
            markers.append((e.time_range.start, e.time_range.end, phase))
    return _self_times(markers), [e.time_range.end - e.time_range.start for e in steps], saw_moe


def _self_times(markers: list[tuple[float, float, str]]) -> dict[str, float]:
    """Self time per phase of properly nested intervals (start, end, phase): each instant goes to the
    innermost interval around it, so the phases sum to the outermost intervals' total."""
    markers = sorted(markers, key=lambda m: (m[0], -m[1]))
    self_us: dict[str, float] = {}
    stack: list[list] = []  # open intervals: [end, phase, time accounted up to]

    def close_until(t: float) -> None:
        while stack and stack[-1][0] <= t:
            end, phase, cursor = stack.pop()
            self_us[phase] = self_us.get(phase, 0.0) + max(0.0, end - cursor)
            if stack:  # the parent resumes where its child ended
                stack[-1][2] = max(stack[-1][2], end)

    for start, end, phase in markers:
        close_until(start)
        if stack:
            parent = stack[-1]
            self_us[parent[1]] = self_us.get(parent[1], 0.0) + max(0.0, start - parent[2])
            parent[2] = max(parent[2], start)
            end = min(end, parent[0])  # clip an improperly nested interval to its parent
        stack.append([end, phase, start])
    close_until(math.inf)
    return self_us


def profile(model: Model, batches: list[dict], args: argparse.Namespace, info, first_step: int) -> None:
    """Profile `args.profile_steps` steps of `model` on rank 0 (the others run them unprofiled)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    log = args.log_every > 0
    wall = []
    if info.is_main:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for i in range(args.profile_steps):
                step = first_step + i
                seed_step(args.seed, step, info.rank)
                log_step = log and (step + 1) % args.log_every == 0
                wall.append(train_step(model, batches[step % len(batches)], step + 1, log_step, info)[0])
    else:
        for i in range(args.profile_steps):
            step = first_step + i
            seed_step(args.seed, step, info.rank)
            log_step = log and (step + 1) % args.log_every == 0
            train_step(model, batches[step % len(batches)], step + 1, log_step, info)
    if not info.is_main:
        return
    self_us, step_us, saw_moe = phase_breakdown(prof.events())
    n = len(step_us)
    step_ms = sum(step_us) / n / 1000
    timed = statistics.median(model.times) * 1000 if model.times else float("nan")
    print(f"\nprofile of {model.variant.name}, rank 0, mean of {n} steps (host time; each instant to the "
          f"innermost scope, backward nodes to their forward op's phase)")
    phases = PHASE_ORDER + sorted(set(self_us) - set(PHASE_ORDER))
    total = 0.0
    for phase in phases:
        ms = self_us.get(phase, 0.0) / n / 1000
        total += ms
        print(f"  {phase:52s} {ms:9.1f} ms {100 * ms / step_ms:6.1f} %")
    optimizer_ms = sum(ms for phase, ms in self_us.items() if phase.startswith("optimizer: ")) / n / 1000
    print(f"  {'sum of phases':52s} {total:9.1f} ms   (of which the optimizer step {optimizer_ms:.1f} ms)")
    print(f"  {'profiled step (bench.step)':52s} {step_ms:9.1f} ms   (perf_counter: "
          f"{statistics.mean(wall) * 1000:.1f} ms; unprofiled median {timed:.1f} ms)")
    if model.sparse and not saw_moe:
        print("  (no vlmoe.moe.* scopes in the MoE layers yet: router, dispatch, experts, combine, all-to-all and\n"
              "   the layers' metrics are inside 'forward: rest of model' and 'backward: rest of model')")


# ------------------------------------------------------------------------------- main

def available_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def token_rows(args: argparse.Namespace, model_cfg) -> int:
    """Rows of hidden states per rank in one step (texts at their padded length, at most)."""
    image, text = model_cfg.num_patches + 1, model_cfg.max_text_len
    return args.image_batch * image + args.text_batch * text + args.pair_batch * (image + text)


def memory_per_rank(variant: Variant, args: argparse.Namespace, model_cfg, dense_params: int) -> tuple[int, int]:
    """(bytes held between steps, bytes more during its own step) on one rank: the engine's states;
    the step's activations and DeepSpeed's gradient bucket (it stages every gradient)."""
    params = estimated_params(variant, args, model_cfg, dense_params)
    activations = 4 * token_rows(args, model_cfg) * model_cfg.depth * (ACT_PER_DIM * model_cfg.dim
                                                                        + ACT_PER_FFN * model_cfg.ffn_dim)
    return BYTES_PER_PARAM * params, 4 * params + activations


def plan_launches(variants: list[Variant], memory: dict[Variant, tuple[int, int]], budget: float,
                  one_launch: bool) -> tuple[list[list[Variant]], list[str]]:
    """Groups of the non-dense variants whose engines fit beside dense's in `budget` bytes per rank
    (first fit, in the given order), and a note for each variant left out. Engines cannot be freed
    within a process (DeepSpeed's gradient hooks keep them alive), so each group is one launch;
    `one_launch`: only the first group (the rest are left out)."""
    dense = Variant("dense")

    def fits(group: list[Variant]) -> bool:
        members = [dense, *group]
        return sum(memory[v][0] for v in members) + max(memory[v][1] for v in members) <= budget

    groups: list[list[Variant]] = [[]]
    notes = []
    for v in variants:
        if not fits([v]):
            steady, transient = memory[v]
            notes.append(f"skipped {v.name}: ~{(steady + transient) / 2**30:.1f} GiB per rank (weights, gradients, "
                         f"ZeRO copy and AdamW moments of {steady / BYTES_PER_PARAM / 1e6:.0f}M parameters, and "
                         f"its step), beside dense's, is more than the {budget / 2**30:.1f} GiB per rank this machine "
                         f"has (--memory-gib); try --memory-check off, or a smaller --dim / --ffn-dim")
            continue
        home = next((g for g in groups if fits(g + [v])), None)
        if home is None and one_launch:
            notes.append(f"left out {v.name}: all engines at once would not fit in {budget / 2**30:.1f} GiB per rank; "
                         f"`python scripts/bench_pretrain.py` measures it in a launch of its own")
            continue
        if home is None:
            home = []
            groups.append(home)
        home.append(v)
    return groups, notes


def profiled_variant(spec: str, world: int) -> Variant:
    """--profile-config: "dense", "soft:E[:EP]" or a sparse "E[:EP]"."""
    if spec.strip() == "dense":
        return Variant("dense")
    kind, _, rest = spec.strip().rpartition("soft:")
    if kind or not rest:
        raise SystemExit(f"--profile-config {spec!r}: expected dense, soft:E[:EP] or E[:EP]")
    return parse_variants(rest, "soft" if spec.strip().startswith("soft:") else "sparse", world)[0]


def setup(args: argparse.Namespace, world: int, local_ranks: int, one_launch: bool):
    """The model config, the launches' variants (each list without dense) and notes for what is left out."""
    from vlmoe.train.pretrain import build_pretraining_model

    model_cfg = model_config_for(args)
    variants = parse_variants(args.experts, "sparse", world) + parse_variants(args.soft, "soft", world)
    profiled = profiled_variant(args.profile_config, world) if args.profile else None
    if profiled is not None and profiled.kind != "dense" and profiled not in variants:
        variants.append(profiled)
    for v in variants:
        moe_config_for(v, args, model_cfg).check_world(world)
    budget = args.memory_gib * 2**30 or 0.8 * (available_bytes() or 0)
    if args.memory_check == "off" or args.device.startswith("cuda") or not budget:
        return model_cfg, [variants], [], profiled  # GPU memory: let CUDA say if it does not fit
    with torch.device("meta"):  # shapes only
        dense_params = sum(p.numel() for p in build_pretraining_model(model_cfg, None, 1).parameters())
    memory = {v: memory_per_rank(v, args, model_cfg, dense_params) for v in [Variant("dense"), *variants]}
    groups, notes = plan_launches(variants, memory, budget / local_ranks, one_launch)
    return model_cfg, groups, notes, profiled


def spec(variants: list[Variant], kind: str) -> str:
    return ",".join(f"{v.experts}:{v.ep}" for v in variants if v.kind == kind)


def launch(argv: list[str]) -> int:
    """Not under a launcher: run this script on --ranks ranks (torch.distributed.run), once per group
    of configurations that fits in memory, and print the groups' tables as one."""
    import json
    import socket
    import tempfile
    from types import SimpleNamespace

    args = parse_args(argv)
    _, groups, notes, profiled = setup(args, args.ranks, args.ranks, one_launch=False)
    for note in notes:
        print(note, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if args.device.startswith("cuda") else "cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, group in enumerate(groups):
            if len(groups) > 1:
                print(f"\n=== launch {index + 1} of {len(groups)} (all engines of a launch live at once): dense, "
                      f"{', '.join(v.name for v in group)}", flush=True)
            profiles = profiled is not None and (profiled in group or (profiled.kind == "dense" and index == 0))
            child = [a for a in argv if a != "--profile" or profiles]
            child += ["--experts", spec(group, "sparse"), "--soft", spec(group, "soft"), "--memory-check", "off",
                      "--results", str(Path(tmp) / f"{index}.json")]
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                                    "--master_port", str(port), str(Path(__file__).resolve()), *child], env=env)
            if code:
                return code
            data = json.loads((Path(tmp) / f"{index}.json").read_text())
            results.append(data)
    if len(groups) > 1:
        print("\n=== all launches")
        for note in notes:
            print(note)
        report([[SimpleNamespace(**m) for m in r["models"]] for r in results], results[0]["tokens"], args)
    return 0


def main() -> None:
    if "RANK" not in os.environ:  # not under a launcher
        sys.exit(launch(sys.argv[1:]))
    args = parse_args(sys.argv[1:])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device.startswith("cuda") else "cpu")
    from vlmoe.train.distributed import all_reduce_mean, init_distributed, shutdown_distributed
    from vlmoe.train.logs import show_warnings_once
    from vlmoe.train.pretrain import count_tokens
    from vlmoe.train.trainer import _max_over_ranks, peak_memory_mb

    info = init_distributed(600, shm_comm=False)
    if torch.device(args.device).type != info.device.type:
        raise SystemExit(f"--device {args.device}, but DeepSpeed's accelerator is {info.device.type} (DS_ACCELERATOR)")
    show_warnings_once(info.is_main)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_ranks)
    torch.set_num_threads(threads)
    model_cfg, groups, notes, profiled = setup(args, info.world_size, local_ranks, one_launch=True)
    variants = [Variant("dense"), *groups[0]]
    if profiled not in variants:
        profiled = None
    if info.is_main:
        c = model_cfg
        where = (f"{threads} thread(s) per rank, {active_allocator()}" if info.device.type == "cpu"
                 else str(info.device))
        print(f"bench_pretrain: {info.world_size} ranks ({where}), dim {c.dim}, ffn {c.ffn_dim}, depth {c.depth}, "
              f"heads {c.heads}, image {c.image_size}/{c.patch_size} ({c.num_patches} patches), "
              f"text <= {c.max_text_len}, "
              f"vocab {c.vocab_size}, codebook {c.codebook_size}; per rank {args.image_batch} images + "
              f"{args.text_batch} texts + {args.pair_batch} pairs; fp32, ZeRO-{args.zero_stage}, MoE every 2nd V/T-FFN (placement all)"
              f", top-1 cf {args.capacity_factor}", flush=True)
        for note in notes:
            print(f"  {note}", flush=True)
        for v in variants:
            if v.kind == "soft":
                slots = v.experts * soft_slots(args, model_cfg, v.experts)
                print(f"  {v.name}: {slots} slots per example (images {c.num_patches + 1} tokens, texts <= "
                      f"{c.max_text_len})", flush=True)
    batches = make_batches(args, model_cfg, info.rank)
    tokens = all_reduce_mean({"t": float(count_tokens(batches[0]))}, info.device)["t"] * info.world_size
    models = []
    for v in variants:
        models.append(build_model(v, args, model_cfg, info))
        if info.is_main:
            print(f"  built {v.name}", flush=True)
    gc.collect()
    measure(models, batches, args, info)
    peak = _max_over_ranks(peak_memory_mb(info.device) / 1024, info.device)
    if info.is_main:
        report([models], tokens, args)
        print(f"  peak memory per rank: {peak:.1f} GiB", flush=True)
        if args.results:
            import json

            Path(args.results).write_text(json.dumps({"tokens": tokens, "models": [
                {"name": m.name, "params": m.params, "times": m.times, "metric_times": m.metric_times}
                for m in models]}))
    if profiled is not None:
        target = next(m for m in models if m.variant == profiled)
        profile(target, batches, args, info, args.warmup + args.steps)
    shutdown_distributed()


if __name__ == "__main__":
    main()
