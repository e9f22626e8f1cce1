"""Reusable CPU memory for the expert weight gradients.

An expert pool's weight gradient is one large tensor ([E, d, d_ff]); the CPU allocator hands
blocks that large back to the operating system when they are freed, so a fresh one every step
page-faults its way in again (on 2 cores, ~0.1 s per 300 MB: about 10% of an E=32 layer's
step). Like DDP's gradient_as_bucket_view, the gradient is written into memory the layer keeps,
and autograd adopts a view of it as `.grad`. The memory is reused only once nobody else holds
it (the optimizer dropped the gradient, or copied it into its own buffers); while a `.grad` or
any other tensor still refers to it, a fresh block is taken, so no live gradient is overwritten.
Accelerator memory is cached by its own allocator, so only CPU tensors go through here.
"""
from __future__ import annotations

import torch


def _unshared(tensor: torch.Tensor) -> bool:
    # Our tensor and the temporary storage handle are the two expected owners of the storage.
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2


class GradientBuffers:
    """Named pools of gradient buffers: `take(name, like)` gives memory shaped like `like` to write into.

    A name keeps every buffer it has handed out, so a layer called more than once per step (the
    backbone calls it once with all objectives; other callers may call it once per input) gets a
    second one for its second backward while the first is `.grad` (autograd adds the second into
    it and drops it), and finds both free again next step. A pool keeps at most `POOL_SIZE`
    buffers (one per pretraining objective); past that, memory that is still held elsewhere is
    replaced by fresh blocks that are not kept.
    """

    POOL_SIZE = 3

    def __init__(self) -> None:
        self._pools: dict[str, list[torch.Tensor]] = {}

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor like `like`, on reused memory where that is safe."""
        if like.device.type != "cpu":
            return torch.empty_like(like)
        pool = [b for b in self._pools.get(name, []) if b.shape == like.shape and b.dtype == like.dtype]
        buffer = next((b for b in pool if _unshared(b)), None)
        if buffer is None:
            buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
            if len(pool) < self.POOL_SIZE:
                pool.append(buffer)
        self._pools[name] = pool
        return buffer.view_as(buffer)  # a new tensor on the same memory, for autograd to adopt
