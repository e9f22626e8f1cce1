"""Visual question answering as classification over an answer vocabulary (BEiT-3 / VL-MoE).

Head: the pair's final [T_CLS] state -> pooler (LayerNorm, linear, tanh) -> two-layer MLP
(D -> 2D -> answers). Targets are soft scores and the loss is binary cross-entropy (summed over
answers, averaged over questions, as BEiT-3). VQA accuracy is the target score of the arg-max
answer.

Scores follow VQAv2's accuracy rule, min(#annotators who gave the answer / 3, 1), generalised to
questions with fewer than three answers as min(count / min(3, n), 1): with one answer per
question (easy-VQA, the templated sets) the given answer scores 1.

Data (embedded, offline):
- ``easy_vqa``: the easy-VQA package (4,000 / 1,000 64x64 shape images, 38,575 / 9,673
  questions, 13 answers); its test split is our validation split.
- ``noto_emoji_vqa``: constructed questions over every rendered emoji's metadata from
  emoji-test.txt: "which group is this emoji in?" and "which subgroup is this emoji in?".
- ``tuxpaint_vqa``: constructed questions over the Tux Paint stamps' folders: "which category is
  this picture in?" (animals, food, ...) and, where there is one, "which kind of <category> is
  this?" (birds, fruit, ...).
A user's ``jsonl:PATH`` holds VQAv2-style {"image", "question", "answers"} (a list, or one string).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlmoe.data import easy_vqa, sources
from vlmoe.data.sources import SkipCounter, open_image
from vlmoe.data.task_data import IMAGE, TEXT, TEXTS, TaskRecords, TaskSplit
from vlmoe.model.heads import MLPClassifier, Pooler
from vlmoe.tasks.base import DownstreamTask, TaskInputs, TaskModel, encode_texts, first_examples, pixels


def _easy_vqa(skips: SkipCounter) -> Iterator[dict]:
    for split, ours in (("train", "train"), ("test", "validation")):
        for question, answer, image_id in easy_vqa.questions(split):
            yield {"image": easy_vqa.image_path(split, image_id), "image_key": f"easy_vqa/{split}/{image_id}",
                   "question": question, "answers": [answer], "split": ours}


def _noto_emoji_vqa(skips: SkipCounter) -> Iterator[dict]:
    for r in sources.noto_emoji(sources.NOTO_EMOJI_FONT, sources.EMOJI_TEST_FILE, skips):
        image = open_image(r["image"], skips)
        if image is None:
            continue
        group, subgroup = r["label_name"].split("/", 1)
        key = f"noto_emoji/{r['key']}"
        yield {"image": image, "image_key": key, "question": "which group is this emoji in?",
               "answers": [group.lower()]}
        yield {"image": image, "image_key": key, "question": "which subgroup is this emoji in?",
               "answers": [subgroup.lower()]}


def _tuxpaint_vqa(skips: SkipCounter) -> Iterator[dict]:
    for r in sources.tuxpaint_stamps(sources.TUXPAINT_STAMPS_ROOT, skips):
        image = open_image(r["image"], skips)
        if image is None:
            continue
        folders = r["label_name"].split("/")
        key = f"tuxpaint_stamps/{r['key']}"
        yield {"image": image, "image_key": key, "question": "which category is this picture in?",
               "answers": [folders[0]]}
        if len(folders) > 1:
            yield {"image": image, "image_key": key, "question": f"which kind of {folders[0]} is this?",
                   "answers": [folders[1]]}


def _normalize(record: dict) -> dict:
    record["answers"] = [a.lower() for a in record["answers"]]
    return record


RECORDS = TaskRecords(
    image_fields=("image",),
    embedded={"easy_vqa": _easy_vqa, "noto_emoji_vqa": _noto_emoji_vqa, "tuxpaint_vqa": _tuxpaint_vqa},
    default=("easy_vqa", "noto_emoji_vqa", "tuxpaint_vqa"),
    user_fields={"image": (IMAGE, True), "question": (TEXT, True), "answers": (TEXTS, True)},
    normalize=_normalize,
)


def answer_scores(answers: list[str]) -> dict[str, float]:
    """Each distinct answer's VQA score: min(count / min(3, n), 1) for n given answers (VQAv2:
    min(count / 3, 1) for its 10 annotators; 1 for the single answer of a one-answer question)."""
    if not answers:
        return {}
    needed = min(3, len(answers))
    return {answer: min(count / needed, 1.0) for answer, count in Counter(answers).items()}


def answer_vocabulary(answer_lists: list[list[str]], max_size: Optional[int] = None) -> list[str]:
    """Training answers, most frequent first (by the number of questions that have them; ties by
    name), at most ``max_size`` (BEiT-3 keeps 3,129 on VQAv2)."""
    counts = Counter(answer for answers in answer_lists for answer in set(answers))
    ranked = sorted(counts, key=lambda answer: (-counts[answer], answer))
    return ranked if max_size is None else ranked[:max_size]


def score_targets(answer_lists: list[list[str]], index: Mapping[str, int], num_answers: int) -> torch.Tensor:
    """Float[B, A] soft targets; answers outside the vocabulary get no column (their score is lost)."""
    targets = torch.zeros(len(answer_lists), num_answers)
    for row, answers in enumerate(answer_lists):
        for answer, score in answer_scores(answers).items():
            if answer in index:
                targets[row, index[answer]] = score
    return targets


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits [N, A] against soft targets [N, A], summed over answers and
    averaged over questions (a graph-connected zero for N == 0)."""
    if logits.shape[0] == 0:
        return logits.sum().float() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / logits.shape[0]


@torch.no_grad()
def vqa_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over questions of the target score of the arg-max answer (0 when there are none)."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return targets.gather(1, logits.argmax(dim=-1, keepdim=True)).float().mean()


class VQAModel(TaskModel):
    """batch {pixels [B,3,H,W], text_ids [B,T], text_pad_mask [B,T], targets [B,A], valid [B]}
    -> {"loss", "accuracy", "num_examples"}."""

    def __init__(self, backbone: nn.Module, num_answers: int) -> None:
        super().__init__()
        self.backbone = backbone
        cfg = backbone.cfg
        self.pooler = Pooler(cfg.dim, cfg.init_std, cfg.layer_norm_eps)
        self.head = MLPClassifier(cfg.dim, 2 * cfg.dim, num_answers, cfg.init_std, cfg.layer_norm_eps)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self.backbone(pixels=batch["pixels"], text_ids=batch["text_ids"], text_pad_mask=batch["text_pad_mask"])
        logits = self.head(self.pooler(out.hidden[:, out.text_slice][:, 0]))  # [T_CLS]
        valid = batch["valid"]
        logits, targets = logits[valid], batch["targets"][valid]
        return {"loss": vqa_loss(logits, targets), "accuracy": vqa_accuracy(logits, targets),
                "num_examples": valid.sum()}


class VQA(DownstreamTask):
    name = "vqa"
    main_metric = "accuracy"
    records = RECORDS

    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        return {"answers": answer_vocabulary(train.examples["answers"], max_size)}

    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        return VQAModel(backbone, len(inputs.vocab["answers"]))

    def unusable(self, row: dict, split: str, inputs: TaskInputs) -> Optional[str]:
        # a validation question whose answers are all outside the vocabulary stays: it scores 0
        if split == "train" and not any(answer in inputs.index for answer in row["answers"]):
            return "answer outside the vocabulary"
        return None

    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        return {"pixels": pixels(split, row["image"], inputs), "question": row["question"], "answers": row["answers"]}

    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        return {"pixels": torch.stack([e["pixels"] for e in examples]),
                **encode_texts(inputs.text_tokenizer, [e["question"] for e in examples], inputs.max_text_len),
                "targets": score_targets([e["answers"] for e in examples], inputs.index, len(inputs.index)),
                "valid": torch.tensor([e["valid"] for e in examples], dtype=torch.bool)}

    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        validation = first_examples(validation, max_examples)
        majority = answer_vocabulary(train.examples["answers"], 1)[0]
        scores = [answer_scores(answers).get(majority, 0.0) for answers in validation.examples["answers"]]
        return {"accuracy": sum(scores) / max(len(scores), 1)}


TASK = VQA()

