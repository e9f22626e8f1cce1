"""MoEConfig: the options of a run's MoE layers (sparse or soft), checked once here; `MoE`,
`TopKRouter` and `SoftMoE` take it as it is."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from vlmoe.moe.losses import AUX_LOSSES, NEEDS_NOISE
from vlmoe.moe.backends import check_backend

MODALITIES = ("v", "t")
PLACEMENTS = ("lower", "all")
TYPES = ("sparse", "soft")


def _default_aux_losses() -> dict[str, list[str]]:
    # VL-MoE 4.1 and footnote 1: "vloss" (V-MoE's mean of importance and load losses) for the
    # V-FFN MoE, the load loss of Shazeer et al. 2017 (its [57]; formula in A.3) for the T-FFN MoE.
    return {"v": ["vloss"], "t": ["load"]}


@dataclass(frozen=True)
class MoEConfig:
    """Sparse or Soft MoE in the multiway backbone (VL-MoE defaults).

    type: "sparse" (top-k routing, the fields below) or "soft" (Soft MoE, Puigcerver et al. 2023:
    every slot a softmax-weighted mix of its example's tokens, `vlmoe.moe.soft.SoftMoE`, with
    slots_per_expert slots per expert and example). Under "soft" only num_experts,
    slots_per_expert, every, placement, ep_size and freeze apply; k, the capacities,
    batch_priority, noise_std, aux_losses, aux_weight, z_loss_weight and backend are ignored
    (Soft MoE drops no tokens and has no balancing loss).
    num_experts: E per MoE layer and modality. k: experts per token. capacity_factor /
    eval_capacity_factor: C = ceil(k * cf * S / E) in training / evaluation, at least
    min_capacity. batch_priority: BPR. noise_std: logit noise sigma = noise_std / E in training
    (needed by "load" and "vloss"). aux_losses: balancing terms per modality, from
    importance / load / vloss / switch, weighted by aux_weight; default: the paper's vloss for
    V and Shazeer et al.'s load loss for T (Switch's loss stays an option); z_loss_weight > 0
    adds the ST-MoE z-loss. every / placement: MoE in the V-FFN and T-FFN of blocks i with
    i % every == every - 1, in any block ("all", the default: every second V-FFN and T-FFN,
    which gives the paper's ~2B parameters for BASE/32E; the top blocks' V/T-FFNs serve
    image-only and text-only inputs) or only where i < vl_ffn_start ("lower", as the paper's
    section 3 words it, "the first (L - F) layers": 1.67B for BASE/32E).
    ep_size: expert-parallel group size. backend: the token dispatcher, "ours" (index gathers)
    or "tutel" (tutel's kernels, where tutel is installed). freeze: freeze routers and experts
    (fine-tuning, as in ST-MoE / VL-MoE).
    """

    type: str = "sparse"
    num_experts: int = 32
    slots_per_expert: int = 1
    k: int = 1
    capacity_factor: float = 1.05
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    batch_priority: bool = True
    noise_std: float = 1.0
    aux_losses: dict[str, list[str]] = field(default_factory=_default_aux_losses)
    aux_weight: float = 0.01
    z_loss_weight: float = 0.0
    every: int = 2
    placement: str = "all"
    ep_size: int = 1
    backend: str = "ours"
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"MoEConfig.type must be one of {TYPES}, got {self.type!r}")
        for name in ("num_experts", "slots_per_expert", "k", "every", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.k > self.num_experts:
            raise ValueError(f"MoEConfig.k={self.k} is larger than num_experts={self.num_experts}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"MoEConfig.num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be > 0, got {value!r}")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"MoEConfig.min_capacity must be an int >= 0, got {self.min_capacity!r}")
        for name in ("noise_std", "aux_weight", "z_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MoEConfig.{name} must be a number >= 0, got {value!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"MoEConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_backend(self.backend, "MoEConfig")
        if not isinstance(self.aux_losses, Mapping):
            raise ValueError(f"MoEConfig.aux_losses must map modality -> list of loss names, got {self.aux_losses!r}")
        # a modality left out keeps its default (`aux_losses: {t: [switch]}` keeps vloss for V); [] = none
        object.__setattr__(self, "aux_losses", {**_default_aux_losses(), **self.aux_losses})
        for modality, names in self.aux_losses.items():
            if modality not in MODALITIES:
                raise ValueError(f"MoEConfig.aux_losses: unknown modality {modality!r}; use {MODALITIES}")
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"MoEConfig.aux_losses[{modality!r}] must be a list of names, got {names!r}")
            for loss_name in names:
                if loss_name not in AUX_LOSSES:
                    raise ValueError(f"MoEConfig.aux_losses[{modality!r}]: unknown loss {loss_name!r}; "
                                     f"choose from {sorted(AUX_LOSSES)}")
                if loss_name in NEEDS_NOISE and self.noise_std <= 0:
                    raise ValueError(f"MoEConfig.aux_losses[{modality!r}]: {loss_name!r} needs noise_std > 0, "
                                     f"got noise_std={self.noise_std}")

    def losses_for(self, modality: str) -> tuple[str, ...]:
        """The balancing loss names of one modality ("v" or "t")."""
        return tuple(self.aux_losses.get(modality, ()))

    def check_world(self, world_size: int) -> None:
        """Reject an ep_size that does not divide the number of ranks."""
        if world_size % self.ep_size:
            raise ValueError(f"MoEConfig.ep_size={self.ep_size} does not divide the world size {world_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MoEConfig":
        """Build from a mapping (YAML section, checkpoint); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)
