"""Forward+backward time of our MoE layer vs a dense FFN of the expert's size vs DeepSpeed's MoE
(and tutel where installed) and our Soft MoE, interleaved in one process, printed as ratios to the
dense FFN; the Soft MoE row is followed by its FLOP floor as a ratio to dense.

    python scripts/bench_moe.py                       # issue target: S=8192, d=768, d_ff=3072, E=32
    python scripts/bench_moe.py --tokens 2048 --rounds 3 --sweep 8,32,128
    python scripts/bench_moe.py --device cuda         # on a GPU (DeepSpeed's layer on a 1-rank nccl group)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable

from vlmoe.allocator import active_allocator, use_tcmalloc

if __name__ == "__main__":  # before torch loads: measure on the allocator `vlmoe` runs on (vlmoe/allocator.py)
    use_tcmalloc()

import torch
import torch.distributed as dist
from torch import nn

from vlmoe.moe import MoE, MoEConfig, SoftMoE
from vlmoe.moe.dispatch import buffer_capacity
from vlmoe.moe.experts import Experts
from bench_device import add_device_option, bench_device  # scripts/, beside this file


class DenseFFN(nn.Module):
    """The expert's shape as one dense FFN (the cost a top-1 MoE should match)."""

    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously to the timer)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One layer's forward+backward; gradients are dropped before each step, as an optimizer step
    with zero_grad(set_to_none=True) would, so no implementation pays for accumulating them."""

    def __init__(self, layer: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.layer, self.loss, self.device = layer.to(device), loss, device

    def __call__(self, x: torch.Tensor) -> float:
        self.layer.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(self.device)
        start = time.perf_counter()
        self.loss(x).backward()
        synchronize(self.device)
        return time.perf_counter() - start


def _ours(d: int, d_ff: int, experts: int, cf: float, device: torch.device, backend: str = "ours") -> Step:
    config = MoEConfig(num_experts=experts, k=1, capacity_factor=cf, batch_priority=True, backend=backend)
    layer = MoE(d, d_ff, config, modality="v").train()  # V's default balancing loss: vloss
    return Step(layer, lambda x: layer(x).float().sum() + layer.pop_aux_loss(), device)


def _ours_groups(d: int, d_ff: int, experts: int, cf: float, groups: int, one_call: bool,
                 device: torch.device) -> Step:
    """Our layer on the tokens split into `groups` routing groups (a pretraining step's objectives):
    one call per group, or all in one call with lists (each still routed alone; the experts run
    once on all groups' rows, as the backbone runs them)."""
    config = MoEConfig(num_experts=experts, k=1, capacity_factor=cf, batch_priority=True)
    layer = MoE(d, d_ff, config, modality="v").train()

    def loss(x: torch.Tensor) -> torch.Tensor:
        parts = list(x.chunk(groups))
        if one_call:
            outs = layer(parts)
        else:
            outs = [layer(part) for part in parts]
        layer.pop_metrics()
        return sum(out.float().sum() for out in outs) + layer.pop_aux_loss()
    return Step(layer, loss, device)


def _experts_only(d: int, d_ff: int, experts: int, cf: float, tokens: int, device: torch.device) -> Step:
    """Our experts alone on full [E, C, d] buffers: the batched expert GEMMs that any top-1
    layer of this size runs, without routing, dispatch or combine (the floor over E)."""
    layer = Experts(d, d_ff, experts)
    buffers = torch.randn(experts, buffer_capacity(math.ceil(cf * tokens / experts)), d, device=device,
                          requires_grad=True)

    def loss(_: torch.Tensor) -> torch.Tensor:
        buffers.grad = None
        return layer(buffers).float().sum()
    return Step(layer, loss, device)


def _soft(d: int, d_ff: int, experts: int, slots_per_expert: int, group: int, device: torch.device) -> Step:
    """Our Soft MoE on the same tokens as [tokens / group, group, d] examples (one routing group each)."""
    layer = SoftMoE(d, d_ff, MoEConfig(type="soft", num_experts=experts, slots_per_expert=slots_per_expert)).train()

    def loss(x: torch.Tensor) -> torch.Tensor:
        out = layer(x.view(-1, group, d)).float().sum()
        layer.pop_metrics()  # the statistics are not what is timed; keep them from piling up
        return out
    return Step(layer, loss, device)


def soft_flop_floor(tokens: int, group: int, slots: int, d: int, d_ff: int) -> float:
    """Soft MoE's FLOPs as a ratio to a dense FFN on the same tokens: the experts are a dense FFN
    on the slots (tokens / group examples of `slots` each), plus three thin GEMMs per example
    (logits, dispatch and combine: 2 * group * slots * d each). Backward doubles every term alike."""
    ffn_per_row = 2 * 2 * d * d_ff
    examples = tokens // group
    thin = 3 * 2 * group * slots * d * examples
    return (examples * slots * ffn_per_row + thin) / (tokens * ffn_per_row)


def _dense(d: int, d_ff: int, device: torch.device) -> Step:
    layer = DenseFFN(d, d_ff)
    return Step(layer, lambda x: layer(x).float().sum(), device)


def _deepspeed(d: int, d_ff: int, experts: int, cf: float, device: torch.device) -> Step:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    layer = DeepSpeedMoE(hidden_size=d, expert=DenseFFN(d, d_ff), num_experts=experts, ep_size=1, k=1,
                         capacity_factor=cf, min_capacity=4, drop_tokens=True).train()
    layer.set_deepspeed_parallelism()

    def loss(x: torch.Tensor) -> torch.Tensor:
        out, l_aux, _ = layer(x.unsqueeze(0))
        return out.float().sum() + 0.01 * l_aux
    return Step(layer, loss, device)


def _tutel(d: int, d_ff: int, experts: int, cf: float, device: torch.device):
    try:
        from tutel import moe as tutel_moe
    except ImportError:
        return None
    layer = tutel_moe.moe_layer(gate_type={"type": "top", "k": 1, "capacity_factor": cf},
                                model_dim=d, experts={"type": "ffn", "count_per_node": experts,
                                                      "hidden_size_per_expert": d_ff,
                                                      # GELU as ours; also, tutel 82af7aa's ReLU default
                                                      # names an F it never imports
                                                      "activation_fn": torch.nn.functional.gelu})
    return Step(layer, lambda x: layer(x.unsqueeze(0)).float().sum() + layer.l_aux, device)


def _init_single_rank(device: torch.device) -> None:
    """A one-rank process group for DeepSpeed's layer (its expert groups): gloo on CPU, nccl on GPUs."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group(backend, rank=0, world_size=1)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--cf", type=float, default=1.05)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="8,32,128",
                        help="expert counts for the flatness check, a second interleaved group ('' = none)")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--soft-group", type=int, default=256,
                        help="tokens per example for the Soft MoE row (each example is one routing group)")
    parser.add_argument("--soft-slots", type=int, default=0,
                        help="Soft MoE slots per expert (0 = soft-group / experts: as many slots as tokens)")
    parser.add_argument("--groups", type=int, default=3,
                        help="routing groups for the one-call-vs-one-call-each comparison (0 = skip)")
    add_device_option(parser)
    args = parser.parse_args()
    device = bench_device(parser, args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d, device=device, requires_grad=True)
    steps: dict[str, Step] = {"dense": _dense(args.d, args.d_ff, device),
                              f"ours E={args.experts}": _ours(args.d, args.d_ff, args.experts, args.cf, device)}
    if not args.no_deepspeed:
        _init_single_rank(device)
        steps[f"deepspeed E={args.experts}"] = _deepspeed(args.d, args.d_ff, args.experts, args.cf, device)
    if args.tokens % args.soft_group:
        parser.error(f"--tokens {args.tokens} is not a multiple of --soft-group {args.soft_group}")
    slots_per_expert = args.soft_slots or max(1, args.soft_group // args.experts)
    soft_name = f"soft E={args.experts} p={slots_per_expert}"
    steps[soft_name] = _soft(args.d, args.d_ff, args.experts, slots_per_expert, args.soft_group, device)
    tutel = _tutel(args.d, args.d_ff, args.experts, args.cf, device)
    if tutel is not None:  # tutel's own layer, and ours with tutel's dispatch kernels
        steps[f"tutel E={args.experts}"] = tutel
        steps[f"ours+tutel E={args.experts}"] = _ours(args.d, args.d_ff, args.experts, args.cf, device,
                                                      backend="tutel")
    where = (f"{args.threads} threads, {active_allocator()}" if device.type == "cpu"
             else f"{device} ({torch.cuda.get_device_name(device)})")
    print(f"S={args.tokens} d={args.d} d_ff={args.d_ff} cf={args.cf} top-1, fwd+bwd, {where}, "
          f"median of {args.rounds} interleaved rounds{'' if tutel else ' (tutel not installed)'}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    times = _measure(steps, x, args.rounds)
    _report(times)
    slots = args.experts * slots_per_expert
    floor = soft_flop_floor(args.tokens, args.soft_group, slots, args.d, args.d_ff)
    measured = statistics.median(times[soft_name]) / statistics.median(times["dense"])
    print(f"  soft FLOP floor ({args.soft_group} tokens and {slots} slots per example: experts = dense FFN on the "
          f"slots + 3 thin GEMMs): {floor:.3f}x dense, measured {measured:.2f}x")
    sweep = [int(e) for e in args.sweep.split(",") if e]
    if sweep:
        # A separate interleaved group: the largest pools' gigabytes of weights would otherwise
        # disturb the cache and allocator state of the main comparison.
        steps = {"dense": steps["dense"]}
        for experts in sweep:
            steps[f"ours E={experts}"] = _ours(args.d, args.d_ff, experts, args.cf, device)
            steps[f"experts only E={experts}"] = _experts_only(args.d, args.d_ff, experts, args.cf, args.tokens,
                                                               device)
            if not args.no_deepspeed:
                steps[f"deepspeed E={experts}"] = _deepspeed(args.d, args.d_ff, experts, args.cf, device)
        print("sweep over the number of experts (the weights to read and their gradients to write grow with E;\n"
              "'experts only' is the batched expert GEMMs alone, the part of any layer that grows with E)")
        _report(_measure(steps, x, args.rounds))
    if args.groups > 1:
        steps = {"dense": steps["dense"]}
        for one_call in (False, True):
            name = f"ours E={args.experts} {args.groups} groups, {'one call' if one_call else 'a call each'}"
            steps[name] = _ours_groups(args.d, args.d_ff, args.experts, args.cf, args.groups, one_call, device)
        print(f"{args.groups} routing groups of {args.tokens // args.groups} tokens (a step's objectives): a layer call "
              f"each, or one call whose experts run once on all groups' rows")
        _report(_measure(steps, x, args.rounds))


def _measure(steps: dict[str, Step], x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step(x)
    for _ in range(rounds):
        for name, step in steps.items():  # interleaved, so load on the machine hits all alike
            times[name].append(step(x))
    return times


def _report(times: dict[str, list[float]]) -> None:
    dense = statistics.median(times["dense"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:34s} {median * 1000:9.1f} ms   {median / dense:5.2f}x dense")


if __name__ == "__main__":
    main()
