"""Expert parallelism: experts sharded over an EP process group, buffers exchanged by all-to-all.

Rank r of an EP group of size P holds experts r*E/P .. (r+1)*E/P - 1. Each rank routes its own
tokens (its own group, its own capacity C_r); `ExpertParallelExchange` sends each expert's
[C_r, d] buffer to the rank holding it, runs the local experts on [E/P, sum_r C_r, d] and sends
the outputs back. Works on gloo (CPU) and nccl through `all_to_all_single` with split sizes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.profiler import record_function


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on dim 0 with split sizes; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = tensor.new_empty((sum(recv_splits),) + tuple(tensor.shape[1:]))
        dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send_splits,
                               input_split_sizes=ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of the rows of `tensor` ([sum(send_splits), ...])."""
    return _AllToAll.apply(tensor, send_splits, recv_splits, group)


def gather_capacities(capacity: int, group, device: torch.device) -> list[int]:
    """The capacity C_r of every rank of the EP group (ranks may route different token counts)."""
    size = dist.get_world_size(group)
    mine = torch.tensor([capacity], dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    return [int(c.item()) for c in everyone]


def run_expert_parallel(buffers: torch.Tensor, experts: Callable[[torch.Tensor], torch.Tensor], group) -> torch.Tensor:
    """Apply experts sharded over `group` to this rank's buffers.

    buffers: [E, C, d] for all E experts of the pool (this rank's tokens); experts: maps
    [E/P, sum_r C_r, d] -> same shape for the experts this rank holds. Returns [E, C, d].
    """
    num_experts, capacity, dim = buffers.shape
    size = dist.get_world_size(group)
    num_local = num_experts // size
    capacities = gather_capacities(capacity, group, buffers.device)
    send = [num_local * capacity] * size  # rows for each destination rank
    recv = [num_local * c for c in capacities]  # rows from each source rank
    with record_function("vlmoe.moe.all_to_all"):
        received = all_to_all(buffers.reshape(num_experts * capacity, dim), send, recv, group)
    # From source r: [E/P, C_r, d]; the local experts take all sources side by side.
    per_source = [chunk.view(num_local, c, dim) for chunk, c in zip(received.split(recv), capacities)]
    with record_function("vlmoe.moe.experts"):
        local_out = experts(torch.cat(per_source, dim=1))
    back = torch.cat([part.reshape(-1, dim) for part in local_out.split(capacities, dim=1)], dim=0)
    with record_function("vlmoe.moe.all_to_all"):
        returned = all_to_all(back, recv, send, group)
    return returned.view(num_experts, capacity, dim)


def run_experts(buffers: torch.Tensor, experts: Callable[..., torch.Tensor], group,
                rows_used: Optional[torch.Tensor] = None) -> torch.Tensor:
    """buffers [E, C, d] -> [E, C, d]: the local `experts` (rows_used: [E] filled rows, a hint for
    them), or, with an EP `group`, the experts sharded over it (`run_expert_parallel`)."""
    if group is None:
        with record_function("vlmoe.moe.experts"):
            return experts(buffers, rows_used)
    return run_expert_parallel(buffers, experts, group)


def expert_parallel_group(ep_size: int):
    """DeepSpeed's expert-parallel group "ep_size_{ep_size}" for this rank, created if missing.

    Needs torch.distributed initialised; also creates the matching expert-data-parallel group,
    over which DeepSpeed reduces expert gradients.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed initialised before the model is built")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {world}")
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend=dist.get_backend())
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert (data) parallel groups of this EP size."""
    return f"ep_size_{ep_size}"


def ep_rank_and_size(group: Optional[object]) -> tuple[int, int]:
    """(rank in the EP group, its size); (0, 1) without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
