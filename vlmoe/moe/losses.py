"""Auxiliary routing losses: importance, load, vloss (V-MoE), switch (Switch/GShard), z-loss (ST-MoE).

Pure functions of one group's router tensors; std is the population std (VL-MoE A.3, vmoe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vlmoe.moe.counts import expert_counts


def _cv_squared(values: torch.Tensor) -> torch.Tensor:
    """(std / mean)^2 over the last dim, population variance (no undefined std gradient at 0)."""
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1) ** 2


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Omega_imp: CV^2 of the per-expert summed gates. gates: [S, E] softmax -> scalar."""
    return _cv_squared(gates.sum(dim=0))


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, k: int, noise_std: float) -> torch.Tensor:
    """Omega_load: CV^2 of the per-expert probability of being in the top-k under resampled noise.

    logits, noisy_logits: [S, E]; noise_std: the std sigma of the noise that was added.
    Threshold = the k-th largest noisy logit of each token; the clean logits go inside the
    normal CDF: p[s, e] = 1 - Phi((threshold_s - logits[s, e]) / sigma).
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss needs noisy logits: noise_std must be > 0, got {noise_std}")
    threshold = torch.topk(noisy_logits, k, dim=-1).values[:, -1:]  # [S, 1]
    noise_required = (threshold - logits) / noise_std
    p = 1.0 - 0.5 * (1.0 + torch.erf(noise_required / math.sqrt(2.0)))
    return _cv_squared(p.mean(dim=0))


def vloss(gates: torch.Tensor, logits: torch.Tensor, noisy_logits: torch.Tensor, k: int,
          noise_std: float) -> torch.Tensor:
    """V-MoE's auxiliary loss: the mean of the importance and load losses (scalar)."""
    return 0.5 * (importance_loss(gates) + load_loss(logits, noisy_logits, k, noise_std))


def switch_loss(gates: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load balancing: E * sum_e f_e * P_e.

    gates: [S, E] softmax; expert_index: [S] or [S, k] chosen experts (top-1 is column 0, the
    only one used, as in Switch). f_e = fraction of tokens whose top-1 is e, P_e = mean gate.
    Equals 1 under perfect balance.
    """
    num_experts = gates.shape[-1]
    top1 = expert_index if expert_index.dim() == 1 else expert_index[:, 0]
    fraction = expert_counts(top1, num_experts).to(gates.dtype) / top1.numel()
    return num_experts * torch.sum(fraction * gates.mean(dim=0))


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. logits: [S, E] -> scalar."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@dataclass(frozen=True)
class RouterTensors:
    """What the aux losses of one group are computed from.

    logits, noisy_logits: [S, E] (noisy_logits is logits when no noise was added);
    gates: [S, E] softmax of the clean logits; expert: [S, k] chosen experts; k; noise_std:
    the std of the added noise (0 = none).
    """

    logits: torch.Tensor
    noisy_logits: torch.Tensor
    gates: torch.Tensor
    expert: torch.Tensor
    k: int
    noise_std: float


AUX_LOSSES: dict[str, Callable[[RouterTensors], torch.Tensor]] = {
    "importance": lambda r: importance_loss(r.gates),
    "load": lambda r: load_loss(r.logits, r.noisy_logits, r.k, r.noise_std),
    "vloss": lambda r: vloss(r.gates, r.logits, r.noisy_logits, r.k, r.noise_std),
    "switch": lambda r: switch_loss(r.gates, r.expert),
}
"""Selectable balancing terms, by config name. Load-based terms need noise_std > 0."""

NEEDS_NOISE = frozenset({"load", "vloss"})


def aux_loss_terms(names: tuple[str, ...], tensors: RouterTensors,
                   z_loss_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Each selected balancing term by name, plus "z" when `z_loss_weight` > 0 (unweighted values)."""
    terms = {}
    for name in names:
        if name not in AUX_LOSSES:
            raise ValueError(f"unknown aux loss {name!r}; choose from {sorted(AUX_LOSSES)}")
        terms[name] = AUX_LOSSES[name](tensors)
    if z_loss_weight > 0:
        terms["z"] = z_loss(tensors.logits)
    return terms


def weighted_aux_loss(terms: dict[str, torch.Tensor], aux_weight: float,
                      z_loss_weight: float) -> Optional[torch.Tensor]:
    """aux_weight * sum of balancing terms + z_loss_weight * z; None when there are no terms."""
    total = None
    for name, value in terms.items():
        term = value * (z_loss_weight if name == "z" else aux_weight)
        total = term if total is None else total + term
    return total
