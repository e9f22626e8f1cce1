"""Rank program for tests/test_moe_distributed.py (launched with torchrun, gloo).

  equivalence OUT.json   EP=2 over the world vs EP=1 on the same global tokens: outputs and grads (sparse
                         MoE to OUT.json.RANK, Soft MoE to OUT.json.soft.RANK)
  zero SPECS OUT          per spec STAGE:EP[:nobridge], two SGD steps through a DeepSpeed engine vs by hand
  resume EP SRC DST      ZeRO-2 run under this EP size: load SRC (any EP size) and check it, train, save DST
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from _rank_exit import skip_interpreter_teardown
from vlmoe.moe import MoE, MoEConfig, SoftMoE
from vlmoe.moe.expert_checkpoint import global_expert_state, save_experts


def _tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 4 + 3 * rank:] = False  # different real-token counts: different capacities per rank
    return x, mask


def equivalence(out_path: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = MoEConfig(num_experts=8, k=2, capacity_factor=0.25, min_capacity=0, noise_std=0.0,
                       aux_losses={"v": ["switch"], "t": ["switch"]})
    torch.manual_seed(0)
    sharded = MoE(16, 24, config, ep_group=dist.group.WORLD, seed=7).train()
    torch.manual_seed(0)
    full = MoE(16, 24, config, seed=7).train()
    num_local = 8 // world
    local = slice(rank * num_local, (rank + 1) * num_local)
    init_equal = all(torch.equal(getattr(sharded.experts, n), getattr(full.experts, n)[local])
                     for n in ("w_in", "b_in", "w_out", "b_out"))
    with torch.no_grad():  # random biases, so that bias gradients are checked too
        for name in ("b_in", "b_out"):
            getattr(full.experts, name).normal_(generator=torch.Generator().manual_seed(5))
            getattr(sharded.experts, name).copy_(getattr(full.experts, name)[local])
    x, mask = _tokens(rank)
    upstream = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(200 + rank))
    results = {}
    grads = {}
    for name, layer in (("ep", sharded), ("ref", full)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, mask)
        loss = (out * upstream).sum() + layer.pop_aux_loss()
        loss.backward()
        if name == "ep":
            dropped = layer.pop_metrics()["moe/dropped"]
        results[name] = out.detach()
        grads[name] = {"x": xi.grad, "router": layer.router.weight.grad.clone(),
                       **{n: getattr(layer.experts, n).grad.clone() for n in ("w_in", "b_in", "w_out", "b_out")}}
    # Reference expert grads: this rank's tokens only; the EP experts saw every rank's tokens.
    for n in ("w_in", "b_in", "w_out", "b_out"):
        dist.all_reduce(grads["ref"][n])
        grads["ref"][n] = grads["ref"][n][local]
    report = {
        "init_equal": init_equal,
        "out_max_err": (results["ep"] - results["ref"]).abs().max().item(),
        "out_abs_max": results["ref"].abs().max().item(),
        "grad_max_err": {n: (grads["ep"][n] - grads["ref"][n]).abs().max().item() for n in grads["ep"]},
        "grad_abs_max": {n: grads["ref"][n].abs().max().item() for n in grads["ref"]},
        "dropped": dropped,
        "padding_zero": results["ep"][~mask].abs().max().item() if (~mask).any() else 0.0,
    }
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)
    soft_equivalence(f"{out_path}.soft")


def soft_equivalence(out_path: str) -> None:
    """Soft MoE: experts sharded over the world (slot buffers by all-to-all) vs the whole pool here."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = MoEConfig(type="soft", num_experts=8, slots_per_expert=2)
    sharded = SoftMoE(16, 24, config, ep_group=dist.group.WORLD, init_std=0.3, seed=7)
    torch.manual_seed(0)
    full = SoftMoE(16, 24, config, init_std=0.3, seed=7)
    local = slice(rank * (8 // world), (rank + 1) * (8 // world))
    with torch.no_grad():  # random biases, so that bias gradients are checked too
        for name in ("b_in", "b_out"):
            getattr(full.experts, name).normal_(generator=torch.Generator().manual_seed(5))
            getattr(sharded.experts, name).copy_(getattr(full.experts, name)[local])
    x, mask = _tokens(rank)
    x, mask = x[: 2 + rank], mask[: 2 + rank]  # different batch sizes: different buffer rows per rank
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + rank))
    results, grads = {}, {}
    for name, layer in (("ep", sharded), ("ref", full)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, mask)
        (out * upstream).sum().backward()
        results[name] = out.detach()
        grads[name] = {"x": xi.grad, "phi": layer.router.phi.grad.clone(), "scale": layer.router.scale.grad.reshape(1).clone(),
                       **{n: getattr(layer.experts, n).grad.clone() for n in ("w_in", "b_in", "w_out", "b_out")}}
    for n in ("w_in", "b_in", "w_out", "b_out"):  # the EP experts saw every rank's slots
        dist.all_reduce(grads["ref"][n])
        grads["ref"][n] = grads["ref"][n][local]
    report = {
        "out_max_err": (results["ep"] - results["ref"]).abs().max().item(),
        "out_abs_max": results["ref"].abs().max().item(),
        "grad_max_err": {n: (grads["ep"][n] - grads["ref"][n]).abs().max().item() for n in grads["ep"]},
        "grad_abs_max": {n: grads["ref"][n].abs().max().item() for n in grads["ref"]},
        "padding_zero": results["ep"][~mask].abs().max().item() if (~mask).any() else 0.0,
    }
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)


class _TinyMoEModel(torch.nn.Module):
    def __init__(self, ep_group) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.proj = torch.nn.Linear(16, 16)
        config = MoEConfig(num_experts=8, k=1, capacity_factor=1.0, min_capacity=0, noise_std=0.0,
                           aux_losses={"v": ["switch"], "t": ["switch"]}, aux_weight=0.1)
        self.moe = MoE(16, 24, config, ep_group=ep_group, init_std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(self.proj(x))
        return out.pow(2).mean() + self.moe.pop_aux_loss()


def _zero_tokens(rank: int) -> torch.Tensor:
    # rank 1's tokens are shifted so that the two ranks route to different experts
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(400 + rank)) + 2.0 * rank


def zero(stage: int, ep_size: int, out_path: str, bridge: bool = True) -> None:
    """One SGD step through a DeepSpeed engine vs the same step done by hand on one process."""
    import deepspeed

    from vlmoe.moe.deepspeed_bridge import moe_param_groups, prepare_for_deepspeed
    from vlmoe.moe.parallel import expert_parallel_group

    rank, world = dist.get_rank(), dist.get_world_size()
    lr = 0.5
    model = _TinyMoEModel(expert_parallel_group(ep_size) if ep_size > 1 else None)
    reference = _TinyMoEModel(None)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    if bridge:
        prepare_for_deepspeed(model, stage)
    config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 1 << 30}
    groups = moe_param_groups(model.parameters()) if stage < 3 and bridge else [{"params": list(model.parameters())}]
    optimizer = torch.optim.SGD(groups, lr=lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(2):
        loss = engine(_zero_tokens(rank) + step)
        engine.backward(loss)
        engine.step()
        # by hand: mean over ranks of each rank's loss (each rank's tokens are their own group)
        reference.zero_grad()
        total = sum(reference(_zero_tokens(r) + step) for r in range(world)) / world
        total.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p.sub_(lr * p.grad)
    num_local = 8 // ep_size
    local = slice(dist.get_rank(engine.module.moe.ep_group) * num_local, None) if ep_size > 1 else slice(None)
    errors, moved = {}, {}
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        for name, param in engine.module.named_parameters():
            expected = dict(reference.named_parameters())[name].detach()
            if name.startswith("moe.experts."):
                expected = expected[local][:num_local]
            errors[name] = (param.detach().float() - expected).abs().max().item()
            moved[name] = (param.detach().float() - initial[name]).abs().max().item()
    report = {"errors": errors, "moved": moved, "has_moe_layers": engine.has_moe_layers, "loss": loss.item()}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)


def _ds_engine(model: torch.nn.Module, lr: float):
    import deepspeed

    from vlmoe.moe.deepspeed_bridge import moe_param_groups, prepare_for_deepspeed

    prepare_for_deepspeed(model, 2)
    config = {"train_batch_size": dist.get_world_size(), "train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 1 << 30}
    optimizer = torch.optim.SGD(moe_param_groups(model.parameters()), lr=lr)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


def _global_params(engine) -> dict[str, torch.Tensor]:
    """Every weight of the model as one EP=1 process would hold it (a collective)."""
    experts = global_expert_state(engine.module)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters() if n not in experts}
    return {**params, **experts}


def resume(ep_size: int, source: str, target: str) -> None:
    """ZeRO-2 run with this EP size: resume from `source` (a checkpoint written under any EP size) and
    check every weight, then train one step and save to `target` ("-" = skip either)."""
    from vlmoe.moe.deepspeed_bridge import load_experts_into_engine
    from vlmoe.moe.parallel import expert_parallel_group

    rank = dist.get_rank()
    engine = _ds_engine(_TinyMoEModel(expert_parallel_group(ep_size) if ep_size > 1 else None), lr=0.2)
    report = {}
    if source != "-":
        engine.load_checkpoint(source, tag="t", load_module_strict=False, load_optimizer_states=False)
        load_experts_into_engine(engine, f"{source}/experts.safetensors")
        expected = torch.load(f"{source}/expected.pt", weights_only=True)
        for group in engine.optimizer.param_groups:  # a zero-lr step: ZeRO's fp32 copy must hold the loaded weights
            group["lr"] = 0.0
        engine.backward(engine(_zero_tokens(rank)))
        engine.step()
        loaded = _global_params(engine)
        report["errors"] = {n: (loaded[n] - expected[n]).abs().max().item() for n in expected}
        report["missing"] = sorted(set(expected) ^ set(loaded))
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.2
    if target != "-":
        before = _global_params(engine)
        engine.backward(engine(_zero_tokens(rank) + 1.0))
        engine.step()
        after = _global_params(engine)
        report["moved"] = {n: (after[n] - before[n]).abs().max().item() for n in after}
        engine.save_checkpoint(target, tag="t")
        save_experts(engine.module, f"{target}/experts.safetensors")
        if rank == 0:
            torch.save(after, f"{target}/expected.pt")
    with open(f"{target if target != '-' else source}/report_ep{ep_size}_{rank}.json", "w") as f:
        json.dump(report, f)


def main() -> None:
    if sys.argv[1] in ("zero", "resume"):
        from vlmoe.train.distributed import init_distributed

        init_distributed(timeout_s=120, shm_comm=False)  # as the trainer's tests: no shm op build
    else:
        dist.init_process_group("gloo")
    try:
        mode = sys.argv[1]
        if mode == "equivalence":
            equivalence(sys.argv[2])
        elif mode == "zero":
            for spec in sys.argv[2].split(","):  # "STAGE:EP" or "STAGE:EP:nobridge"
                stage, ep_size, *flag = spec.split(":")
                zero(int(stage), int(ep_size), f"{sys.argv[3]}.{spec.replace(':', '_')}", bridge=flag != ["nobridge"])
        elif mode == "resume":
            resume(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    skip_interpreter_teardown()
