"""Sentence-pair classification (NLI-style), text only: [T_CLS] of "premise [T_SEP] hypothesis"
-> pooler (LayerNorm, linear, tanh) -> linear over the labels; accuracy.

Data: ``wordnet_nli`` is constructed (no English NLI corpus ships in any Debian or PyPI
package): WordNet example sentences with one word replaced by a hypernym (entailment), the same
pair the other way round (neutral) or an antonym (contradiction), balanced; see
``vlmoe.data.nli_pairs``. Pairs built from one sentence are all in one split. A user's
``jsonl:PATH`` holds {"premise", "hypothesis", "label"} (a name such as "entailment", or an int);
it is split by premise, so that a premise never lands on both sides.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from vlmoe.data import nli_pairs
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.data.sources import WORDNET_ROOT, SkipCounter
from vlmoe.data.task_data import LABEL, TEXT, TaskRecords, TaskSplit
from vlmoe.model.heads import Pooler
from vlmoe.nn.init import init_linears_
from vlmoe.model.objectives import prediction_accuracy, prediction_loss
from vlmoe.tasks.base import (
    DownstreamTask,
    TaskInputs,
    TaskModel,
    encode_texts,
    first_examples,
    label_vocabulary,
    labels_or_ignore,
    majority_baseline,
)


def _wordnet_nli(skips: SkipCounter) -> Iterator[dict]:
    return nli_pairs.nli_examples(WORDNET_ROOT, skips)


RECORDS = TaskRecords(
    image_fields=(),
    key_field="key",
    embedded={"wordnet_nli": _wordnet_nli},
    default=("wordnet_nli",),
    user_fields={"premise": (TEXT, True), "hypothesis": (TEXT, True), "label": (LABEL, True)},
    normalize=lambda record: {**record, "label": str(record["label"]), "key": record["premise"]},
)


class SentencePairClassifier(TaskModel):
    """batch {text_ids [B,T], text_pad_mask [B,T], labels [B]} -> {"loss", "accuracy", "num_examples"}."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        cfg = backbone.cfg
        self.pooler = Pooler(cfg.dim, cfg.init_std, cfg.layer_norm_eps)
        self.classifier = nn.Linear(cfg.dim, num_classes)
        init_linears_(self.classifier, std=cfg.init_std)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.backbone(text_ids=batch["text_ids"], text_pad_mask=batch["text_pad_mask"])
        logits = self.classifier(self.pooler(out.hidden[:, 0]))  # [T_CLS]
        keep = batch["labels"] != IGNORE_INDEX
        logits, labels = logits[keep], batch["labels"][keep]
        return {"loss": prediction_loss(logits, labels), "accuracy": prediction_accuracy(logits, labels),
                "num_examples": keep.sum()}


class NLI(DownstreamTask):
    name = "nli"
    main_metric = "accuracy"
    records = RECORDS
    uses_images = False

    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        return label_vocabulary(train)

    def unusable(self, row: dict, split: str, inputs: TaskInputs) -> Optional[str]:
        return None if row["label"] in inputs.index else "label not among the training labels"

    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        return SentencePairClassifier(backbone, len(inputs.vocab["labels"]))

    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        return {"premise": row["premise"], "hypothesis": row["hypothesis"], "label": inputs.index[row["label"]]}

    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        return {**encode_texts(inputs.text_tokenizer, [e["premise"] for e in examples], inputs.max_text_len,
                               second=[e["hypothesis"] for e in examples]),
                "labels": labels_or_ignore(examples, "label")}

    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        validation = first_examples(validation, max_examples)
        return {"accuracy": majority_baseline(train.examples["label"], validation.examples["label"])}


TASK = NLI()
