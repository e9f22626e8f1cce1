"""Adapter configurations: SMoLA, LoRA and full fine-tuning, one inject path for all three.

target_modules selects linears by name, like PEFT: a list of names or dotted suffixes
("q", "attn.out"), a regex string matched against the full name, or "all-linear" (every
nn.Linear except output heads). exclude_modules uses the same list/regex forms.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

Targets = Union[str, list]
SMOLA_MODES = ("omni", "mm", "v", "t")


def _check_targets(name: str, value: Any) -> None:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        return
    empty_targets = name == "target_modules" and isinstance(value, (list, tuple)) and not value
    if empty_targets or not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"{name} must be a regex string, 'all-linear', or a list of module names; got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


@dataclass
class SMoLAConfig:
    """Soft mixtures of ``num_experts`` rank-``rank`` experts on each targeted linear.

    mode: "omni" (MM + V + T blocks), "mm" (all tokens), "v" (visual only), "t" (text only).
    Only blocks whose tokens can arrive are created: in a module the model declares vision- or
    text-only (``smola.omni.MODALITY_ATTR``; our multiway backbone's V-FFN and T-FFN), an omni
    linear gets MM plus that modality's block, and "v" / "t" leave the other modality's linears
    unwrapped.
    """

    num_experts: int = 48
    rank: int = 4
    mode: str = "omni"
    target_modules: Targets = "all-linear"
    exclude_modules: Targets = field(default_factory=list)
    method: ClassVar[str] = "smola"

    def __post_init__(self) -> None:
        _check_positive_int("num_experts", self.num_experts)
        _check_positive_int("rank", self.rank)
        if self.mode not in SMOLA_MODES:
            raise ValueError(f"SMoLA mode must be one of {SMOLA_MODES}; got {self.mode!r}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)


@dataclass
class LoRAConfig:
    """LoRA of rank ``rank`` on each targeted linear, its B A x scaled by ``scale`` (PEFT's lora_alpha / r)."""

    rank: int = 4
    scale: float = 1.0
    target_modules: Targets = "all-linear"
    exclude_modules: Targets = field(default_factory=list)
    method: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        _check_positive_int("rank", self.rank)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"LoRA scale must be a number; got {self.scale!r}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)


@dataclass
class FullConfig:
    """Full fine-tuning: every parameter of the targeted modules trains ("all" = the model)."""

    target_modules: Targets = "all"
    exclude_modules: Targets = field(default_factory=list)
    method: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)


AdapterConfig = Union[SMoLAConfig, LoRAConfig, FullConfig]
CONFIG_CLASSES = {c.method: c for c in (SMoLAConfig, LoRAConfig, FullConfig)}


def config_to_dict(config: AdapterConfig) -> dict:
    """JSON-ready dict with a "method" key."""
    out = {"method": config.method}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict, where: str = "adapter config") -> AdapterConfig:
    """The config a dict describes ("method": smola | lora | full); unknown keys are errors."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    method = data.get("method")
    if method not in CONFIG_CLASSES:
        raise ValueError(f"{where}: 'method' must be one of {sorted(CONFIG_CLASSES)}; got {method!r}")
    cls = CONFIG_CLASSES[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"method"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for method {method!r}; known: {sorted(known)}")
    return cls(**{k: v for k, v in data.items() if k != "method"})
