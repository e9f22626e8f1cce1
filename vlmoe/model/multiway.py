"""The multiway (mixture-of-modality-experts) transformer of VLMO / BEiT-3 / VL-MoE.

Every block has one shared self-attention and modality feed-forward networks: V-FFN for image
tokens, T-FFN for text tokens and, in blocks >= vl_ffn_start, a VL-FFN for image-text pairs.
FFNs come from an `ffn_factory`, so the MoE layers plug in without the backbone knowing them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from smola.context import token_masks
from vlmoe.model.config import ModelConfig
from vlmoe.model.embeddings import MultiwayEmbeddings
from vlmoe.nn.feed_forward import FeedForward
from vlmoe.nn.init import init_linears_, trunc_normal_
from vlmoe.zero3 import full_parameters

FfnFactory = Callable[[int, str], nn.Module]
"""(block_index, modality in {"v", "t", "vl"}) -> module called as ffn(x [B, n, D], token_mask [B, n] | None)."""

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
    padded. visual: [B, L] bool, True at image positions.
    """

    kind: str
    n_image: int
    valid: Optional[torch.Tensor]
    visual: torch.Tensor


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

    def _call_ffn(self, ffn: nn.Module, modality: str, x: torch.Tensor, valid: Optional[torch.Tensor],
                  visual: torch.Tensor) -> torch.Tensor:
        with token_masks(valid=valid, visual=visual):
            out = ffn(x.contiguous(), valid)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"block {self.index} {modality}-FFN must return a tensor of shape {tuple(x.shape)}, got {got}")
        return out

    def _feed_forward(self, y: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if layout.kind == "image":
            return self._call_ffn(self.ffn_v, "v", y, layout.valid, layout.visual)
        if layout.kind == "text":
            return self._call_ffn(self.ffn_t, "t", y, layout.valid, layout.visual)
        if self.ffn_vl is not None:
            return self._call_ffn(self.ffn_vl, "vl", y, layout.valid, layout.visual)
        n = layout.n_image
        image_out = self._call_ffn(self.ffn_v, "v", y[:, :n], _slice_mask(layout.valid, 0, n), layout.visual[:, :n])
        text_out = self._call_ffn(self.ffn_t, "t", y[:, n:], _slice_mask(layout.valid, n, None), layout.visual[:, n:])
        return torch.cat([image_out, text_out], dim=1)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]."""
        with token_masks(valid=layout.valid, visual=layout.visual):
            x = x + self.drop_path(self.attn(self.norm1(x), layout.valid))
        return x + self.drop_path(self._feed_forward(self.norm2(x), layout))


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
                device: torch.device) -> TokenLayout:
        kind = "pair" if n_image and n_text else ("image" if n_image else "text")
        visual = torch.zeros(batch, n_image + n_text, dtype=torch.bool, device=device)
        visual[:, :n_image] = True
        valid = None
        if text_pad_mask is not None:
            valid = torch.cat([torch.ones(batch, n_image, dtype=torch.bool, device=device), text_pad_mask], dim=1)
        return TokenLayout(kind=kind, n_image=n_image, valid=valid, visual=visual)

    def forward(self, pixels: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None,
                text_pad_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> MultiwayOutput:
        """pixels [B, C, H, W], text_ids Long [B, T], text_pad_mask [B, T] bool (True = real token),
        image_mask [B, P] bool (True = patch replaced by [MASK]) -> MultiwayOutput, L = (1 + P) + T."""
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
        layout = self._layout(n_image, n_text, x.shape[0], text_pad_mask, x.device)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return MultiwayOutput(
            hidden=self.norm(x),
            image_slice=slice(0, n_image) if n_image else None,
            text_slice=slice(n_image, n_image + n_text) if n_text else None,
            valid=layout.valid,
        )
