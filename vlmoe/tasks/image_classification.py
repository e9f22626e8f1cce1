"""Image classification: mean of the patch tokens, LayerNorm, linear (BEiT-3 / VL-MoE); top-1 and top-5.

Data: ``fashion_mnist`` (70k 28x28 clothing images in 10 classes, its own 60k / 10k split; the
default) or ``noto_emoji_groups`` (every emoji of emoji-test.txt rendered from Noto Color
Emoji, labelled by its group, e.g. "Animals & Nature"; split by a hash of the emoji), or a
user's ``image_folder:PATH`` (CLASS/IMAGE files) or ``jsonl:PATH`` ({"image", "label"}).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from vlmoe.data import sources
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.data.sources import SkipCounter, open_image
from vlmoe.data.task_data import IMAGE, LABEL, TaskRecords, TaskSplit
from vlmoe.nn.init import init_linears_
from vlmoe.model.objectives import prediction_accuracy, prediction_loss
from vlmoe.tasks.base import (
    DownstreamTask,
    TaskInputs,
    TaskModel,
    first_examples,
    label_vocabulary,
    labels_or_ignore,
    majority_baseline,
    pixels,
)


def _fashion_mnist(skips: SkipCounter) -> Iterator[dict]:
    for r in sources.fashion_mnist(sources.FASHION_MNIST_ROOT, skips):
        image = open_image(r["image"], skips)
        if image is not None:
            yield {"image": image, "image_key": f"fashion_mnist/{r['key']}", "label": r["label_name"],
                   "split": "train" if r["key"].startswith("train/") else "validation"}


def _noto_emoji_groups(skips: SkipCounter) -> Iterator[dict]:
    for r in sources.noto_emoji(sources.NOTO_EMOJI_FONT, sources.EMOJI_TEST_FILE, skips):
        image = open_image(r["image"], skips)
        if image is not None:
            yield {"image": image, "image_key": f"noto_emoji/{r['key']}", "label": r["label_name"].split("/")[0]}


RECORDS = TaskRecords(
    image_fields=("image",),
    embedded={"fashion_mnist": _fashion_mnist, "noto_emoji_groups": _noto_emoji_groups},
    default=("fashion_mnist",),
    user_fields={"image": (IMAGE, True), "label": (LABEL, True)},
    normalize=lambda record: {**record, "label": str(record["label"])},
    image_folder=True,
)


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows of logits [N, C] whose label [N] is among the k highest (k capped at C);
    0 when N == 0."""
    if labels.numel() == 0:
        return logits.new_zeros((), dtype=torch.float32)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float().mean()


def classification_outputs(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy, top-1 and top-5 accuracy over the rows whose label is not IGNORE_INDEX (the
    padding of a single pass), and how many there were (evaluation weighs batches by it)."""
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    return {"loss": prediction_loss(logits, labels), "accuracy": prediction_accuracy(logits, labels),
            "top5": topk_accuracy(logits, labels, 5), "num_examples": keep.sum()}


class ImageClassifier(TaskModel):
    """Average of the patch tokens' final states (without [I_CLS]), LayerNorm, linear.

    batch {"pixels": Float[B, 3, H, W], "labels": Long[B]} -> {"loss", "accuracy", "top5", "num_examples"}.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.cfg.dim
        self.pool_norm = nn.LayerNorm(dim, eps=backbone.cfg.layer_norm_eps)
        self.classifier = nn.Linear(dim, num_classes)
        init_linears_(self.classifier, std=backbone.cfg.init_std)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.backbone(pixels=batch["pixels"])
        patches = out.hidden[:, out.image_slice][:, 1:]  # [B, P, D]
        return classification_outputs(self.classifier(self.pool_norm(patches.mean(dim=1))), batch["labels"])


class HFImageClassifier(TaskModel):
    """A transformers image-classification model behind the same batch interface; its own
    classifier is the head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model

    def head_modules(self) -> list[nn.Module]:
        return [self.backbone.classifier]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return classification_outputs(self.backbone(pixel_values=batch["pixels"]).logits, batch["labels"])


class ImageClassification(DownstreamTask):
    name = "image_classification"
    main_metric = "accuracy"
    records = RECORDS
    uses_text = False

    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        return label_vocabulary(train)

    def unusable(self, row: dict, split: str, inputs: TaskInputs) -> Optional[str]:
        return None if str(row["label"]) in inputs.index else "label not among the training labels"

    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        return ImageClassifier(backbone, len(inputs.vocab["labels"]))

    def wrap_hf_model(self, model: nn.Module) -> TaskModel:
        return HFImageClassifier(model)

    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        return {"pixels": pixels(split, row["image"], inputs), "label": inputs.index[str(row["label"])]}

    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        return {"pixels": torch.stack([e["pixels"] for e in examples]), "labels": labels_or_ignore(examples, "label")}

    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        validation = first_examples(validation, max_examples)
        return {"accuracy": majority_baseline(train.examples["label"], validation.examples["label"])}


TASK = ImageClassification()
