"""Non-finite values in training: which objectives went NaN/Inf, and the error that stops a run.

A run stops (``train.on_nonfinite: stop``) before the update of a step whose loss is not finite,
so no checkpoint ever holds what that step would have made of the weights; the last committed
checkpoint stays ``last_good``. ``skip`` leaves that step's update out and counts it.
"""
from __future__ import annotations

import math

import torch

EXIT_CODE = 3  # a run stopped by a non-finite value (2 is a usage error)


class NonFiniteError(RuntimeError):
    """Training met a NaN or Inf it cannot go on from; the message names the step and what."""


def nonfinite_outputs(out: dict) -> list[str]:
    """Names of the scalar outputs (loss and per-objective losses) that are NaN or Inf, sorted."""
    bad = []
    for name, value in out.items():
        if torch.is_tensor(value) and value.numel() == 1 and value.is_floating_point():
            if not torch.isfinite(value.detach()).item():
                bad.append(name)
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(name)
    return sorted(bad)


def local_weights_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's share of the weights is finite (its ZeRO-3 partition where partitioned)."""
    return all(bool(torch.isfinite(_local_values(param)).all()) for param in module.parameters())


def _local_values(param: torch.nn.Parameter) -> torch.Tensor:
    shard = getattr(param, "ds_tensor", None)
    if shard is None:
        return param.detach()
    # ZeRO-3 pads the last partitions to equal sizes with uninitialised memory: only this rank's real elements
    size = shard.ds_numel
    valid = max(0, min(size, param.ds_numel - size * param.ds_zero_partition_rank))
    return shard.detach().reshape(-1)[:valid]
