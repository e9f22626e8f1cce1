"""NLVR2-style visual reasoning: two images and a statement, true or false.

Head (BEiT-3): the two (image, statement) passes' final [T_CLS] states, concatenated [B, 2D] ->
two-layer MLP (2D -> 2D -> 2); cross-entropy; accuracy. The two passes run as one backbone call
on a batch of 2B pairs.

Data: ``easy_vqa_nlvr2`` is constructed, deterministic and balanced, from easy-VQA's shape and
colour attributes (e.g. "both images show a red shape", "the left image shows a circle and the
right one does not"); train pairs use easy-VQA's train images, validation pairs its test images
(see ``vlmoe.data.nlvr2_pairs``). A user's ``jsonl:PATH`` holds NLVR2-style {"left", "right",
"sentence", "label"} (true/false, 1/0, "True"/"False").
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from vlmoe.data import nlvr2_pairs
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.data.sources import SkipCounter
from vlmoe.data.task_data import IMAGE, LABEL, TEXT, SkipRecord, TaskRecords, TaskSplit
from vlmoe.model.heads import MLPClassifier
from vlmoe.model.objectives import prediction_accuracy, prediction_loss
from vlmoe.tasks.base import (
    DownstreamTask,
    TaskInputs,
    TaskModel,
    encode_texts,
    first_examples,
    labels_or_ignore,
    majority_baseline,
    pixels,
)

TRUTH = {"true": 1, "false": 0, "1": 1, "0": 0}


def _easy_vqa_nlvr2(skips: SkipCounter) -> Iterator[dict]:
    for split in ("train", "validation"):
        for example in nlvr2_pairs.nlvr2_examples(split):
            yield {**example, "split": split}


def _normalize(record: dict) -> dict:
    label = TRUTH.get(str(record["label"]).strip().lower())
    if label is None:
        raise SkipRecord("bad field 'label' (expected true or false)")
    return {**record, "label": label}


RECORDS = TaskRecords(
    image_fields=("left", "right"),
    embedded={"easy_vqa_nlvr2": _easy_vqa_nlvr2},
    default=("easy_vqa_nlvr2",),
    user_fields={"left": (IMAGE, True), "right": (IMAGE, True), "sentence": (TEXT, True), "label": (LABEL, True)},
    normalize=_normalize,
)


class NLVR2Model(TaskModel):
    """batch {pixels_left, pixels_right [B,3,H,W], text_ids [B,T], text_pad_mask [B,T], labels [B]}
    -> {"loss", "accuracy", "num_examples"}."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        cfg = backbone.cfg
        self.head = MLPClassifier(2 * cfg.dim, 2 * cfg.dim, 2, cfg.init_std, cfg.layer_norm_eps)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        both = torch.cat([batch["pixels_left"], batch["pixels_right"]])  # [2B, 3, H, W]
        text_ids, pad_mask = batch["text_ids"].repeat(2, 1), batch["text_pad_mask"].repeat(2, 1)
        out = self.backbone(pixels=both, text_ids=text_ids, text_pad_mask=pad_mask)
        left, right = out.hidden[:, out.text_slice][:, 0].chunk(2)  # [T_CLS] of each pass, [B, D]
        logits = self.head(torch.cat([left, right], dim=-1))
        keep = batch["labels"] != IGNORE_INDEX
        logits, labels = logits[keep], batch["labels"][keep]
        return {"loss": prediction_loss(logits, labels), "accuracy": prediction_accuracy(logits, labels),
                "num_examples": keep.sum()}


class NLVR2(DownstreamTask):
    name = "nlvr2"
    main_metric = "accuracy"
    records = RECORDS

    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        return {"labels": ["false", "true"]}

    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        return NLVR2Model(backbone)

    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        return {"pixels_left": pixels(split, row["left"], inputs), "pixels_right": pixels(split, row["right"], inputs),
                "sentence": row["sentence"], "label": int(row["label"])}

    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        return {"pixels_left": torch.stack([e["pixels_left"] for e in examples]),
                "pixels_right": torch.stack([e["pixels_right"] for e in examples]),
                **encode_texts(inputs.text_tokenizer, [e["sentence"] for e in examples], inputs.max_text_len),
                "labels": labels_or_ignore(examples, "label")}

    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        validation = first_examples(validation, max_examples)
        return {"accuracy": majority_baseline(train.examples["label"], validation.examples["label"])}


TASK = NLVR2()
