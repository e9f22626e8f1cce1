"""Token masks for models that do not declare them: forward hooks around a module.

    handle = smola.modality_hooks(model.encoder, smola.masks_from_inputs(valid="attention_mask"))
    ...
    handle.remove()

The function receives the module's (args, kwargs) and returns TokenMasks, a
(valid, visual) pair, or None; the masks then hold for every [B, N, d] input of the
linears inside that module's forward (including checkpointed recomputation, see
smola.context). Hook the module whose inputs have the token layout the masks describe,
e.g. an encoder, not an encoder-decoder whose decoder sees another sequence length.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from smola.context import TokenMasks, token_masks

MaskFn = Callable[[tuple, dict], Union[TokenMasks, tuple, None]]


class _Handles:
    """Both hooks of one ``modality_hooks`` call; ``remove()`` detaches them."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _as_masks(result: Any, module: nn.Module) -> Optional[TokenMasks]:
    if result is None or isinstance(result, TokenMasks):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        valid, visual = result
        for what, m in (("valid", valid), ("visual", visual)):
            if m is not None and (not isinstance(m, torch.Tensor) or m.dtype != torch.bool):
                raise ValueError(f"modality_hooks on {type(module).__name__}: the {what} mask must be a bool tensor or None; got {m!r:.80}")
        return TokenMasks(valid, visual)
    raise ValueError(f"modality_hooks on {type(module).__name__}: the mask function must return TokenMasks, "
                     f"(valid, visual) or None; got {type(result).__name__}")


def modality_hooks(module: nn.Module, fn: MaskFn) -> _Handles:
    """Declare ``fn(args, kwargs)``'s token masks for the duration of each ``module`` forward."""
    open_blocks: list[contextlib.ExitStack] = []

    def before(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        stack = contextlib.ExitStack()
        masks = _as_masks(fn(args, kwargs), mod)
        if masks is not None:
            stack.enter_context(token_masks(masks.valid, masks.visual))
        open_blocks.append(stack)

    def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if open_blocks:
            open_blocks.pop().close()

    return _Handles([
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, with_kwargs=True, always_call=True),
    ])


def masks_from_inputs(valid: Optional[str] = "attention_mask", visual: Optional[str] = None) -> MaskFn:
    """A mask function reading forward keyword inputs: ``valid`` names the padding mask
    (nonzero = real token), ``visual`` the modality mask (nonzero = visual token). Call the
    hooked module with keywords (``model(**batch)``); an absent or None input gives no mask."""

    def fn(args: tuple, kwargs: dict) -> TokenMasks:
        def get(key: Optional[str]) -> Optional[torch.Tensor]:
            value = kwargs.get(key) if key is not None else None
            return None if value is None else value.bool()

        return TokenMasks(get(valid), get(visual))

    return fn
