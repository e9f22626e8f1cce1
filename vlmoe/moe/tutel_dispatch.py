"""Tutel's dispatch kernels behind our routing (``MoEConfig.backend = "tutel"``).

Routing (top-k, capacity, batch priority), aux losses, experts and expert parallelism stay
ours; only the token dispatcher changes: tutel's ``fast_dispatcher`` moves tokens into the
same [E, C_buf, d] buffers (its fused CUDA kernels on GPUs, its C++ loops on CPU) and
combines them back weighted by the gates, so outputs and gradients agree with
`IndexDispatcher`. Tutel is not on PyPI; the Docker image builds it from its repository.
"""
from __future__ import annotations

import torch

from vlmoe.moe.dispatch import buffer_capacity, count_rows_used
from vlmoe.moe.router import Routing


class TutelDispatcher:
    """Tokens [S, d] <-> expert buffers [E, C_buf, d] for one routing, through tutel's kernels.

    rows_used: [E] filled rows per expert (rows fill in order), as `IndexDispatcher` has it.
    """

    def __init__(self, routing: Routing, num_experts: int, dim: int, dtype: torch.dtype) -> None:
        from tutel.impls.fast_dispatch import fast_dispatcher

        self.num_experts, self.dim = num_experts, dim
        self.capacity = buffer_capacity(routing.capacity)
        self.rows_used = count_rows_used(routing, num_experts)
        # a dropped choice gets a location past its buffer, which tutel's kernels skip
        locations = torch.where(routing.kept, routing.slot, torch.full_like(routing.slot, self.capacity))
        # tutel takes one contiguous [S] tensor per choice (k-major, as our buffers fill)
        experts, locations, gates = (t.t().contiguous().unbind(0) for t in (routing.expert, locations, routing.weight))
        self._kernels = fast_dispatcher(num_experts, self.capacity, dim, dtype)
        self._kernels.update(list(experts), list(locations), list(gates), capacity=self.capacity)

    def dispatch(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [S, d] -> buffers [E, C_buf, d] (unused rows are zero)."""
        return self._kernels.encode(tokens).view(self.num_experts, self.capacity, self.dim)

    def combine(self, expert_out: torch.Tensor) -> torch.Tensor:
        """buffers [E, C_buf, d] -> tokens [S, d]: sum over kept choices of gate * output."""
        return self._kernels.decode(expert_out.reshape(-1, self.dim))
