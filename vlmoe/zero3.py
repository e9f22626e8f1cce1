"""Models whose parameters ZeRO-3 partitions from the start: build, initialise and load them.

Under ZeRO-3 the trainer builds models inside ``partitioned_construction``
(``deepspeed.zero.Init``): each module's own parameters are partitioned over the ranks as its
constructor returns, so no rank ever holds the whole model. Code that touches parameters after
their module was built (an init pass over the model, loading a checkpoint) must see whole
tensors: ``full_parameters`` gathers them for the duration and keeps rank 0's values.
Outside ZeRO-3 every helper here is a plain no-op wrapper, so one code path serves both.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Mapping, Optional

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that deepspeed.zero.Init (or a ZeRO-3 engine) partitioned."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, also when only a partition is held locally."""
    return tuple(getattr(param, "ds_shape", param.shape))


def zero3_enabled(ds_config: Optional[Mapping]) -> bool:
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


@contextmanager
def partitioned_construction(ds_config: Optional[Mapping]) -> Iterator[bool]:
    """Build our models inside this. Under ZeRO-3 (per ``ds_config``) parameters are partitioned
    as their modules are built; otherwise nothing changes. Yields whether partitioning is on.

    Only construction belongs inside, never loading: ``deepspeed.zero.Init`` makes every
    floating-point tensor created meanwhile in the training dtype (and on the device), so a
    checkpoint read inside would reinterpret fp32 storage as bf16.
    """
    if not zero3_enabled(ds_config):
        yield False
        return
    import deepspeed

    # mem_efficient_linear=False: otherwise zero.Init replaces torch.nn.functional.linear for
    # the rest of the process, which the ZeRO-3 engine does not need.
    with deepspeed.zero.Init(config_dict_or_path=dict(ds_config), mem_efficient_linear=False):
        yield True


@contextmanager
def hf_partitioning(ds_config: Optional[Mapping]) -> Iterator[bool]:
    """Build (and load) Hugging Face models inside this. Under ZeRO-3 transformers partitions
    them itself, as it does while its DeepSpeed config object lives: it builds them under
    zero.Init without init, initialises module by module on gathered weights, and loads
    pretrained weights (with its key conversions) one module at a time, outside zero.Init.
    """
    if not zero3_enabled(ds_config):
        yield False
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(dict(ds_config))  # transformers holds only a weak reference
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def _parameters(modules: tuple[nn.Module, ...], recurse: bool) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters(recurse=recurse):
            seen.setdefault(id(param), param)
    return list(seen.values())


def full_parameters(*modules: nn.Module, recurse: bool = True):
    """Inside this, the modules' parameters are whole tensors that can be changed in place.

    Partitioned ones are gathered, and rank 0's values are partitioned back on exit (every
    rank runs the same code, so they agree; rank 0 decides). Unpartitioned ones are untouched.
    """
    partitioned = [p for p in _parameters(modules, recurse) if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def local_fraction(module: nn.Module) -> float:
    """The share of the module's parameter elements this rank holds (1.0 when unpartitioned)."""
    params = _parameters((module,), recurse=True)
    whole = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    local = sum(int(p.ds_tensor.numel()) if is_partitioned(p) else p.numel() for p in params)
    return local / max(whole, 1)


@torch.no_grad()
def load_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
                    source: str = "state") -> tuple[list[str], list[str]]:
    """``module.load_state_dict`` that also fills partitioned parameters, one submodule at a time
    (only that submodule's parameters are gathered). Returns (missing, unexpected) keys.

    Errors name ``source``: shape mismatches always, and with ``strict`` missing or unexpected keys.
    """
    errors: list[str] = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        with full_parameters(sub, recurse=False):
            # key bookkeeping is per submodule here; it is done once for the whole module below
            sub._load_from_state_dict(state, prefix, {}, True, [], [], errors)
    known = set(module.state_dict().keys())
    missing, unexpected = sorted(known - set(state)), sorted(set(state) - known)
    if errors:
        raise ValueError(f"{source}: " + "; ".join(errors))
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not fit {type(module).__name__}: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return missing, unexpected


@torch.no_grad()
def gathered_state_dict(module: nn.Module, keep: bool = True, skip: frozenset = frozenset()) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as whole CPU tensors, gathered one submodule at a time from ZeRO-3
    partitions (collective: every rank calls; only ranks with ``keep`` collect, the others return
    {}). Keys in ``skip`` are left out (e.g. experts, gathered over their own group)."""
    state: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        with full_parameters(sub, recurse=False):
            if not keep:
                continue
            for key, tensor in sub._parameters.items():
                if tensor is not None and prefix + key not in skip:
                    state[prefix + key] = tensor.detach().cpu().clone()
            for key, tensor in sub._buffers.items():
                if tensor is not None and key not in sub._non_persistent_buffers_set and prefix + key not in skip:
                    state[prefix + key] = tensor.detach().cpu().clone()
    return state
