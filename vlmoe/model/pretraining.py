"""VL-MoE pretraining model: masked language (MLM), image (MIM) and vision-language (VLM) modeling."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from vlmoe.model.config import ModelConfig
from vlmoe.model.heads import MIMHead, MLMHead
from vlmoe.model.multiway import FfnFactory, MultiwayTransformer
from vlmoe.nn.task_scope import task_scope
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.model.objectives import prediction_accuracy, prediction_loss, pretraining_loss

BATCH_KEYS = {
    "text": ("ids", "pad_mask", "labels"),
    "image": ("pixels", "mim_mask", "mim_targets"),
    "pair": ("ids", "pad_mask", "labels", "pixels", "mim_mask", "mim_targets"),
}


def _subset(batch: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    part = batch[name]
    if not isinstance(part, Mapping):
        raise TypeError(f"batch[{name!r}] must be a dict, got {type(part).__name__}")
    missing = [key for key in BATCH_KEYS[name] if key not in part]
    if missing:
        raise KeyError(f"batch[{name!r}] is missing key(s) {missing}; expected {list(BATCH_KEYS[name])}")
    for key in BATCH_KEYS[name]:
        if not isinstance(part[key], torch.Tensor):
            raise TypeError(f"batch[{name!r}][{key!r}] must be a tensor, got {type(part[key]).__name__}")
    return dict(part)


class VLMoEForPretraining(nn.Module):
    """Multiway backbone + MLM and MIM heads; one backbone pass per objective present in a batch.

    batch = {"text": {ids Long[B,T], pad_mask Bool[B,T], labels Long[B,T] (-100 = not predicted)},
             "image": {pixels Float[B,3,H,W], mim_mask Bool[B,P], mim_targets Long[B,P]},
             "pair": all six keys}; any subset may be absent (its objective is skipped).
    """

    def __init__(self, cfg: ModelConfig, ffn_factory: Optional[FfnFactory] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = MultiwayTransformer(cfg, ffn_factory)
        tied = self.backbone.embeddings.text.tokens.weight if cfg.tie_word_embeddings else None
        self.mlm_head = MLMHead(cfg.dim, cfg.vocab_size, cfg.init_std, tied_weight=tied)
        self.mim_head = MIMHead(cfg.dim, cfg.codebook_size, cfg.init_std)

    def _predict_text(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D], labels [B, T] -> (loss, accuracy) over labelled positions."""
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"text labels shape {tuple(labels.shape)} does not match text ids {tuple(hidden.shape[:2])}")
        predicted = labels != IGNORE_INDEX
        logits = self.mlm_head(hidden[predicted])
        targets = labels[predicted]
        return prediction_loss(logits, targets), prediction_accuracy(logits, targets)

    def _predict_patches(self, hidden: torch.Tensor, mim_mask: torch.Tensor,
                         mim_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, 1 + P, D] (with [I_CLS]), mim_mask/mim_targets [B, P] -> (loss, accuracy)."""
        patches = hidden[:, 1:]
        if mim_targets.shape != patches.shape[:2]:
            raise ValueError(f"mim_targets shape {tuple(mim_targets.shape)} does not match [B, P] = {tuple(patches.shape[:2])}")
        logits = self.mim_head(patches[mim_mask])
        targets = mim_targets[mim_mask]
        return prediction_loss(logits, targets), prediction_accuracy(logits, targets)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """-> {"loss", and for present subsets "mlm", "mlm_acc", "mim", "mim_acc", "vlm", "vlm_text",
        "vlm_image", "vlm_text_acc", "vlm_image_acc"}; accuracies are detached."""
        unknown = sorted(set(batch) - set(BATCH_KEYS))
        if unknown:
            raise KeyError(f"batch has unknown subset(s) {unknown}; expected some of {sorted(BATCH_KEYS)}")
        out: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        if "text" in batch:
            text = _subset(batch, "text")
            with task_scope("mlm"):
                encoded = self.backbone(text_ids=text["ids"], text_pad_mask=text["pad_mask"])
                losses["mlm"], out["mlm_acc"] = self._predict_text(encoded.hidden, text["labels"])
        if "image" in batch:
            image = _subset(batch, "image")
            with task_scope("mim"):
                encoded = self.backbone(pixels=image["pixels"], image_mask=image["mim_mask"])
                losses["mim"], out["mim_acc"] = self._predict_patches(encoded.hidden, image["mim_mask"],
                                                                      image["mim_targets"])
        if "pair" in batch:
            pair = _subset(batch, "pair")
            with task_scope("vlm"):
                encoded = self.backbone(pixels=pair["pixels"], text_ids=pair["ids"], text_pad_mask=pair["pad_mask"],
                                        image_mask=pair["mim_mask"])
                out["vlm_text"], out["vlm_text_acc"] = self._predict_text(encoded.hidden[:, encoded.text_slice],
                                                                          pair["labels"])
                out["vlm_image"], out["vlm_image_acc"] = self._predict_patches(
                    encoded.hidden[:, encoded.image_slice], pair["mim_mask"], pair["mim_targets"])
            # VLM recovers both masked text tokens and masked patches of a pair: the sum of the two.
            losses["vlm"] = out["vlm_text"] + out["vlm_image"]
        if not losses:
            raise ValueError("batch holds none of 'text', 'image', 'pair'")
        out.update(losses)
        out["loss"] = pretraining_loss(losses)
        return out
