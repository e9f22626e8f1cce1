"""Shape and regularisation hyper-parameters of the multiway backbone, with the paper's presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a `MultiwayTransformer` and its pretraining heads.

    Blocks are indexed from 0; blocks ``vl_ffn_start .. depth-1`` (the top F = depth - vl_ffn_start)
    also hold a VL-FFN used for image-text pairs.
    """

    vocab_size: int
    max_text_len: int
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    ffn_dim: int
    vl_ffn_start: int
    codebook_size: int
    in_chans: int = 3
    drop_path: float = 0.1
    dropout: float = 0.0
    init_std: float = 0.02
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_text_len", "image_size", "patch_size", "dim", "depth", "heads",
                     "ffn_dim", "codebook_size", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"ModelConfig.dim={self.dim} is not divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ModelConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if not isinstance(self.vl_ffn_start, int) or not 0 <= self.vl_ffn_start <= self.depth:
            raise ValueError(f"ModelConfig.vl_ffn_start must be an int in [0, depth={self.depth}], got {self.vl_ffn_start!r}")
        for name in ("drop_path", "dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value!r}")
        if self.init_std <= 0 or self.layer_norm_eps <= 0:
            raise ValueError(f"ModelConfig.init_std and layer_norm_eps must be > 0, got {self.init_std}, {self.layer_norm_eps}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """P: patches per image (the [I_CLS] token not included)."""
        return self.grid_size ** 2

    @property
    def num_vl_ffn_blocks(self) -> int:
        """F: blocks that hold a VL-FFN."""
        return self.depth - self.vl_ffn_start

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (a checkpoint or YAML section); unknown keys are an error."""
        _check_fields(values, "ModelConfig")
        return cls(**values)


# Paper (VL-MoE 4.1, following VLMO): BASE = 12 blocks x 768, 12 heads, VL-FFN "starts at the
# 10th layer"; VLMO's reference code writes this as vlffn_start_layer_index=10 (0-based), i.e.
# the top two blocks. SMALL = 8 blocks x 384, 6 heads, VL-FFN "in the 8th layer" = the last block.
# Image 224, patch 16, text 128, 64k SentencePiece vocabulary, BEiT v2 tokenizer codebook 8192.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=2000, max_text_len=32, image_size=32, patch_size=8, dim=128, depth=4, heads=4,
                 ffn_dim=512, vl_ffn_start=3, codebook_size=256),
    "small": dict(vocab_size=64000, max_text_len=128, image_size=224, patch_size=16, dim=384, depth=8, heads=6,
                  ffn_dim=1536, vl_ffn_start=7, codebook_size=8192),
    "base": dict(vocab_size=64000, max_text_len=128, image_size=224, patch_size=16, dim=768, depth=12, heads=12,
                 ffn_dim=3072, vl_ffn_start=10, codebook_size=8192),
}


def _check_fields(values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The named preset ('tiny', 'small', 'base') with `overrides` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    _check_fields(overrides, f"model_config({preset!r})")
    return ModelConfig(**{**PRESETS[preset], **overrides})
