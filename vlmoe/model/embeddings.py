"""Input embeddings of the multiway backbone: image patches + [I_CLS], text tokens, modality types."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlmoe.model.config import ModelConfig

IMAGE_TYPE = 0
TEXT_TYPE = 1


class ImageEmbedding(nn.Module):
    """[I_CLS] + linearly projected patches (masked ones replaced by a learned [MASK]) + 1D positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.in_chans = cfg.in_chans
        self.num_patches = cfg.num_patches
        # A stride-p convolution is the per-patch linear projection V of the paper.
        self.patch_proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.positions = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))

    def forward(self, pixels: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pixels [B, C, H, W], image_mask [B, P] bool (True = replace by [MASK]) -> [B, 1 + P, D]."""
        expected = (self.in_chans, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(pixels.shape)}")
        patches = self.patch_proj(pixels).flatten(2).transpose(1, 2)  # [B, P, D]
        if image_mask is not None:
            if image_mask.dtype != torch.bool or tuple(image_mask.shape) != (pixels.shape[0], self.num_patches):
                raise ValueError(f"image_mask must be bool [B={pixels.shape[0]}, P={self.num_patches}], "
                                 f"got {image_mask.dtype} {tuple(image_mask.shape)}")
            patches = torch.where(image_mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.positions


class TextEmbedding(nn.Module):
    """Word embeddings + learned 1D positions; the word table is shared with the MLM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.max_text_len = cfg.max_text_len
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positions = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        """text_ids Long [B, T] (T <= max_text_len) -> [B, T, D]."""
        if text_ids.dim() != 2 or text_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text_ids must be an integer tensor [B, T], got {text_ids.dtype} {tuple(text_ids.shape)}")
        length = text_ids.shape[1]
        if length > self.max_text_len:
            raise ValueError(f"text length {length} exceeds max_text_len={self.max_text_len}")
        # One host sync buys a readable error instead of a device-side assert deep in the embedding.
        low, high = int(text_ids.min()), int(text_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"text_ids out of range [0, vocab_size={self.vocab_size}): min {low}, max {high}")
        return self.tokens(text_ids) + self.positions[:, :length]


class MultiwayEmbeddings(nn.Module):
    """Image and text embeddings, each plus its modality-type embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image = ImageEmbedding(cfg)
        self.text = TextEmbedding(cfg)
        self.modality_type = nn.Embedding(2, cfg.dim)
        self.register_buffer("modality_ids", torch.tensor([IMAGE_TYPE, TEXT_TYPE]), persistent=False)

    def _type_embedding(self, modality: int) -> torch.Tensor:
        # Called as a module, not read as .weight: ZeRO-3 gathers a module's weights only
        # around its own calls (reading the table directly failed in backward).
        return self.modality_type(self.modality_ids[modality:modality + 1])  # [1, D]

    def embed_image(self, pixels: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pixels [B, C, H, W] -> [B, 1 + P, D]."""
        return self.image(pixels, image_mask) + self._type_embedding(IMAGE_TYPE)

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """text_ids [B, T] -> [B, T, D]."""
        return self.text(text_ids) + self._type_embedding(TEXT_TYPE)
