"""Which tokens are real and which are visual, for adapters deep inside a backbone.

A backbone declares, around each sub-module call, the token masks that hold for every
``[B, n, d]`` input inside that region; SMoLA blocks read them. Our multiway backbone does
this itself; for other models see ``smola.modality_hooks``.

Gradient checkpointing re-runs a region's forward during backward, outside any
``token_masks`` block declared around the checkpointed call. ``token_masks_for`` therefore
remembers, per adapter module, the masks of its last forward and hands them back while
autograd recomputes.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

_CURRENT: contextvars.ContextVar[Optional["TokenMasks"]] = contextvars.ContextVar("smola_token_masks", default=None)
_RECORD_ATTR = "_smola_masks_at_forward"


@dataclass(frozen=True)
class TokenMasks:
    """Token masks for inputs of shape [B, n, d].

    valid: [B, n] bool, True = a real token (False = padding), or None if all are real.
    visual: [B, n] bool, True = a visual token, False = a text token, or None if unknown.
    """

    valid: Optional[torch.Tensor]
    visual: Optional[torch.Tensor]


@contextlib.contextmanager
def token_masks(valid: Optional[torch.Tensor] = None, visual: Optional[torch.Tensor] = None) -> Iterator[TokenMasks]:
    """Declare the token masks for every [B, n, d] input inside this block (nests)."""
    masks = TokenMasks(valid, visual)
    token = _CURRENT.set(masks)
    try:
        yield masks
    finally:
        _CURRENT.reset(token)


def current_token_masks() -> Optional[TokenMasks]:
    """The innermost declared masks, or None outside any ``token_masks`` block."""
    return _CURRENT.get()


def _autograd_is_running() -> bool:
    """True inside a backward pass, where checkpointed forwards are recomputed."""
    return torch._C._current_graph_task_id() != -1


def token_masks_for(owner: object) -> Optional[TokenMasks]:
    """The masks for one call of ``owner`` (an adapter module), checkpoint-safe.

    Outside backward: the current masks, remembered on ``owner`` (also under no_grad,
    which is how reentrant checkpointing runs the first forward). During a backward-time
    recomputation with no masks declared: the remembered ones (a module called several
    times in one checkpointed forward gets its last call's).
    """
    masks = _CURRENT.get()
    if _autograd_is_running():
        return masks if masks is not None else owner.__dict__.get(_RECORD_ATTR)
    owner.__dict__[_RECORD_ATTR] = masks
    return masks
