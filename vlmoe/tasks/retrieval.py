"""Image-text retrieval (VLMO / BEiT-3): contrastive dual encoders plus image-text matching.

Training: an image-only pass ([I_CLS] -> linear -> L2 norm) and a text-only pass ([T_CLS] ->
linear -> L2 norm) give features that are gathered over all ranks with their gradients; the
image-text contrastive loss is the symmetric cross-entropy of the scaled cosine similarities
(learnable temperature, initialised at 0.07), with every caption of an image a positive. Image-
text matching classifies pair passes ([T_CLS] -> pooler -> linear -> 2) on the positives and on
one hard negative per image and per text, drawn in proportion to the softmax of the contrastive
similarities over the whole global batch (positives excluded). Inference is dual encoding only.

Recall@k follows COCO / Flickr30k (Karpathy): image -> text counts a hit when any of the image's
captions is among its top k; text -> image when its one image is. ``recall_at_k`` is pure.

Data: ``noto_emoji_captions`` (every rendered emoji with its CLDR name from emoji-test.txt, its
Unicode character name and the informal aliases of NamesList.txt, where they differ) and
``tuxpaint_captions`` (every Tux Paint stamp with its English description and the distinct
English-locale variants of it, en_GB, en_AU, ...), so an image has one or more captions; split
by a hash of the image. A user's ``jsonl:PATH`` holds {"image", "captions": [...]} or
{"image", "text"} (the captions of lines with the same image all belong to it), optionally "split".
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlmoe.data import sources
from vlmoe.data.sources import SkipCounter, open_image
from vlmoe.data.task_data import IMAGE, TEXT, TEXTS, SkipRecord, TaskRecords, TaskSplit
from vlmoe.model.heads import Pooler
from vlmoe.nn.init import init_linears_
from vlmoe.model.objectives import prediction_accuracy, prediction_loss
from vlmoe.tasks.base import DownstreamTask, TaskInputs, TaskModel, encode_texts, pixels

UNICODE_NAMES_LIST = "/usr/share/unicode/NamesList.txt"
RECALL_KS = (1, 5, 10)
ENGLISH_VARIANT = re.compile(r"^en_[A-Z]{2}\.utf8=(.+)$")


# ------------------------------------------------------------------------------------ data


def unicode_names(names_list: str | Path = UNICODE_NAMES_LIST) -> dict[str, list[str]]:
    """Code point (hex, e.g. "1F4A9") -> [character name, aliases...], lowercased, from NamesList.txt
    ("1F4A9<tab>PILE OF POO" then "<tab>= dog dirt")."""
    names: dict[str, list[str]] = {}
    current: Optional[list[str]] = None
    with open(names_list, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line[:1] not in ("\t", "@", ";") and "\t" in line:
                code, _, name = line.rstrip("\n").partition("\t")
                current = names.setdefault(code, []) if not name.startswith("<") else None
                if current is not None:
                    current.append(name.strip().lower())
            elif current is not None and line.startswith("\t= "):
                current.append(line[3:].strip().lower())
    return names


def distinct(texts: Sequence[str]) -> list[str]:
    """Texts in order without repeats (case-insensitive, whitespace-normalised)."""
    seen, out = set(), []
    for text in texts:
        norm = " ".join(text.lower().split())
        if norm and norm not in seen:
            seen.add(norm)
            out.append(text.strip())
    return out


def _noto_emoji_captions(skips: SkipCounter) -> Iterator[dict]:
    names = unicode_names()
    for r in sources.noto_emoji(sources.NOTO_EMOJI_FONT, sources.EMOJI_TEST_FILE, skips):
        image = open_image(r["image"], skips)
        if image is None:
            continue
        codepoints = [c for c in r["key"].split("_") if c != "FE0F"]  # the emoji-style selector adds no name
        extra = names.get(codepoints[0], []) if len(codepoints) == 1 else []
        yield {"image": image, "image_key": f"noto_emoji/{r['key']}", "captions": distinct([r["text"], *extra])}


def english_captions(description_file: Path) -> list[str]:
    """A Tux Paint stamp's English description (first line) and its distinct English-locale variants."""
    lines = description_file.read_text(encoding="utf-8", errors="replace").splitlines()
    variants = [m.group(1) for line in lines[1:] if (m := ENGLISH_VARIANT.match(line.strip()))]
    return distinct([lines[0], *variants])


def _tuxpaint_captions(skips: SkipCounter) -> Iterator[dict]:
    root = Path(sources.TUXPAINT_STAMPS_ROOT)
    for r in sources.tuxpaint_stamps(root, skips):
        image = open_image(r["image"], skips)
        if image is not None:
            yield {"image": image, "image_key": f"tuxpaint_stamps/{r['key']}",
                   "captions": english_captions(root / (r["key"] + ".txt"))}


def _normalize(record: dict) -> dict:
    captions = record.pop("captions", None) or ([record.pop("text")] if "text" in record else None)
    record.pop("text", None)
    if not captions:
        raise SkipRecord("missing field 'captions' or 'text'")
    return {**record, "captions": captions}


RECORDS = TaskRecords(
    image_fields=("image",),
    embedded={"noto_emoji_captions": _noto_emoji_captions, "tuxpaint_captions": _tuxpaint_captions},
    default=("noto_emoji_captions", "tuxpaint_captions"),
    user_fields={"image": (IMAGE, True), "captions": (TEXTS, False), "text": (TEXT, False)},
    normalize=_normalize,
)


# ------------------------------------------------------------------------------------ metrics


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_KS
                ) -> dict[str, float]:
    """Retrieval recall from similarity [n_images, n_texts] and text_to_image Long[n_texts] (the
    image row of each text). Image -> text: a hit when any of the image's texts is in its top k;
    text -> image: when its image is in its top k. A k above the candidates counts every candidate.
    Returns fractions in [0, 1]: i2t_r{k}, t2i_r{k} for each k, and their mean r_mean."""
    n_images, n_texts = similarity.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must be [{n_texts}], got {tuple(text_to_image.shape)}")
    out: dict[str, float] = {}
    positive = text_to_image[None, :] == torch.arange(n_images, device=similarity.device)[:, None]  # [I, T]
    # rank of the best positive text of each image, and of each text's image (0 = top)
    i2t_rank = torch.where(positive, similarity, torch.finfo(similarity.dtype).min).amax(dim=1, keepdim=True)
    i2t_rank = (similarity > i2t_rank).sum(dim=1)
    t2i_score = similarity.gather(0, text_to_image[None, :]).squeeze(0)  # [T]
    t2i_rank = (similarity > t2i_score[None, :]).sum(dim=0)
    has_text = positive.any(dim=1)
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank[has_text] < k).float().mean()) if has_text.any() else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean()) if n_texts else 0.0
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(captions_per_image: Sequence[int], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Expected recall of a random ranking, under the keys of ``recall_at_k``: an image with m of the
    T texts finds one of them in a random top k with probability 1 - C(T - m, k) / C(T, k); a
    text finds its image with probability k / I."""
    n_images, n_texts = len(captions_per_image), sum(captions_per_image)
    out: dict[str, float] = {}
    for k in ks:
        drawn = min(k, n_texts)
        misses = [math.comb(n_texts - m, drawn) / math.comb(n_texts, drawn) for m in captions_per_image]
        out[f"i2t_r{k}"] = sum(1 - miss for miss in misses) / n_images
    for k in ks:
        out[f"t2i_r{k}"] = min(k, n_images) / n_images
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, all_image_features: torch.Tensor,
                     all_text_features: torch.Tensor, positives: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric image-text contrastive loss of this rank's rows against the global batch.

    image_features, text_features [B, E] (this rank's pairs, L2-normalised); all_* [G, E] (every
    rank's, this rank's included); positives Bool[B, G]: row b's own pair and every other pair of
    the same image (a caption of the image is never a negative). Targets spread evenly over the
    positives; scale is the inverse temperature.
    """
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    image_to_text = scale * image_features @ all_text_features.T
    text_to_image = scale * text_features @ all_image_features.T
    return (F.cross_entropy(image_to_text.float(), targets) + F.cross_entropy(text_to_image.float(), targets)) / 2


def hard_negatives(similarity: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative column per row of similarity [B, G], drawn with probability softmax(similarity)
    over the non-positive columns (VLMO / ALBEF); rows without any negative get uniform weights
    over the non-positives, or none at all. Returns (column Long[B], has_negative Bool[B])."""
    weights = torch.softmax(similarity.float(), dim=1).masked_fill(positives, 0.0)
    negatives = ~positives
    has_negative = negatives.any(dim=1)
    fallback = weights.sum(dim=1) <= 0
    weights = torch.where(fallback[:, None], negatives.float(), weights)
    weights[~has_negative] = 1.0  # any column: the row is left out of the matching loss
    return torch.multinomial(weights, 1).squeeze(1), has_negative


def _gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (same shape on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if with_grad:  # the backward sums each rank's gradient into the owner's rows
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(tensor), dim=0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _gather_padded(ids: torch.Tensor, pad_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids [B, T] and pad masks of every rank, padded to the longest T."""
    length = torch.tensor([ids.shape[1]], device=ids.device)
    longest = int(_gather(length, with_grad=False).max())
    ids = F.pad(ids, (0, longest - ids.shape[1]), value=pad_id)
    pad_mask = F.pad(pad_mask, (0, longest - pad_mask.shape[1]), value=False)
    return _gather(ids, with_grad=False), _gather(pad_mask, with_grad=False)


# ------------------------------------------------------------------------------------ model


class InverseTemperature(nn.Module):
    """The learnable scale of the contrastive logits, stored as its log (CLIP); capped at 100.
    A module of its own: ZeRO-3 gathers a parameter only around its module's call."""

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), math.log(initial)))  # 1-D: zero.Init cannot partition 0-D

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)[0]


class RetrievalModel(TaskModel):
    """Dual encoders with a contrastive and a matching head.

    Training batch {pixels [B,3,H,W], text_ids [B,T], text_pad_mask [B,T], image_ids Long[B] (any id
    that is equal for the captions of one image)} -> {"loss", "itc", "itm", "itm_accuracy",
    "num_examples"}. Evaluation batch {"images": {pixels, positions, valid}, "texts": {text_ids,
    text_pad_mask, positions, image_rows, valid}} -> features with their positions.
    """

    def __init__(self, backbone: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        cfg = backbone.cfg
        self.pad_id = pad_id
        self.image_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.text_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.temperature = InverseTemperature(1 / 0.07)
        self.itm_pooler = Pooler(cfg.dim, cfg.init_std, cfg.layer_norm_eps)
        self.itm_head = nn.Linear(cfg.dim, 2)
        init_linears_(self.image_proj, self.text_proj, self.itm_head, std=cfg.init_std)

    def encode_images(self, pixels_: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixels=pixels_)
        return F.normalize(self.image_proj(out.hidden[:, 0]).float(), dim=-1)  # [I_CLS]

    def encode_texts(self, text_ids: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(text_ids=text_ids, text_pad_mask=pad_mask)
        return F.normalize(self.text_proj(out.hidden[:, 0]).float(), dim=-1)  # [T_CLS]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "images" in batch:
            return self._encode_for_evaluation(batch)
        images = self.encode_images(batch["pixels"])
        texts = self.encode_texts(batch["text_ids"], batch["text_pad_mask"])
        all_images, all_texts = _gather(images, with_grad=True), _gather(texts, with_grad=True)
        all_ids = _gather(batch["image_ids"], with_grad=False)
        positives = batch["image_ids"][:, None] == all_ids[None, :]  # [B, G]
        scale = self.temperature()
        itc = contrastive_loss(images, texts, all_images, all_texts, positives, scale)
        itm, itm_accuracy = self._matching(batch, images, texts, all_images, all_texts, positives)
        return {"loss": itc + itm, "itc": itc.detach(), "itm": itm.detach(), "itm_accuracy": itm_accuracy,
                "num_examples": torch.tensor(images.shape[0])}

    def _matching(self, batch, images, texts, all_images, all_texts, positives) -> tuple[torch.Tensor, torch.Tensor]:
        """Matching loss and accuracy on B positive pairs, B (image, hard negative text) and B
        (hard negative image, text) pairs, drawn from the global batch."""
        with torch.no_grad():
            all_pixels = _gather(batch["pixels"], with_grad=False)
            all_ids, all_pad = _gather_padded(batch["text_ids"], batch["text_pad_mask"], self.pad_id)
            neg_text, image_has = hard_negatives(images @ all_texts.T, positives)
            neg_image, text_has = hard_negatives(texts @ all_images.T, positives)
        length = all_ids.shape[1]
        own_ids = F.pad(batch["text_ids"], (0, length - batch["text_ids"].shape[1]), value=self.pad_id)
        own_pad = F.pad(batch["text_pad_mask"], (0, length - batch["text_pad_mask"].shape[1]), value=False)
        pair_pixels = torch.cat([batch["pixels"], batch["pixels"], all_pixels[neg_image]])
        pair_ids = torch.cat([own_ids, all_ids[neg_text], own_ids])
        pair_pad = torch.cat([own_pad, all_pad[neg_text], own_pad])
        out = self.backbone(pixels=pair_pixels, text_ids=pair_ids, text_pad_mask=pair_pad)
        logits = self.itm_head(self.itm_pooler(out.hidden[:, out.text_slice][:, 0]))
        b = images.shape[0]
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=logits.device), image_has, text_has])
        return prediction_loss(logits[keep], labels[keep]), prediction_accuracy(logits[keep], labels[keep])

    @torch.no_grad()
    def _encode_for_evaluation(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images, texts = batch["images"], batch["texts"]
        return {"image_features": self.encode_images(images["pixels"]), "image_positions": images["positions"],
                "image_valid": images["valid"],
                "text_features": self.encode_texts(texts["text_ids"], texts["text_pad_mask"]),
                "text_positions": texts["positions"], "text_image_rows": texts["image_rows"],
                "text_valid": texts["valid"]}


# ------------------------------------------------------------------------------------ task


class RowTable:
    """Rows held as columns, read like a datasets.Dataset by the step-indexed batches."""

    def __init__(self, columns: dict[str, list]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"RowTable columns differ in length: { {k: len(v) for k, v in columns.items()} }")
        self.columns, self.length = columns, lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, rows: list[int]) -> dict[str, list]:
        return {name: [values[i] for i in rows] for name, values in self.columns.items()}


def caption_pairs(examples: Any) -> RowTable:
    """One row per (image, caption): {"image": image row, "caption": text}."""
    image_rows, captions = examples["image"], examples["captions"]
    return RowTable({"image": [row for row, texts in zip(image_rows, captions) for _ in texts],
                     "caption": [text for texts in captions for text in texts]})


class Retrieval(DownstreamTask):
    name = "retrieval"
    main_metric = "r_mean"
    records = RECORDS
    evaluates_outputs = True

    def vocabulary(self, train: TaskSplit, max_size: Optional[int] = None) -> dict:
        return {}

    def build_model(self, backbone: nn.Module, inputs: TaskInputs) -> TaskModel:
        return RetrievalModel(backbone, inputs.text_tokenizer.pad_id)

    def training_split(self, split: TaskSplit) -> Any:
        return caption_pairs(split.examples)

    def load_example(self, split: TaskSplit, row: dict, inputs: TaskInputs) -> dict:
        return {"pixels": pixels(split, row["image"], inputs), "caption": row["caption"], "image_id": row["image"]}

    def collate(self, examples: list[dict], inputs: TaskInputs, step: int, rank: int) -> dict:
        return {"pixels": torch.stack([e["pixels"] for e in examples]),
                **encode_texts(inputs.text_tokenizer, [e["caption"] for e in examples], inputs.max_text_len),
                "image_ids": torch.tensor([e["image_id"] for e in examples], dtype=torch.long)}

    def eval_datasets(self, split: TaskSplit, max_examples: Optional[int] = None) -> dict[str, Any]:
        """The first ``max_examples`` distinct images of the (hash-ordered) validation examples, and
        every caption of them; positions number images and texts for the similarity matrix."""
        image_rows, captions = split.examples["image"], split.examples["captions"]
        chosen: dict[int, int] = {}  # image row -> position among the evaluated images
        for row in image_rows:
            if row not in chosen and (max_examples is None or len(chosen) < max_examples):
                chosen[row] = len(chosen)
        texts = [(chosen[row], text) for row, texts in zip(image_rows, captions) if row in chosen for text in texts]
        return {"images": RowTable({"image": list(chosen), "position": list(range(len(chosen)))}),
                "texts": RowTable({"text": [t for _, t in texts], "image_position": [p for p, _ in texts],
                                   "position": list(range(len(texts)))})}

    def load_subset_example(self, split: TaskSplit, subset: str, row: dict, inputs: TaskInputs) -> dict:
        if subset == "images":
            return {"pixels": pixels(split, row["image"], inputs), "position": row["position"]}
        if subset == "texts":
            return {"text": row["text"], "image_position": row["image_position"], "position": row["position"]}
        return self.load_example(split, row, inputs)

    def collate_subsets(self, examples: dict[str, list[dict]], inputs: TaskInputs, step: int, rank: int) -> dict:
        if "images" not in examples:
            return self.collate(examples["examples"], inputs, step, rank)
        images, texts = examples["images"], examples["texts"]
        return {"images": {"pixels": torch.stack([e["pixels"] for e in images]),
                           "positions": torch.tensor([e["position"] for e in images]),
                           "valid": torch.tensor([e["valid"] for e in images])},
                "texts": {**encode_texts(inputs.text_tokenizer, [e["text"] for e in texts], inputs.max_text_len),
                          "positions": torch.tensor([e["position"] for e in texts]),
                          "image_rows": torch.tensor([e["image_position"] for e in texts]),
                          "valid": torch.tensor([e["valid"] for e in texts])}}

    def evaluate(self, outputs: list[dict], device: torch.device) -> Optional[dict[str, float]]:
        """Every rank's features, placed by position, then recall over the whole evaluated split."""
        local = {side: _valid_rows(outputs, side) for side in ("image", "text")}
        gathered = [local] if not dist.is_initialized() else [None] * dist.get_world_size()
        if dist.is_initialized():
            dist.all_gather_object(gathered, local)
        images = _place([g["image"] for g in gathered])
        texts = _place([g["text"] for g in gathered])
        similarity = images["features"] @ texts["features"].T
        return {**recall_at_k(similarity, texts["image_rows"]), "num_images": similarity.shape[0],
                "num_texts": similarity.shape[1]}

    def trivial_baseline(self, train: TaskSplit, validation: TaskSplit, inputs: TaskInputs,
                         max_examples: Optional[int] = None) -> dict[str, float]:
        texts = self.eval_datasets(validation, max_examples)["texts"].columns["image_position"]
        per_image: dict[int, int] = {}
        for position in texts:
            per_image[position] = per_image.get(position, 0) + 1
        return chance_recall(list(per_image.values()))


def _valid_rows(outputs: list[dict], side: str) -> dict[str, torch.Tensor]:
    """This rank's evaluated rows of one side ("image" or "text"), padding removed, on the CPU."""
    keep = [o[f"{side}_valid"].cpu() for o in outputs]
    rows = {"features": torch.cat([o[f"{side}_features"].float().cpu()[k] for o, k in zip(outputs, keep)]),
            "positions": torch.cat([o[f"{side}_positions"].cpu()[k] for o, k in zip(outputs, keep)])}
    if side == "text":
        rows["image_rows"] = torch.cat([o["text_image_rows"].cpu()[k] for o, k in zip(outputs, keep)])
    return rows


def _place(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows and order them by position."""
    merged = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    order = merged.pop("positions").argsort()
    return {key: value[order] for key, value in merged.items()}


TASK = Retrieval()
