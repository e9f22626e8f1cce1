"""What every downstream task provides, so that fine-tuning and evaluation know nothing task-specific.

A task (one file per task in this package) holds its data builder (``records``), its head
(``build_model``: a ``TaskModel`` around the backbone), its loss and its metrics. The fine-tuning
glue builds the data, the model and the batches through this interface only; a comparison of
methods is then only the method: every method of a task sees the same data, batches and metrics.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from vlmoe.data.images import image_to_tensor
from vlmoe.data.masking import IGNORE_INDEX
from vlmoe.data.task_data import TaskRecords, TaskSplit


@dataclass(frozen=True)
class TaskInputs:
    """How examples become tensors for one base: its text tokenizer (None for an image-only base),
    image side, maximum text length, and the task's vocabulary ({"labels": [...]} or
    {"answers": [...]}, learned from the train split); ``index`` maps each name to its class."""

    text_tokenizer: Any
    image_size: int
    max_text_len: int
    vocab: dict
    index: dict = field(default_factory=dict)

    @classmethod
    def create(cls, text_tokenizer: Any, image_size: int, max_text_len: int, vocab: dict) -> "TaskInputs":
        names = vocab.get("labels", vocab.get("answers", []))
        return cls(text_tokenizer, image_size, max_text_len, vocab, {name: i for i, name in enumerate(names)})


class TaskModel(nn.Module):
    """A task head around ``backbone``. Adapters go into the backbone; every other child is the
    head, which every method trains and which is saved with the adapter.

    ``forward(batch)`` returns {"loss", scalar metrics, "num_examples"} for training batches.
    """

    backbone: nn.Module

    def head_modules(self) -> list[nn.Module]:
        return [module for name, module in self.named_children() if name != "backbone"]


class DownstreamTask(ABC):
    """One downstream task. ``main_metric`` (higher is better) picks the best checkpoint."""

    name: ClassVar[str]
    main_metric: ClassVar[str]
    records: ClassVar[TaskRecords]
    uses_text: ClassVar[bool] = True
    uses_images: ClassVar[bool] = True
    # whether validation metrics come from ``evaluate`` (not from averaging the model's outputs)
    evaluates_outputs: ClassVar[bool] = False

    @abstractmethod
    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        """What the head predicts, learned from the train split (JSON-able): e.g. {"labels": [...]}."""
        ...

    @abstractmethod
    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        """The head around a vlmoe multiway backbone (built inside zero.Init under ZeRO-3)."""
        ...

    def unusable(self, row: dict, split: str, inputs: TaskInputs) -> Optional[str]:
        """Why a stored row cannot be used with this vocabulary (e.g. a validation label never seen
        in training), or None; such rows are left out and counted."""
        return None

    @abstractmethod
    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        """A stored example row -> what ``collate`` takes (images decoded and resized, text raw)."""
        ...

    @abstractmethod
    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        """Examples (each with "valid": False for padding of a single pass) -> a batch of tensors."""
        ...

    def load_subset_example(self, split: TaskSplit, subset: str, row: dict, inputs: TaskInputs) -> dict:
        """``load_example`` for batches of several subsets (retrieval's images and texts)."""
        return self.load_example(split, row, inputs)

    def collate_subsets(self, examples: dict[str, list[dict]], inputs: TaskInputs, step: int, rank: int) -> dict:
        """``collate`` for batches of several subsets; most tasks have one, "examples"."""
        return self.collate(examples["examples"], inputs, step, rank)

    def training_split(self, split: TaskSplit) -> Any:
        """The rows training samples from (retrieval samples image-caption pairs, not images)."""
        return split.examples

    def eval_datasets(self, split: TaskSplit, max_examples: Optional[int] = None) -> dict[str, Any]:
        """What one pass of evaluation reads, by subset: the first ``max_examples`` validation
        examples (all when None); retrieval reads images and texts."""
        return {"examples": first_examples(split, max_examples).examples}

    def evaluate(self, outputs: list[dict], device: torch.device) -> Optional[dict[str, float]]:
        """Validation metrics from the model's outputs over this rank's share of the single pass,
        when batch means are not the metric (retrieval: a similarity matrix over the whole split);
        collective. None: the trainer averages the scalar outputs."""
        return None

    @abstractmethod
    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        """The main metric of a predictor that ignores its input (majority class or answer of the
        train split, or chance), on what evaluation reads of the validation split."""
        ...


def first_examples(split: TaskSplit, max_examples: Optional[int]) -> TaskSplit:
    """The first ``max_examples`` rows of a split (all when None), as evaluation reads them."""
    if max_examples is None or max_examples >= len(split.examples):
        return split
    return TaskSplit(split.examples.select(range(max_examples)), split.images)


def pixels(split: TaskSplit, index: int, inputs: TaskInputs) -> torch.Tensor:
    """Image row ``index`` of a split as FloatTensor[3, S, S] in [-1, 1] at the base's image size."""
    return image_to_tensor(split.image(index), inputs.image_size)


def labels_or_ignore(examples: list[dict], key: str) -> torch.Tensor:
    """Long[B] of ``example[key]``, IGNORE_INDEX for the padding examples of a single pass."""
    return torch.tensor([e[key] if e["valid"] else IGNORE_INDEX for e in examples], dtype=torch.long)


def encode_texts(tokenizer: Any, texts: list[str], max_len: int, second: Optional[list[str]] = None
                 ) -> dict[str, torch.Tensor]:
    """Texts (or text pairs) -> {"text_ids": Long[B, T], "text_pad_mask": Bool[B, T]}, T = longest."""
    ids = [tokenizer.encode(t, max_len) if second is None else tokenizer.encode_pair(t, s, max_len)
           for t, s in zip(texts, second or texts)]
    length = max(len(i) for i in ids)
    out = {"text_ids": torch.full((len(ids), length), tokenizer.pad_id, dtype=torch.long),
           "text_pad_mask": torch.zeros(len(ids), length, dtype=torch.bool)}
    for row, row_ids in enumerate(ids):
        out["text_ids"][row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        out["text_pad_mask"][row, :len(row_ids)] = True
    return out


def count_tokens(batch: dict, tokens_per_image: int) -> int:
    """Tokens a backbone processes for a batch: every image ("pixels*" tensors [..., 3, H, W]) gives
    ``tokens_per_image``, every text its real tokens ("*pad_mask" tensors)."""
    tokens = 0
    for key, value in batch.items():
        if isinstance(value, dict):
            tokens += count_tokens(value, tokens_per_image)
        elif key.startswith("pixels"):
            tokens += value[..., 0, 0, 0].numel() * tokens_per_image
        elif key.endswith("pad_mask"):
            tokens += int(value.sum())
    return tokens


def label_vocabulary(train: TaskSplit, column: str = "label") -> dict:
    """{"labels": the distinct training labels, sorted} (an int label from JSONL is kept as its name)."""
    return {"labels": sorted({str(v) for v in train.examples[column]})}


def majority_baseline(train_labels: list, validation_labels: list) -> float:
    """Validation accuracy of always predicting the most frequent training label (ties: the smallest)."""
    counts: dict[str, int] = {}
    for label in map(str, train_labels):
        counts[label] = counts.get(label, 0) + 1
    majority = min(counts, key=lambda label: (-counts[label], label))
    return sum(str(v) == majority for v in validation_labels) / max(len(validation_labels), 1)
