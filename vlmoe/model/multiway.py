"""The multiway (mixture-of-modality-experts) transformer of VLMO / BEiT-3 / VL-MoE.

Every block has one shared self-attention and modality feed-forward networks: V-FFN for image
tokens, T-FFN for text tokens and, in blocks >= vl_ffn_start, a VL-FFN for image-text pairs.
FFNs come from an `ffn_factory`, so the MoE layers plug in without the backbone knowing them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smola.context import token_masks
from vlmoe.model.config import ModelConfig
from vlmoe.model.embeddings import MultiwayEmbeddings
from vlmoe.nn.feed_forward import FeedForward
from vlmoe.nn.init import init_linears_, trunc_normal_
from vlmoe.nn.task_scope import task_scope
from vlmoe.zero3 import full_parameters

FfnFactory = Callable[[int, str], nn.Module]
"""(block_index, modality in {"v", "t", "vl"}) -> module called as ffn(x [B, n, D], token_mask [B, n] | None).

One whose class sets `takes_token_groups = True` (the MoE layers) is called once with lists,
ffn([x_i], [token_mask_i], tasks=[task_i]) -> [out_i], for all inputs of a
`MultiwayTransformer.forward_many`; others are called once per input, inside its `task_scope`.
"""

MODALITIES = ("v", "t", "vl")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability p."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ...] -> x with some samples zeroed and the rest scaled by 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        sample_keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * sample_keep / keep


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask; separate q/k/v/out linears (adapter targets)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, dropout: float, init_std: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.out_dropout = nn.Dropout(dropout)
        init_linears_(self.q_proj, self.k_proj, self.v_proj, self.out_proj, std=init_std)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D], valid [B, L] bool (True = real key) or None -> [B, L, D]."""
        batch, length, dim = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        attn_mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_dropout(self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)))


@dataclass(frozen=True)
class TokenLayout:
    """Where the modalities sit in a [B, L, D] sequence: image positions [0, n_image), text after.

    kind: "image", "text" or "pair". valid: [B, L] bool (False = padding) or None when nothing is
    padded. visual: [B, L] bool, True at image positions. task: the pretraining task the sequence
    serves (per-task routing metrics), or None.
    """

    kind: str
    n_image: int
    valid: Optional[torch.Tensor]
    visual: torch.Tensor
    task: Optional[str] = None

    def ffn_segments(self, has_vl_ffn: bool) -> list[tuple[str, int, Optional[int]]]:
        """(modality, start, stop) of the token ranges that go to each FFN of a block."""
        if self.kind == "image":
            return [("v", 0, None)]
        if self.kind == "text":
            return [("t", 0, None)]
        if has_vl_ffn:
            return [("vl", 0, None)]
        return [("v", 0, self.n_image), ("t", self.n_image, None)]


@dataclass(frozen=True)
class EncoderInput:
    """One input of `MultiwayTransformer.forward_many` (the arguments of `forward`, and its task)."""

    pixels: Optional[torch.Tensor] = None
    text_ids: Optional[torch.Tensor] = None
    text_pad_mask: Optional[torch.Tensor] = None
    image_mask: Optional[torch.Tensor] = None
    task: Optional[str] = None


def _in_task(task: Optional[str]) -> contextlib.AbstractContextManager:
    return task_scope(task) if task is not None else contextlib.nullcontext()


def _slice_mask(mask: Optional[torch.Tensor], start: int, stop: Optional[int]) -> Optional[torch.Tensor]:
    return None if mask is None else mask[:, start:stop]


class MultiwayBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + modality-FFN(LN(x)), both with stochastic depth."""

    # Only image tokens enter the V-FFN and only text tokens the T-FFN (_feed_forward): Omni-SMoLA
    # (smola.inject, smola.omni.MODALITY_ATTR) reads this: their linears get no T and no V block.
    smola_modalities: ClassVar[dict[str, str]] = {"ffn_v": "v", "ffn_t": "t"}

    def __init__(self, cfg: ModelConfig, index: int, ffn_factory: FfnFactory, drop_path: float) -> None:
        super().__init__()
        self.index = index
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.dropout, cfg.init_std)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn_v = self._build_ffn(ffn_factory, "v")
        self.ffn_t = self._build_ffn(ffn_factory, "t")
        self.ffn_vl = self._build_ffn(ffn_factory, "vl") if index >= cfg.vl_ffn_start else None
        self.drop_path = DropPath(drop_path)

    def _build_ffn(self, ffn_factory: FfnFactory, modality: str) -> nn.Module:
        ffn = ffn_factory(self.index, modality)
        if not isinstance(ffn, nn.Module):
            raise TypeError(f"ffn_factory({self.index}, {modality!r}) returned {type(ffn).__name__}, not an nn.Module")
        return ffn

    def ffns(self) -> list[nn.Module]:
        """The FFNs this block holds: V, T and (top blocks) VL."""
        return [f for f in (self.ffn_v, self.ffn_t, self.ffn_vl) if f is not None]

    def ffn(self, modality: str) -> nn.Module:
        """The block's FFN for `modality` ("v", "t" or "vl")."""
        return {"v": self.ffn_v, "t": self.ffn_t, "vl": self.ffn_vl}[modality]

    def _call_ffn(self, modality: str, ys: list[torch.Tensor], layouts: list[TokenLayout],
                  bounds: list[tuple[int, Optional[int]]]) -> list[torch.Tensor]:
        """The `modality` FFN on token range bounds[i] of every sequence ys[i] [B_i, L_i, D].

        An FFN that takes token groups (the MoE layers) gets them in one call, so that its experts
        run once for all of them; others are called once per sequence, each under its token masks.
        """
        ffn = self.ffn(modality)
        xs = [y[:, start:stop].contiguous() for y, (start, stop) in zip(ys, bounds)]
        valids = [_slice_mask(layout.valid, start, stop) for layout, (start, stop) in zip(layouts, bounds)]
        if len(xs) > 1 and getattr(ffn, "takes_token_groups", False):
            outs = ffn(xs, valids, tasks=[layout.task for layout in layouts])
        else:
            outs = []
            for x, valid, layout, (start, stop) in zip(xs, valids, layouts, bounds):
                with _in_task(layout.task), token_masks(valid=valid, visual=layout.visual[:, start:stop]):
                    outs.append(ffn(x, valid))
        for x, out in zip(xs, outs):
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise TypeError(f"block {self.index} {modality}-FFN must return a tensor of shape {tuple(x.shape)}, "
                                f"got {got}")
        return outs

    def _feed_forward(self, ys: list[torch.Tensor], layouts: list[TokenLayout]) -> list[torch.Tensor]:
        """Every sequence's tokens through their modality FFNs, each FFN called once for all sequences."""
        segments = [layout.ffn_segments(self.ffn_vl is not None) for layout in layouts]
        outputs: list[list[torch.Tensor]] = [[] for _ in ys]
        for modality in MODALITIES:
            users = [(i, start, stop) for i, parts in enumerate(segments) for m, start, stop in parts if m == modality]
            if not users:
                continue
            outs = self._call_ffn(modality, [ys[i] for i, _, _ in users], [layouts[i] for i, _, _ in users],
                                  [(start, stop) for _, start, stop in users])
            for (i, _, _), out in zip(users, outs):
                outputs[i].append(out)  # a pair's V part comes before its T part, as in the sequence
        return [parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in outputs]

    def forward(self, xs: list[torch.Tensor], layouts: list[TokenLayout]) -> list[torch.Tensor]:
        """xs[i] [B_i, L_i, D] laid out as layouts[i] -> same shapes. The sequences share no token:
        each attends within itself; they go through the block together so that each FFN is called
        once for all of them."""
        attended = []
        for x, layout in zip(xs, layouts):
            with _in_task(layout.task), token_masks(valid=layout.valid, visual=layout.visual):
                attended.append(x + self.drop_path(self.attn(self.norm1(x), layout.valid)))
        ffn_out = self._feed_forward([self.norm2(x) for x in attended], layouts)
        return [x + self.drop_path(out) for x, out in zip(attended, ffn_out)]


@dataclass
class MultiwayOutput:
    """hidden [B, L, D] after the final LayerNorm; image tokens ([I_CLS] + P patches) at
    hidden[:, image_slice], text tokens at hidden[:, text_slice] (None when that modality is absent);
    valid [B, L] bool (False = padding) or None when nothing is padded."""

    hidden: torch.Tensor
    image_slice: Optional[slice]
    text_slice: Optional[slice]
    valid: Optional[torch.Tensor]


class MultiwayTransformer(nn.Module):
    """Image-only, text-only or image-text pair encoder (pairs: image tokens first, then text).

    ffn_factory(block_index, modality) builds each FFN (default: dense `FeedForward`). A built FFN
    that defines `rescale_output_(factor)` gets the BEiT depth rescale of its output weights; other
    initialisation is its own.
    """

    def __init__(self, cfg: ModelConfig, ffn_factory: Optional[FfnFactory] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        if ffn_factory is None:
            def ffn_factory(index: int, modality: str) -> nn.Module:
                return FeedForward(cfg.dim, cfg.ffn_dim, cfg.dropout, cfg.init_std)
        self.embeddings = MultiwayEmbeddings(cfg)
        # Stochastic depth grows linearly from 0 (first block) to drop_path (last block).
        drop_rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MultiwayBlock(cfg, i, ffn_factory, drop_rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """BEiT init: truncated normal for embeddings and attention (FFNs init themselves), LayerNorm
        1/0, then attention-output and FFN-output weights of block i scaled by 1/sqrt(2(i+1))."""
        std = self.cfg.init_std
        emb = self.embeddings
        with full_parameters(emb):  # built under deepspeed.zero.Init, they are partitioned by now
            for param in (emb.image.cls_token, emb.image.mask_token, emb.image.positions,
                          emb.image.patch_proj.weight, emb.text.tokens.weight, emb.text.positions,
                          emb.modality_type.weight):
                trunc_normal_(param, std)
            nn.init.zeros_(emb.image.patch_proj.bias)
        for block in self.blocks:
            factor = 1.0 / math.sqrt(2.0 * (block.index + 1))
            with full_parameters(block.attn.out_proj, *block.ffns()):
                block.attn.out_proj.weight.mul_(factor)
                for ffn in block.ffns():
                    if hasattr(ffn, "rescale_output_"):
                        ffn.rescale_output_(factor)

    def _layout(self, n_image: int, n_text: int, batch: int, text_pad_mask: Optional[torch.Tensor],
                device: torch.device, task: Optional[str]) -> TokenLayout:
        kind = "pair" if n_image and n_text else ("image" if n_image else "text")
        visual = torch.zeros(batch, n_image + n_text, dtype=torch.bool, device=device)
        visual[:, :n_image] = True
        valid = None
        if text_pad_mask is not None:
            valid = torch.cat([torch.ones(batch, n_image, dtype=torch.bool, device=device), text_pad_mask], dim=1)
        return TokenLayout(kind=kind, n_image=n_image, valid=valid, visual=visual, task=task)

    def _embed(self, given: EncoderInput) -> tuple[torch.Tensor, TokenLayout]:
        """One input -> (x [B, L, D], its layout), after checking it."""
        pixels, text_ids, text_pad_mask, image_mask = given.pixels, given.text_ids, given.text_pad_mask, given.image_mask
        if pixels is None and text_ids is None:
            raise ValueError("MultiwayTransformer needs pixels, text_ids or both")
        if pixels is None and image_mask is not None:
            raise ValueError("image_mask given without pixels")
        if text_ids is None and text_pad_mask is not None:
            raise ValueError("text_pad_mask given without text_ids")
        parts = []
        if pixels is not None:
            parts.append(self.embeddings.embed_image(pixels, image_mask))
        if text_ids is not None:
            if text_pad_mask is not None:
                if text_pad_mask.dtype != torch.bool or text_pad_mask.shape != text_ids.shape:
                    raise ValueError(f"text_pad_mask must be bool with the shape of text_ids {tuple(text_ids.shape)}, "
                                     f"got {text_pad_mask.dtype} {tuple(text_pad_mask.shape)}")
                if not bool(text_pad_mask.any(dim=1).all()):
                    raise ValueError("text_pad_mask has a row with no real token")
            parts.append(self.embeddings.embed_text(text_ids))
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"pixels and text_ids batch sizes differ: {parts[0].shape[0]} vs {parts[1].shape[0]}")
        n_image = parts[0].shape[1] if pixels is not None else 0
        n_text = parts[-1].shape[1] if text_ids is not None else 0
        x = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]
        return x, self._layout(n_image, n_text, x.shape[0], text_pad_mask, x.device, given.task)

    def forward(self, pixels: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None,
                text_pad_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> MultiwayOutput:
        """pixels [B, C, H, W], text_ids Long [B, T], text_pad_mask [B, T] bool (True = real token),
        image_mask [B, P] bool (True = patch replaced by [MASK]) -> MultiwayOutput, L = (1 + P) + T."""
        return self.forward_many([EncoderInput(pixels, text_ids, text_pad_mask, image_mask)])[0]

    def forward_many(self, inputs: Sequence[EncoderInput]) -> list[MultiwayOutput]:
        """Encode several independent inputs (a pretraining step's images, texts and pairs) block
        by block together -> one `MultiwayOutput` each, as `forward` gives it.

        Each FFN of a block is called once for all of them, so a sparse MoE layer's experts run
        once per block on the tokens of every objective (larger expert GEMMs, one all-to-all),
        while each input keeps its own routing group; attention stays within each input.
        """
        if not inputs:
            raise ValueError("MultiwayTransformer.forward_many needs at least one input")
        embedded = [self._embed(given) for given in inputs]
        xs, layouts = [x for x, _ in embedded], [layout for _, layout in embedded]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                xs = checkpoint(block, xs, layouts, use_reentrant=False)
            else:
                xs = block(xs, layouts)
        return [MultiwayOutput(
            hidden=self.norm(x),
            image_slice=slice(0, layout.n_image) if layout.n_image else None,
            text_slice=slice(layout.n_image, x.shape[1]) if layout.kind != "image" else None,
            valid=layout.valid,
        ) for x, layout in zip(xs, layouts)]
