"""The sparse MoE layer: router, top-k routing with capacity and BPR, dispatch, experts, combine."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.model.init import init_linears_
from vlmoe.moe.dispatch import IndexDispatcher
from vlmoe.moe.expert_layer import ExpertLayer, in_backward
from vlmoe.moe.experts import Experts
from vlmoe.moe.losses import AUX_LOSSES, NEEDS_NOISE, RouterTensors, aux_loss_terms, weighted_aux_loss
from vlmoe.moe.metrics import RoutingStats
from vlmoe.moe.parallel import ep_rank_and_size, run_expert_parallel
from vlmoe.moe.router import Routing, expert_capacity, route
from vlmoe.moe.tutel_dispatch import TutelDispatcher, check_backend


def _current_task() -> Optional[str]:
    # Imported here, not at the top: the backbone package (owner of the task contextvar) builds MoE layers.
    from vlmoe.model.task import current_task

    return current_task()


class MoE(ExpertLayer):
    """Sparse mixture of FFN experts replacing one FFN: forward(x [..., d_model], token_mask) -> same shape.

    Tokens (those with token_mask True, all if None) form one routing group; padding takes no
    capacity and gets zero output, as do dropped tokens (the residual carries them). In training
    the layer keeps its weighted aux loss (`pop_aux_loss`) and routing statistics
    (`pop_metrics`) so that the return type stays a tensor.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int = 1, capacity_factor: float = 1.05,
                 eval_capacity_factor: float = 1.0, batch_priority: bool = True, min_capacity: int = 4,
                 noise_std: float = 1.0, aux_losses: Sequence[str] = ("vloss",), aux_weight: float = 0.01,
                 z_loss_weight: float = 0.0, ep_group: Optional[object] = None, init_std: float = 0.02,
                 seed: Optional[int] = None, metric_prefix: str = "moe", backend: str = "ours") -> None:
        super().__init__()
        check_backend(backend, "MoE")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoE: k must be in [1, num_experts={num_experts}], got {k}")
        if capacity_factor <= 0 or eval_capacity_factor <= 0:
            raise ValueError(f"MoE: capacity factors must be > 0, got {capacity_factor}, {eval_capacity_factor}")
        unknown = sorted(set(aux_losses) - set(AUX_LOSSES))
        if unknown:
            raise ValueError(f"MoE: unknown aux loss(es) {unknown}; choose from {sorted(AUX_LOSSES)}")
        if noise_std <= 0 and NEEDS_NOISE.intersection(aux_losses):
            raise ValueError(f"MoE: aux losses {sorted(NEEDS_NOISE.intersection(aux_losses))} need noise_std > 0")
        ep_rank, ep_size = ep_rank_and_size(ep_group)
        if num_experts % ep_size:
            raise ValueError(f"MoE: num_experts={num_experts} is not divisible by the EP group size {ep_size}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.batch_priority, self.min_capacity, self.noise_std = batch_priority, min_capacity, noise_std
        self.aux_losses, self.aux_weight, self.z_loss_weight = tuple(aux_losses), aux_weight, z_loss_weight
        self.ep_group, self.ep_size = ep_group, ep_size
        self.metric_prefix, self.backend = metric_prefix, backend
        self.router = nn.Linear(d_model, num_experts, bias=False)
        init_linears_(self.router, std=init_std)
        num_local = num_experts // ep_size
        self.experts = Experts(d_model, d_ff, num_local, first_expert=ep_rank * num_local, init_std=init_std,
                               seed=seed)
        # per mode (see ExpertLayer): an evaluation neither takes nor adds to the training routing
        self.train_stats, self.eval_stats = RoutingStats(num_experts), RoutingStats(num_experts)
        self._aux_sum: Optional[torch.Tensor] = None
        self._aux_calls = 0

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., d_model], token_mask [...] bool (True = real token) -> [..., d_model]."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE: expected last dim {self.d_model}, got input shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        if token_mask is not None:
            if token_mask.shape != x.shape[:-1]:
                raise ValueError(f"MoE: token_mask shape {tuple(token_mask.shape)} does not match input "
                                 f"{tuple(x.shape[:-1])}")
            real = token_mask.reshape(-1).nonzero().squeeze(1)
            tokens = flat.index_select(0, real)
        else:
            tokens = flat
        out_tokens = self._moe(tokens)
        if token_mask is not None:
            out = flat.new_zeros(flat.shape).index_copy(0, real, out_tokens)
        else:
            out = out_tokens
        return out.view(x.shape)

    def _moe(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [S, d] -> [S, d] for one routing group."""
        logits = F.linear(tokens.float(), self.router.weight.float())  # [S, E], routing in fp32
        noise_std = self.noise_std / self.num_experts if self.training and self.noise_std > 0 else 0.0
        noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(tokens.shape[0], self.num_experts, self.k, capacity_factor, self.min_capacity)
        routing = route(noisy, self.k, capacity, self.batch_priority)
        if self.backend == "tutel":
            dispatcher = TutelDispatcher(routing, self.num_experts, self.d_model, tokens.dtype)
        else:
            dispatcher = IndexDispatcher(routing, self.num_experts)
        buffers = dispatcher.dispatch(tokens)
        if self.ep_group is None:
            expert_out = self.experts(buffers, dispatcher.rows_used)
        else:
            expert_out = run_expert_parallel(buffers, self.experts, self.ep_group)
        out = dispatcher.combine(expert_out)
        # Aux terms are computed on every run so that an activation-checkpoint re-run saves the
        # same tensors; only the first run (not inside backward) records them.
        terms = self._aux_terms(routing, logits, noisy, noise_std)
        if not in_backward():
            self._record(routing, terms)
        return out

    def _aux_terms(self, routing: Routing, logits: torch.Tensor, noisy: torch.Tensor,
                   noise_std: float) -> dict[str, torch.Tensor]:
        if not self.training or logits.shape[0] == 0:
            return {}
        # Importance uses the clean gates; routing used the noisy ones (as in vmoe).
        clean_gates = torch.softmax(logits, dim=-1) if noise_std > 0 else routing.gates
        tensors = RouterTensors(logits=logits, noisy_logits=noisy, gates=clean_gates, expert=routing.expert,
                                k=self.k, noise_std=noise_std)
        return aux_loss_terms(self.aux_losses, tensors, self.z_loss_weight)

    def _record(self, routing: Routing, terms: dict[str, torch.Tensor]) -> None:
        total = weighted_aux_loss(terms, self.aux_weight, self.z_loss_weight)
        if total is not None:
            self._aux_sum = total if self._aux_sum is None else self._aux_sum + total
            self._aux_calls += 1
        self.stats.update(routing, _current_task(), terms)

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """The weighted aux loss, averaged over training calls since the last pop (None if none); resets."""
        if self._aux_sum is None:
            return None
        loss = self._aux_sum / self._aux_calls
        self._aux_sum, self._aux_calls = None, 0
        return loss


    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, ep_size={self.ep_size}, "
                f"capacity_factor={self.capacity_factor}/{self.eval_capacity_factor}, backend={self.backend}, "
                f"batch_priority={self.batch_priority}, aux={self.aux_losses}")
