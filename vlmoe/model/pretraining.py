"""VL-MoE pretraining model: masked language (MLM), image (MIM) and vision-language (VLM) modeling."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from vlmoe.model.config import ModelConfig
from vlmoe.model.heads import MIMHead, MLMHead
from vlmoe.model.multiway import EncoderInput, FfnFactory, MultiwayTransformer
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


def _encoder_input(name: str, part: dict[str, torch.Tensor]) -> EncoderInput:
    """The backbone input of one batch subset, marked with the objective it serves."""
    if name == "text":
        return EncoderInput(text_ids=part["ids"], text_pad_mask=part["pad_mask"], task="mlm")
    if name == "image":
        return EncoderInput(pixels=part["pixels"], image_mask=part["mim_mask"], task="mim")
    return EncoderInput(pixels=part["pixels"], text_ids=part["ids"], text_pad_mask=part["pad_mask"],
                        image_mask=part["mim_mask"], task="vlm")


class VLMoEForPretraining(nn.Module):
    """Multiway backbone + MLM and MIM heads; the objectives present in a batch share one backbone pass.

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
        subsets = {name: _subset(batch, name) for name in BATCH_KEYS if name in batch}
        if not subsets:
            raise ValueError("batch holds none of 'text', 'image', 'pair'")
        # The objectives go through the backbone together: its MoE layers run their experts once
        # per block for all of them (each objective still routes as its own group).
        encoded = dict(zip(subsets, self.backbone.forward_many([_encoder_input(name, part)
                                                                for name, part in subsets.items()])))
        out: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        if "text" in subsets:
            losses["mlm"], out["mlm_acc"] = self._predict_text(encoded["text"].hidden, subsets["text"]["labels"])
        if "image" in subsets:
            image = subsets["image"]
            losses["mim"], out["mim_acc"] = self._predict_patches(encoded["image"].hidden, image["mim_mask"],
                                                                  image["mim_targets"])
        if "pair" in subsets:
            pair, hidden = subsets["pair"], encoded["pair"]
            out["vlm_text"], out["vlm_text_acc"] = self._predict_text(hidden.hidden[:, hidden.text_slice],
                                                                      pair["labels"])
            out["vlm_image"], out["vlm_image_acc"] = self._predict_patches(
                hidden.hidden[:, hidden.image_slice], pair["mim_mask"], pair["mim_targets"])
            # VLM recovers both masked text tokens and masked patches of a pair: the sum of the two.
            losses["vlm"] = out["vlm_text"] + out["vlm_image"]
        out.update(losses)
        out["loss"] = pretraining_loss(losses)
        return out
