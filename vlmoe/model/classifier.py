"""Image classification heads: on our multiway backbone, and around a Hugging Face model."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vlmoe.model.init import init_linears_
from vlmoe.model.multiway import MultiwayTransformer
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.model.objectives import prediction_accuracy, prediction_loss


def _outputs(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and accuracy over the rows whose label is not IGNORE_INDEX (padding of the last
    evaluation batch), and how many there were (evaluation weighs batches by it)."""
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    return {"loss": prediction_loss(logits, labels), "accuracy": prediction_accuracy(logits, labels),
            "num_examples": keep.sum()}


class ImageClassifier(nn.Module):
    """Average of the patch tokens' final states (VL-MoE / BEiT-3), LayerNorm, linear head.

    ``forward(batch)`` with batch {"pixels": Float[B,3,H,W], "labels": Long[B]} returns
    {"loss", "accuracy", "num_examples"}.
    """

    def __init__(self, backbone: MultiwayTransformer, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.cfg.dim
        self.pool_norm = nn.LayerNorm(dim, eps=backbone.cfg.layer_norm_eps)
        self.classifier = nn.Linear(dim, num_classes)
        init_linears_(self.classifier, std=backbone.cfg.init_std)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.backbone(pixels=batch["pixels"])
        patches = out.hidden[:, out.image_slice][:, 1:]  # [B, P, D] without [I_CLS]
        logits = self.classifier(self.pool_norm(patches.mean(dim=1)))
        return _outputs(logits, batch["labels"])


class HFImageClassifier(nn.Module):
    """A transformers image-classification model behind the same batch interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(pixel_values=batch["pixels"]).logits
        return _outputs(logits, batch["labels"])
