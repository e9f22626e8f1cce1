"""The sparse MoE layer: its router (`TopKRouter`), a token dispatcher, the experts, the combine."""
from __future__ import annotations

from typing import Optional

import torch
from torch.profiler import record_function

from vlmoe.moe.config import MoEConfig
from vlmoe.moe.dispatch import IndexDispatcher
from vlmoe.moe.expert_layer import ExpertLayer, in_backward
from vlmoe.moe.experts import Experts
from vlmoe.moe.metrics import RoutingStats
from vlmoe.moe.parallel import ep_rank_and_size, run_experts
from vlmoe.moe.router import RouterOutput, TopKRouter
from vlmoe.moe.tutel_dispatch import TutelDispatcher
from vlmoe.nn.task_scope import current_task


class MoE(ExpertLayer):
    """Sparse mixture of FFN experts replacing one FFN: forward(x [..., d_model], token_mask) -> same shape.

    The options come from `config` (an `MoEConfig`, checked when built); `modality` ("v" or "t")
    picks its balancing losses. Tokens (those with token_mask True, all if None) form one routing
    group; padding takes no capacity and gets zero output, as do dropped tokens (the residual
    carries them). In training the layer keeps its weighted aux loss (`pop_aux_loss`) and routing
    statistics (`pop_metrics`) so that the return type stays a tensor.
    """

    def __init__(self, d_model: int, d_ff: int, config: MoEConfig, modality: str = "v",
                 ep_group: Optional[object] = None, init_std: float = 0.02, seed: Optional[int] = None,
                 metric_prefix: str = "moe") -> None:
        super().__init__()
        ep_rank, ep_size = ep_rank_and_size(ep_group)
        if config.num_experts % ep_size:
            raise ValueError(f"MoE: num_experts={config.num_experts} is not divisible by the EP group size {ep_size}")
        self.config, self.d_model = config, d_model
        self.ep_group, self.ep_size, self.metric_prefix = ep_group, ep_size, metric_prefix
        self.router = TopKRouter(d_model, config, config.losses_for(modality), init_std)
        num_local = config.num_experts // ep_size
        self.experts = Experts(d_model, d_ff, num_local, first_expert=ep_rank * num_local, init_std=init_std,
                               seed=seed)
        # per mode (see ExpertLayer): an evaluation neither takes nor adds to the training routing
        self.train_stats, self.eval_stats = RoutingStats(config.num_experts), RoutingStats(config.num_experts)
        self._aux_sum: Optional[torch.Tensor] = None
        self._aux_calls = 0

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def backend(self) -> str:
        return self.config.backend

    @property
    def aux_losses(self) -> tuple[str, ...]:
        return self.router.aux_losses

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
        with record_function("vlmoe.moe.router"):
            # the aux terms come on every run, so that an activation-checkpoint re-run saves the same tensors
            routed = self.router(tokens)
        with record_function("vlmoe.moe.dispatch"):
            if self.backend == "tutel":
                dispatcher = TutelDispatcher(routed.routing, self.num_experts, self.d_model, tokens.dtype)
            else:
                dispatcher = IndexDispatcher(routed.routing, self.num_experts)
            buffers = dispatcher.dispatch(tokens)
        expert_out = run_experts(buffers, self.experts, self.ep_group, dispatcher.rows_used)
        with record_function("vlmoe.moe.combine"):
            out = dispatcher.combine(expert_out)
        if not in_backward():  # only the first run counts, not an activation-checkpoint re-run
            with record_function("vlmoe.moe.metrics"):
                self._record(routed)
        return out

    def _record(self, routed: RouterOutput) -> None:
        if routed.aux_loss is not None:
            self._aux_sum = routed.aux_loss if self._aux_sum is None else self._aux_sum + routed.aux_loss
            self._aux_calls += 1
        self.stats.update(routed.routing, current_task(), routed.aux_terms)

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """The weighted aux loss, averaged over training calls since the last pop (None if none); resets."""
        if self._aux_sum is None:
            return None
        loss = self._aux_sum / self._aux_calls
        self._aux_sum, self._aux_calls = None, 0
        return loss

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, ep_size={self.ep_size}, backend={self.backend}"
