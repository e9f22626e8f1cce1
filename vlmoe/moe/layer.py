"""The sparse MoE layer: its router (`TopKRouter`), a token dispatcher, the experts, the combine."""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence, Union

import torch
from torch.profiler import record_function

from vlmoe.moe.config import MoEConfig
from vlmoe.moe.dispatch import IndexDispatcher, merge_routings
from vlmoe.moe.expert_layer import ExpertLayer, TokenInputs, TokenMasks, in_backward, token_groups
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

    takes_token_groups: ClassVar[bool] = True  # forward takes lists of groups (the backbone's protocol)

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

    def forward(self, x: TokenInputs, token_mask: TokenMasks = None,
                tasks: Optional[Sequence[Optional[str]]] = None) -> Union[torch.Tensor, list[torch.Tensor]]:
        """x [..., d_model], token_mask [...] bool (True = real token) -> [..., d_model].

        Or several routing groups in one call: x a list of [..., d_model] tensors, token_mask a
        list (None entries: all real), tasks the pretraining task each serves (per-task metrics;
        default: the current `task_scope`) -> a list of outputs. Each group is routed alone (its
        own capacity, priority order and aux terms, as in separate calls); the experts then run
        once over all groups' buffers, with one all-to-all each way: the backbone sends a
        pretraining step's objectives through here together, which gives the expert GEMMs the
        rows of all of them. (A call, not a second method, so that module hooks see it: ZeRO-3's
        parameter gathering, the FLOP accounting.)
        """
        xs, token_masks = token_groups(x, token_mask)
        outs = self._forward_groups(xs, token_masks, list(tasks) if tasks is not None else [current_task()] * len(xs))
        return outs[0] if isinstance(x, torch.Tensor) else outs

    def _forward_groups(self, xs: list[torch.Tensor], token_masks: list[Optional[torch.Tensor]],
                        tasks: list[Optional[str]]) -> list[torch.Tensor]:
        if not len(xs) == len(token_masks) == len(tasks) or not xs:
            raise ValueError(f"MoE: {len(xs)} inputs, {len(token_masks)} token masks and "
                             f"{len(tasks)} tasks: expected one or more of each, as many of each")
        flats, reals, groups = [], [], []
        for x, token_mask in zip(xs, token_masks):
            if x.shape[-1] != self.d_model:
                raise ValueError(f"MoE: expected last dim {self.d_model}, got input shape {tuple(x.shape)}")
            flat = x.reshape(-1, self.d_model)
            real = None
            if token_mask is not None:
                if token_mask.shape != x.shape[:-1]:
                    raise ValueError(f"MoE: token_mask shape {tuple(token_mask.shape)} does not match input "
                                     f"{tuple(x.shape[:-1])}")
                real = token_mask.reshape(-1).nonzero().squeeze(1)
            flats.append(flat)
            reals.append(real)
            groups.append(flat if real is None else flat.index_select(0, real))
        outs = []
        for x, flat, real, out_tokens in zip(xs, flats, reals, self._moe(groups, tasks)):
            out = out_tokens if real is None else flat.new_zeros(flat.shape).index_copy(0, real, out_tokens)
            outs.append(out.view(x.shape))
        return outs

    def _moe(self, groups: list[torch.Tensor], tasks: Sequence[Optional[str]]) -> tuple[torch.Tensor, ...]:
        """groups[i] [S_i, d] -> ([S_i, d], ...), each group its own routing group."""
        with record_function("vlmoe.moe.router"):
            # the aux terms come on every run, so that an activation-checkpoint re-run saves the same tensors
            routed = [self.router(tokens) for tokens in groups]
            routing = merge_routings([r.routing for r in routed], self.num_experts)
        with record_function("vlmoe.moe.dispatch"):
            tokens = groups[0] if len(groups) == 1 else torch.cat(groups)
            if self.backend == "tutel":
                dispatcher = TutelDispatcher(routing, self.num_experts, self.d_model, tokens.dtype)
            else:
                dispatcher = IndexDispatcher(routing, self.num_experts)
            buffers = dispatcher.dispatch(tokens)
        expert_out = run_experts(buffers, self.experts, self.ep_group, dispatcher.rows_used)
        with record_function("vlmoe.moe.combine"):
            out = dispatcher.combine(expert_out)
        if not in_backward():  # only the first run counts, not an activation-checkpoint re-run
            with record_function("vlmoe.moe.metrics"):
                for group_routed, task in zip(routed, tasks):
                    self._record(group_routed, task)
        return out.split([tokens.shape[0] for tokens in groups])

    def _record(self, routed: RouterOutput, task: Optional[str]) -> None:
        if routed.aux_loss is not None:
            self._aux_sum = routed.aux_loss if self._aux_sum is None else self._aux_sum + routed.aux_loss
            self._aux_calls += 1
        self.stats.update(routed.routing, task, routed.aux_terms)

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """The weighted aux loss, averaged over training calls since the last pop (None if none); resets."""
        if self._aux_sum is None:
            return None
        loss = self._aux_sum / self._aux_calls
        self._aux_sum, self._aux_calls = None, 0
        return loss

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, ep_size={self.ep_size}, backend={self.backend}"
