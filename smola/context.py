"""Which tokens are real and which are visual, for adapters deep inside a backbone.

A backbone declares, around each sub-module call, the token masks that hold for every
``[B, n, d]`` input inside that region; SMoLA blocks read them. Our multiway backbone does
this itself; for other models see ``smola.inject`` (hooks).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

_CURRENT: contextvars.ContextVar[Optional["TokenMasks"]] = contextvars.ContextVar("smola_token_masks", default=None)


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
