"""Collation of pretraining examples into masked MLM / MIM / VLM batches."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from vlmoe.data.masking import IGNORE_INDEX, blockwise_mask, mlm_mask, sample_generator

SUBSETS = ("image", "text", "pair")
_EXAMPLE_KEYS = {"image": ("pixels",), "text": ("text",), "pair": ("pixels", "text")}


class PretrainCollator:
    """Turns {"image": [{"pixels"}], "text": [{"text"}], "pair": [{"pixels", "text"}]} into the batch
    `VLMoEForPretraining` reads. Every mask is a pure function of (seed, step, rank, position in
    the batch, subset), so a resumed run redraws exactly the masks of the uninterrupted one.

    text_tokenizer: pad_id, mask_id, vocab_size, special_ids, encode(text, max_len) -> list[int].
    visual_tokenizer: patch_size, tokenize(pixels Float[B,3,H,W]) -> Long[B,P]; may be None when
    no image or pair examples are collated.
    """

    def __init__(self, text_tokenizer: Any, visual_tokenizer: Optional[Any], *, max_text_len: int,
                 mlm_prob: float = 0.15, mim_ratio: float = 0.4, vlm_text_prob: float = 0.5,
                 vlm_image_ratio: float = 0.4, seed: int = 0) -> None:
        for name, value in (("mlm_prob", mlm_prob), ("mim_ratio", mim_ratio), ("vlm_text_prob", vlm_text_prob),
                            ("vlm_image_ratio", vlm_image_ratio)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"PretrainCollator: {name} must be in (0, 1], got {value}")
        if max_text_len < 2:
            raise ValueError(f"PretrainCollator: max_text_len must be >= 2 ([T_CLS] and [T_SEP]), got {max_text_len}")
        self.text_tokenizer = text_tokenizer
        self.visual_tokenizer = visual_tokenizer
        self.max_text_len = max_text_len
        self.mlm_prob, self.mim_ratio = mlm_prob, mim_ratio
        self.vlm_text_prob, self.vlm_image_ratio = vlm_text_prob, vlm_image_ratio
        self.seed = seed
        self.special_ids = torch.tensor(sorted(set(text_tokenizer.special_ids)), dtype=torch.long)
        # Random replacements are drawn above every special id, so they are always ordinary tokens.
        self.random_low = int(self.special_ids.max()) + 1
        self.random_high = int(text_tokenizer.vocab_size)
        if self.random_low >= self.random_high:
            raise ValueError(f"text tokenizer has no ordinary ids above its special ids {self.special_ids.tolist()} "
                             f"(vocab_size={self.random_high})")

    def _text(self, texts: Sequence[str], prob: float, step: int, rank: int, salt: str) -> dict[str, torch.Tensor]:
        """-> ids Long [B, T], pad_mask Bool [B, T], labels Long [B, T]; T = longest text in the batch."""
        tok = self.text_tokenizer
        inputs, labels = [], []
        for index, text in enumerate(texts):
            ids = torch.tensor(tok.encode(text, self.max_text_len), dtype=torch.long)
            if ids.numel() == 0 or ids.numel() > self.max_text_len:
                raise ValueError(f"text tokenizer returned {ids.numel()} ids for {text[:40]!r} (max_len={self.max_text_len})")
            maskable = ~torch.isin(ids, self.special_ids)
            gen = sample_generator(self.seed, step, rank, index, salt)
            masked, label = mlm_mask(ids, maskable, prob, tok.mask_id, self.random_low, self.random_high, gen)
            inputs.append(masked)
            labels.append(label)
        length = max(len(ids) for ids in inputs)
        batch = len(inputs)
        out = {"ids": torch.full((batch, length), tok.pad_id, dtype=torch.long),
               "pad_mask": torch.zeros(batch, length, dtype=torch.bool),
               "labels": torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)}
        for row, (ids, label) in enumerate(zip(inputs, labels)):
            out["ids"][row, :len(ids)] = ids
            out["pad_mask"][row, :len(ids)] = True
            out["labels"][row, :len(ids)] = label
        return out

    def _image(self, pixels: Sequence[torch.Tensor], ratio: float, step: int, rank: int,
               salt: str) -> dict[str, torch.Tensor]:
        """-> pixels Float [B, 3, H, W], mim_mask Bool [B, P], mim_targets Long [B, P]."""
        if self.visual_tokenizer is None:
            raise ValueError("PretrainCollator got image examples but has no visual tokenizer")
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"{salt} pixels must all be [C, H, W] of one size, got shapes {sorted(shapes)}")
        stacked = torch.stack([p.float() for p in pixels])
        height, width = stacked.shape[-2:]
        patch = self.visual_tokenizer.patch_size
        if height % patch or width % patch:
            raise ValueError(f"{salt} image size {height}x{width} is not a multiple of the visual tokenizer's patch {patch}")
        with torch.no_grad():
            targets = self.visual_tokenizer.tokenize(stacked).long()
        grid_h, grid_w = height // patch, width // patch
        if tuple(targets.shape) != (len(pixels), grid_h * grid_w):
            raise ValueError(f"visual tokenizer returned {tuple(targets.shape)}, expected {(len(pixels), grid_h * grid_w)}")
        masks = torch.stack([blockwise_mask(grid_h, grid_w, ratio, sample_generator(self.seed, step, rank, index, salt))
                             for index in range(len(pixels))])
        return {"pixels": stacked, "mim_mask": masks, "mim_targets": targets}

    def __call__(self, examples: dict[str, list[dict]], step: int, rank: int) -> dict[str, dict[str, torch.Tensor]]:
        unknown = sorted(set(examples) - set(SUBSETS))
        if unknown:
            raise ValueError(f"PretrainCollator: unknown subset(s) {unknown}; expected some of {list(SUBSETS)}")
        for subset, items in examples.items():
            for index, example in enumerate(items):
                missing = [key for key in _EXAMPLE_KEYS[subset] if key not in example]
                if missing:
                    raise KeyError(f"PretrainCollator: {subset} example {index} is missing key(s) {missing}")
        batch: dict[str, dict[str, torch.Tensor]] = {}
        if examples.get("text"):
            batch["text"] = self._text([e["text"] for e in examples["text"]], self.mlm_prob, step, rank, "text")
        if examples.get("image"):
            batch["image"] = self._image([e["pixels"] for e in examples["image"]], self.mim_ratio, step, rank, "image")
        if examples.get("pair"):
            pairs = examples["pair"]
            batch["pair"] = {**self._text([e["text"] for e in pairs], self.vlm_text_prob, step, rank, "pair_text"),
                             **self._image([e["pixels"] for e in pairs], self.vlm_image_ratio, step, rank, "pair_image")}
        if not batch:
            raise ValueError("PretrainCollator: no examples in any of 'image', 'text', 'pair'")
        return batch
