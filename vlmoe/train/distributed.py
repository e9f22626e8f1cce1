"""Process-group setup shared by every command: one code path for gloo (CPU) and nccl (GPU)."""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _set_default_timeout(timeout: datetime.timedelta) -> None:
    # ZeRO and expert-parallel groups are made by new_group() without a timeout, which then
    # falls back to these module defaults (30 min), not to init_distributed's timeout; a hung
    # peer would block every rank for half an hour.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout


def init_distributed(timeout_s: int, shm_comm: bool = True) -> DistInfo:
    """Join the job started by ``deepspeed``/``torchrun`` (or run alone without a launcher).

    The backend follows DeepSpeed's accelerator: nccl on CUDA, gloo on CPU.
    ``shm_comm=False`` skips DeepSpeed's CPU shared-memory allreduce (a 1-2 minute C++ build
    on first use); results are the same, only slower on CPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    timeout = datetime.timedelta(seconds=timeout_s)
    _set_default_timeout(timeout)
    if not shm_comm:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:  # a plain `python -m vlmoe ...`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(timeout=timeout, verbose=False)
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accelerator.device_name())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict).

    Keys must be the same on every rank; every rank receives the result.
    """
    if not values:
        return {}
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.tolist()))


def shutdown_distributed() -> None:
    """End a finished distributed command: every rank waits for the others, then leaves at once.

    A rank that exits while a peer still talks to it over gloo, or that tears its process groups
    down in the interpreter's exit (DeepSpeed keeps references to them), can abort there
    ("terminate called without an active exception") and fail a job whose work was done. After the
    barrier nothing is left to do, so each rank flushes its output and exits without running the
    interpreter's teardown. Only for the command line's process, never inside a library call.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave(code: int, message: str) -> None:
    """Print ``message`` to stderr and exit with ``code``; a rank of a distributed job exits at once
    (see `shutdown_distributed`: the interpreter's teardown could turn the code into an abort)."""
    print(message, file=sys.stderr, flush=True)
    if dist.is_initialized():
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
