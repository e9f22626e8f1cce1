"""Rank program for tests/test_moe_distributed.py (launched with torchrun, gloo).

  equivalence OUT.json   EP=2 over the world vs EP=1 on the same global tokens: outputs and grads
  zero SPECS OUT          per spec STAGE:EP[:nobridge], two SGD steps through a DeepSpeed engine vs by hand
  reshard save|load DIR  EP=2 writes its experts + outputs / reads experts written by EP=1
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from vlmoe.moe import MoE
from vlmoe.moe.expert_checkpoint import load_experts, save_experts


def _tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 10, 16, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 4 + 3 * rank:] = False  # different real-token counts: different capacities per rank
    return x, mask


def equivalence(out_path: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = dict(k=2, capacity_factor=0.25, min_capacity=0, noise_std=0.0, aux_losses=("switch",), seed=7)
    torch.manual_seed(0)
    sharded = MoE(16, 24, 8, ep_group=dist.group.WORLD, **kwargs).train()
    torch.manual_seed(0)
    full = MoE(16, 24, 8, **kwargs).train()
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


def reshard_model(ep_group) -> torch.nn.ModuleDict:
    """Two MoE pools, routers identical for any EP size (same seed); experts to be loaded."""
    torch.manual_seed(11)
    return torch.nn.ModuleDict({"a": MoE(16, 24, 8, ep_group=ep_group, min_capacity=0),
                                "b": MoE(16, 24, 8, k=2, ep_group=ep_group, min_capacity=0)}).eval()


def reshard_forward(model: torch.nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    h = x + model["a"](x)
    return h + model["b"](h)


def reshard_tokens(rank: int) -> torch.Tensor:
    return torch.randn(40, 16, generator=torch.Generator().manual_seed(300 + rank))


def reshard(direction: str, directory: str) -> None:
    """save: perturb the experts, write them and each rank's outputs; load: read experts, write outputs."""
    rank = dist.get_rank()
    model = reshard_model(dist.group.WORLD)
    if direction == "save":
        with torch.no_grad():
            for layer in model.values():
                for p in layer.experts.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rank)) * 0.05)
        save_experts(model, f"{directory}/experts_ep2.safetensors")
    else:
        load_experts(model, f"{directory}/experts_ep1.safetensors")
    with torch.no_grad():
        torch.save(reshard_forward(model, reshard_tokens(rank)), f"{directory}/out_ep2_{direction}_{rank}.pt")


class _TinyMoEModel(torch.nn.Module):
    def __init__(self, ep_group) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.proj = torch.nn.Linear(16, 16)
        self.moe = MoE(16, 24, 8, k=1, capacity_factor=1.0, min_capacity=0, noise_std=0.0, aux_losses=("switch",),
                       aux_weight=0.1, ep_group=ep_group, init_std=0.5)

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


def main() -> None:
    if sys.argv[1] == "zero":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
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
        elif mode == "reshard":
            reshard(sys.argv[2], sys.argv[3])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
