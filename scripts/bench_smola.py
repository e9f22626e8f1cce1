"""Benchmark the SMoLA block (issue 4, item 7): cost over the frozen linear, beside the FLOP floor.

Variants on x [B, N, d] -> d (default [8, 1024, 768], 2 threads), all timed interleaved in
one process, medians over --reps rounds:
  frozen      the nn.Linear alone
  smola E     SMoLALinear with E experts of rank --rank (the fused forward/backward)
  lora 4E     LoRA of rank rank*E: the same added parameters as one MM block of E experts
  plain 48    the same equations as composed autograd ops (the "plain batched" reference)
forward under no_grad, and forward+backward with x requiring grad (as every layer but the
first does), then where the largest block's forward goes: self time per operator under
torch.profiler, each matrix product with its GFLOP/s beside the frozen linear's. Then the
end-to-end forward overhead of SMoLA_O with 48 experts on the BASE multiway backbone (image-text
pairs), unless --skip-e2e.

    python scripts/bench_smola.py [--batch 8 --tokens 1024 --dim 768 --reps 7] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

from vlmoe.allocator import active_allocator, use_tcmalloc

if __name__ == "__main__":  # before torch loads: measure on the allocator `vlmoe` runs on (vlmoe/allocator.py)
    use_tcmalloc()

import torch
import torch.nn.functional as F
from torch import nn

import smola
from vlmoe.study.flops import counted_flops, kernel_flops
from bench_device import add_device_option, bench_device  # scripts/, beside this file


def smola_flops(tokens: int, batch: int, d_in: int, d_out: int, experts: int, rank: int) -> tuple[float, float]:
    """(forward, backward) FLOPs SMoLA adds: logits, dispatch, combine GEMMs over [T, E], plus experts."""
    expert = 2 * batch * experts * rank * (d_in + d_out)
    forward = 2 * tokens * experts * (2 * d_in + d_out) + expert
    # d_combine, d_expert_out (2 x T E d_out); d_dispatch, d_phi, d_x via [D, scaled] (T E d_in x 4)
    backward = 2 * tokens * experts * (2 * d_out + 4 * d_in) + 2 * expert
    return forward, backward


def lora_flops(tokens: int, d_in: int, d_out: int, rank: int) -> tuple[float, float]:
    """(forward, backward) FLOPs LoRA of rank r adds."""
    forward = 2 * tokens * rank * (d_in + d_out)
    return forward, 2 * forward


def plain_smola(block: smola.SMoLALinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eqs. 1-4 as composed autograd ops: the straightforward batched implementation."""

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = block.alpha * torch.einsum("bnd,ed->ben", F.normalize(x, dim=-1), F.normalize(block.phi, dim=-1))
        dispatch, combine = logits.softmax(dim=-1), logits.softmax(dim=1)
        slots = torch.einsum("ben,bnd->bed", dispatch, x)
        low = torch.einsum("bed,erd->ber", slots, block.w_in)
        return block.base(x) + torch.einsum("ben,beo->bno", combine, torch.einsum("ber,eor->beo", low, block.w_out))

    return run


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously to the timer)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def where(device: torch.device) -> str:
    """What the timings ran on, for the headers."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{torch.get_num_threads()} threads, {active_allocator()}"


def forward_only(module: Callable, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)
    return run


def forward_backward(module: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        module(x).backward(grad)
        x.grad = None
    return run


def where_forward_goes(name: str, module: Callable, x: torch.Tensor, device: torch.device, calls: int) -> None:
    """Self time per operator (and input shapes) of `module`'s forward under torch.profiler, per call,
    with the rate of each matrix product: which operators make the overhead over the FLOP floor."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run = forward_only(module, x)
    run()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            run()
        synchronize(device)
    rows = []
    for op in prof.key_averages(group_by_input_shape=True):
        us = op.self_device_time_total if device.type == "cuda" else op.self_cpu_time_total
        rows.append((us / calls, op.key, op.input_shapes, kernel_flops(op.key, op.input_shapes) * op.count / calls))
    total = sum(r[0] for r in rows)
    print(f"\nwhere the {name} forward goes ({'device' if device.type == 'cuda' else 'host'} self time per "
          f"operator, {calls} calls; matrix products with their rate)")
    for us, op, shapes, flops in sorted(rows, key=lambda r: -r[0]):
        if us < 0.01 * total:
            continue
        rate = f"{flops / us / 1e3:7.0f} GFLOP/s" if flops else ""
        print(f"  {op:<24s} {us / 1e3:7.2f} ms  {rate:15s} {[list(s) for s in shapes if s]}")
    print(f"  {'all operators':<24s} {total / 1e3:7.2f} ms")


def bench_block(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch, tokens, dim = args.batch, args.tokens, args.dim
    total_tokens = batch * tokens
    base = nn.Linear(dim, dim).requires_grad_(False).to(device)
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    grad = torch.randn(batch, tokens, dim, device=device)
    variants: dict[str, Callable] = {"frozen": base}
    floors: dict[str, tuple[float, float]] = {}
    frozen_fwd = 2.0 * total_tokens * dim * dim
    for experts in args.experts:
        block = smola.SMoLALinear(base, experts, args.rank).to(device)
        lora = smola.LoRALinear(base, rank=args.rank * experts).to(device)
        with torch.no_grad():  # trained-looking adapters (zeros would not change the timing, but be honest)
            block.w_out.normal_(0, 0.02)
            lora.lora_b.normal_(0, 0.02)
        variants[f"smola E={experts}"] = block
        variants[f"lora r={args.rank * experts}"] = lora
        floors[f"smola E={experts}"] = smola_flops(total_tokens, batch, dim, dim, experts, args.rank)
        floors[f"lora r={args.rank * experts}"] = lora_flops(total_tokens, dim, dim, args.rank * experts)
        if experts == 48:
            variants["plain E=48"] = plain_smola(block)
            floors["plain E=48"] = floors["smola E=48"]
    times = {name: {"fwd": [], "fwdbwd": []} for name in variants}
    for _ in range(args.warmup):
        for module in variants.values():
            forward_only(module, x)()
            forward_backward(module, x, grad)()
    for _ in range(args.reps):  # interleaved: every variant once per round
        for name, module in variants.items():
            times[name]["fwd"].append(timed(forward_only(module, x), device))
            times[name]["fwdbwd"].append(timed(forward_backward(module, x, grad), device))
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    print(f"x [{batch}, {tokens}, {dim}] -> {dim}, rank {args.rank}, {where(device)}, "
          f"median of {args.reps} interleaved rounds")
    print(f"{'variant':<14} {'fwd ms':>8} {'fwd x':>7} {'floor':>6}   {'f+b ms':>8} {'f+b x':>7} {'floor':>6}")
    for name, m in med.items():
        fwd_extra, bwd_extra = floors.get(name, (0.0, 0.0))
        fwd_floor = (frozen_fwd + fwd_extra) / frozen_fwd
        fb_floor = (2 * frozen_fwd + fwd_extra + bwd_extra) / (2 * frozen_fwd)  # frozen f+b = forward + d x
        print(f"{name:<14} {m['fwd'] * 1e3:8.1f} {m['fwd'] / med['frozen']['fwd']:7.3f} {fwd_floor:6.3f}   "
              f"{m['fwdbwd'] * 1e3:8.1f} {m['fwdbwd'] / med['frozen']['fwdbwd']:7.3f} {fb_floor:6.3f}")
    largest = f"smola E={max(args.experts)}"
    where_forward_goes(largest, variants[largest], x, device, args.reps)


def bench_backbone(args: argparse.Namespace) -> None:
    from vlmoe.model.config import model_config
    from vlmoe.model.multiway import MultiwayTransformer

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = model_config("base")
    frozen = MultiwayTransformer(cfg).eval()
    adapted = MultiwayTransformer(cfg).eval()
    adapted.load_state_dict(frozen.state_dict())
    smola.inject(adapted, smola.SMoLAConfig(num_experts=48, rank=4, mode="omni"))
    for model in (frozen, adapted):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("w_out"):
                    p.normal_(0, 0.02)
    frozen, adapted = frozen.to(device), adapted.to(device)
    pixels = torch.randn(args.e2e_batch, 3, cfg.image_size, cfg.image_size, device=device)
    text = torch.randint(0, cfg.vocab_size, (args.e2e_batch, args.e2e_text), device=device)
    runs = {"frozen": frozen, "smola_O 48": adapted}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for model in runs.values():
            model(pixels, text)
        for _ in range(args.e2e_reps):
            for name, model in runs.items():
                times[name].append(timed(lambda m=model: m(pixels, text), device))
        # the floor: every matmul-like kernel of one forward, counted (the routing GEMMs included)
        flops = {name: counted_flops(lambda m=model: m(pixels, text)) for name, model in runs.items()}
    base_ms = statistics.median(times["frozen"]) * 1e3
    smola_ms = statistics.median(times["smola_O 48"]) * 1e3
    overhead, floor = smola_ms / base_ms - 1, flops["smola_O 48"] / flops["frozen"] - 1
    report = smola.trainable_parameters(adapted)
    print(f"\nBASE multiway backbone, pairs [{args.e2e_batch} x (197 image + {args.e2e_text} text) tokens], forward, "
          f"median of {args.e2e_reps} interleaved rounds")
    print(f"frozen {base_ms:.0f} ms, SMoLA_O 48 {smola_ms:.0f} ms: overhead {100 * overhead:.1f}% "
          f"({report})")
    print(f"FLOP floor of that overhead: {100 * floor:.1f}% ({flops['frozen'] / 1e9:.1f} -> "
          f"{flops['smola_O 48'] / 1e9:.1f} GFLOPs per forward); measured / floor {overhead / floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 48, 144])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-batch", type=int, default=4)
    parser.add_argument("--e2e-text", type=int, default=32)
    parser.add_argument("--e2e-reps", type=int, default=5)
    add_device_option(parser)
    args = parser.parse_args()
    args.device = str(bench_device(parser, args.device))
    torch.set_num_threads(args.threads)
    bench_block(args)
    if not args.skip_e2e:
        bench_backbone(args)


if __name__ == "__main__":
    main()
