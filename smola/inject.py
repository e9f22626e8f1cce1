"""Wrap the linears of any torch / Hugging Face model by name pattern; report trainables; merge.

Injection freezes everything already in the model, then wraps each targeted nn.Linear
(or, for a linear already wrapped by an adapter, that adapter's innermost frozen linear,
so LoRA specialists stack on a SMoLA generalist without renaming its tensors). The
applied configs are recorded on the model, in order, for ``save_adapter``.

SMoLA's V and T blocks go only where their tokens can arrive: inside a sub-module the model
declares vision-only or text-only (``smola.omni.MODALITY_ATTR``, e.g. our multiway backbone's
V-FFN and T-FFN), an omni linear gets mm plus that modality's block, and a "v" or "t" mode
leaves the other modality's linears unwrapped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn

from smola.block import SMoLALinear
from smola.config import AdapterConfig, FullConfig, LoRAConfig, SMoLAConfig, Targets, config_from_dict, config_to_dict
from smola.lora import LoRALinear
from smola.omni import MODALITIES, MODALITY_ATTR, OmniSMoLALinear, reachable_branches

ADAPTER_TYPES = (SMoLALinear, OmniSMoLALinear, LoRALinear)
STACK_ATTR = "_smola_adapter_stack"
# Output heads that "all-linear" leaves alone (besides the model's get_output_embeddings()).
HEAD_NAMES = frozenset({"lm_head", "classifier", "cls", "score", "qa_outputs", "head", "heads"})


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES or part.endswith("_head") for part in name.split("."))


def _matches(name: str, pattern: Targets) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


@dataclass
class LinearSite:
    """A targetable linear: its logical name, and where its innermost frozen nn.Linear hangs."""

    name: str
    parent: nn.Module
    attr: str
    linear: nn.Linear


def linear_sites(model: nn.Module) -> Iterator[LinearSite]:
    """Every nn.Linear in the model under its logical name (adapter wrappers see-through)."""
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            parent, attr = module, "base"
            while isinstance(getattr(parent, attr), ADAPTER_TYPES):
                parent = getattr(parent, attr)
            inner = getattr(parent, attr)
            if isinstance(inner, nn.Linear):
                yield LinearSite(name, parent, attr, inner)
            continue
        if isinstance(module, nn.Linear) and not _inside_adapter(model, name):
            parent_name, _, attr = name.rpartition(".")
            yield LinearSite(name, model.get_submodule(parent_name), attr, module)


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), ADAPTER_TYPES) for i in range(1, len(parts)))


def _output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def select_sites(model: nn.Module, config: AdapterConfig) -> list[LinearSite]:
    """The linears ``config.target_modules`` picks, minus exclusions; an error if none."""
    sites = list(linear_sites(model))
    targets = config.target_modules
    if targets == "all-linear":
        head = _output_embeddings(model)
        chosen = [s for s in sites if not _is_head(s.name) and s.linear is not head]
    else:
        chosen = [s for s in sites if _matches(s.name, targets)]
        if isinstance(targets, (list, tuple)):
            missing = [t for t in targets if not any(s.name == t or s.name.endswith("." + t) for s in sites)]
            if missing:
                raise ValueError(f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
                                 f"linears are e.g. {[s.name for s in sites[:8]]}")
    chosen = [s for s in chosen if not (config.exclude_modules and _matches(s.name, config.exclude_modules))]
    if not chosen:
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear in {type(model).__name__}; "
                         f"linears are e.g. {[s.name for s in sites[:8]]}")
    return chosen


def declared_modality(model: nn.Module, name: str) -> Optional[str]:
    """The modality ("v" or "t") of every token that reaches the module ``name``, as its ancestors
    declare it with ``MODALITY_ATTR`` ({child name: "v" | "t"}); None when any token may."""
    modality: Optional[str] = None
    module = model
    prefix = []
    for part in name.split("."):
        declared = getattr(module, MODALITY_ATTR, None)
        if declared is not None:
            where = ".".join(prefix) or type(model).__name__
            if not isinstance(declared, dict) or not all(isinstance(k, str) and v in MODALITIES for k, v in declared.items()):
                raise ValueError(f"{where}.{MODALITY_ATTR} must map child names to one of {MODALITIES}; got {declared!r}")
            inner = declared.get(part)
            if inner is not None and modality is not None and inner != modality:
                raise ValueError(f"{where}.{MODALITY_ATTR} declares {part!r} {inner!r}-only inside a {modality!r}-only "
                                 "module: no token could reach it")
            modality = inner if inner is not None else modality
        prefix.append(part)
        module = getattr(module, part, None)
        if module is None:
            break
    return modality


def site_branches(model: nn.Module, site: LinearSite, config: SMoLAConfig) -> tuple[str, ...]:
    """The SMoLA branches ``config`` puts on ``site``: those its tokens can reach (see
    ``declared_modality``); empty when none can (a "v" mode linear that only text enters)."""
    branches = ("mm", "v", "t") if config.mode == "omni" else (config.mode,)
    return reachable_branches(branches, declared_modality(model, site.name))


def _wrap(linear: nn.Linear, config: Union[SMoLAConfig, LoRAConfig], branches: tuple[str, ...] = ()) -> nn.Module:
    if isinstance(config, LoRAConfig):
        wrapped: nn.Module = LoRALinear(linear, config.rank, config.scale)
    elif config.mode == "mm":
        wrapped = SMoLALinear(linear, config.num_experts, config.rank)
    else:
        wrapped = OmniSMoLALinear(linear, config.num_experts, config.rank, branches)
    return wrapped.to(device=linear.weight.device, dtype=linear.weight.dtype)


def _wrap_plan(model: nn.Module, config: Union[SMoLAConfig, LoRAConfig]) -> list[tuple[LinearSite, tuple[str, ...]]]:
    """(site, SMoLA branches) for each linear ``config`` wraps; an error if no branch fits any."""
    sites = select_sites(model, config)
    if isinstance(config, LoRAConfig) or config.mode == "mm":
        return [(site, ()) for site in sites]
    plan = [(site, site_branches(model, site, config)) for site in sites]
    plan = [(site, branches) for site, branches in plan if branches]
    if not plan:
        raise ValueError(f"SMoLA mode {config.mode!r}: none of the {len(sites)} targeted linears receives "
                         f"{'visual' if config.mode == 'v' else 'text'} tokens (their modules are declared "
                         f"{'text' if config.mode == 'v' else 'vision'}-only by {MODALITY_ATTR}), e.g. {sites[0].name!r}")
    return plan


def _full_targets(model: nn.Module, config: FullConfig) -> list[nn.Parameter]:
    if config.target_modules == "all":
        names = [n for n, _ in model.named_parameters()]
    else:
        names = [n for n, _ in model.named_parameters() if _matches(n.rpartition(".")[0], config.target_modules)]
    if config.exclude_modules:
        names = [n for n in names if not _matches(n.rpartition(".")[0], config.exclude_modules)]
    if not names:
        raise ValueError(f"full fine-tuning target_modules={config.target_modules!r} matched no parameters")
    params = dict(model.named_parameters())
    return [params[n] for n in names]


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze the model and add the adapter ``config`` describes; returns the same model.

    SMoLA / LoRA: each selected linear is wrapped (SMoLALinear for mode "mm",
    OmniSMoLALinear otherwise, with the branches its tokens can reach: ``site_branches``;
    LoRALinear for LoRA); only the new tensors train. Full: the selected parameters train,
    nothing is wrapped.
    """
    if not isinstance(config, (SMoLAConfig, LoRAConfig, FullConfig)):
        raise TypeError(f"inject expects SMoLAConfig, LoRAConfig or FullConfig; got {type(config).__name__}")
    plan = [] if isinstance(config, FullConfig) else _wrap_plan(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(config, FullConfig):
        for p in _full_targets(model, config):
            p.requires_grad_(True)
    else:
        for site, branches in plan:
            setattr(site.parent, site.attr, _wrap(site.linear, config, branches))
    model.__dict__.setdefault(STACK_ATTR, []).append(config_to_dict(config))
    return model


def adapter_stack(model: nn.Module) -> list[dict]:
    """The configs injected into ``model`` so far, in order (as dicts)."""
    return list(model.__dict__.get(STACK_ATTR, []))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every tensor the injected adapters own (what gets saved).

    SMoLA/LoRA: the adapters' own tensors (never a frozen base weight); full fine-tuning:
    the parameters it unfroze.
    """
    stack = adapter_stack(model)
    full = [cfg for cfg in stack if cfg["method"] == "full"]
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            for pname, p in module.named_parameters():
                if not pname.startswith("base."):  # the wrapped module: frozen, or an adapter of its own
                    out[f"{name}.{pname}" if name else pname] = p
    if full:
        for cfg in full:
            params = {id(p) for p in _full_targets(model, config_from_dict(cfg))}
            out.update({n: p for n, p in model.named_parameters() if id(p) in params})
    return dict(sorted(out.items()))


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions report their full size here


@dataclass
class ParameterReport:
    """Parameter counts after injection (ZeRO-3 partitioned tensors counted at full size)."""

    total: int
    trainable: int
    adapter_modules: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.trainable_percent:.4f} || adapted linears: {self.adapter_modules}")


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Counts of all and trainable parameters, and of adapter-wrapped linears."""
    params = list(model.parameters())
    return ParameterReport(
        total=sum(_numel(p) for p in params),
        trainable=sum(_numel(p) for p in params if p.requires_grad),
        adapter_modules=sum(isinstance(m, ADAPTER_TYPES) for m in model.modules()),
    )


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base weights and unwrap them; SMoLA cannot be merged.

    Raises ValueError if the model holds any SMoLA block: its experts are mixed with
    weights computed from each input's tokens, so no fixed weight matrix equals it.
    """
    smola = [n for n, m in model.named_modules() if isinstance(m, (SMoLALinear, OmniSMoLALinear))]
    if smola:
        raise ValueError(
            f"SMoLA adapters cannot be merged into the base weights ({len(smola)} blocks, e.g. {smola[0]!r}): "
            "the dispatch and combine weights depend on the input tokens, so no fixed weight matrix equals "
            "the adapted layer. Keep the adapter (save_adapter / load_adapter) and run the wrapped model."
        )
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.base.weight += module.delta_weight().to(module.base.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base)
    model.__dict__[STACK_ATTR] = [cfg for cfg in adapter_stack(model) if cfg["method"] != "lora"]
    return model
