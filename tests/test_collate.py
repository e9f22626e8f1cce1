"""PretrainCollator: shapes, padding, label positions, MIM targets, determinism and bad input."""
from __future__ import annotations

import pytest
import torch

from vlmoe.data.collate import PretrainCollator
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.model.config import model_config
from vlmoe.model.pretraining import VLMoEForPretraining

torch.set_num_threads(1)

CORPUS = [
    "a red fox jumps over the lazy dog", "the quick brown cat sleeps on a warm mat",
    "an apple a day keeps the doctor away", "small birds sing in the tall green trees",
    "the river runs fast after heavy rain", "children play football in the park at noon",
    "a yellow taxi waits outside the old station", "fresh bread smells good in the morning",
] * 20
IMAGE_SIZE, PATCH = 32, 8


class PatchMeanTokenizer:
    """Visual tokens for the tests: each patch's mean intensity quantised into `codebook_size` bins."""

    patch_size = PATCH
    codebook_size = 16

    def tokenize(self, pixels: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.avg_pool2d(pixels.mean(1, keepdim=True), self.patch_size).flatten(1)  # [B, P]
        return ((means.clamp(0, 1) * self.codebook_size).long()).clamp(max=self.codebook_size - 1)


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.train(CORPUS, vocab_size=120, path=tmp_path_factory.mktemp("tok") / "text.model")


def collator(text_tokenizer, **kwargs) -> PretrainCollator:
    return PretrainCollator(text_tokenizer, PatchMeanTokenizer(), max_text_len=16, **kwargs)


def images(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) for _ in range(count)]


def examples(n: int = 4) -> dict[str, list[dict]]:
    return {"image": [{"pixels": p} for p in images(n)],
            "text": [{"text": t} for t in CORPUS[:n]],
            "pair": [{"pixels": p, "text": t} for p, t in zip(images(n, seed=1), CORPUS[2:2 + n])]}


def test_batch_shapes_padding_and_label_positions(text_tokenizer):
    ex = examples()
    ex["text"][1]["text"] = "dog"  # a short one: padded
    batch = collator(text_tokenizer)(ex, step=0, rank=0)
    assert set(batch) == {"image", "text", "pair"}
    text = batch["text"]
    encoded = [text_tokenizer.encode(e["text"], 16) for e in ex["text"]]
    length = max(map(len, encoded))
    assert text["ids"].shape == text["pad_mask"].shape == text["labels"].shape == (4, length)
    assert text["pad_mask"].sum(1).tolist() == [len(e) for e in encoded]
    assert (text["ids"][~text["pad_mask"]] == text_tokenizer.pad_id).all()
    for row, ids in enumerate(encoded):
        ids = torch.tensor(ids)
        labels = text["labels"][row]
        chosen = labels != -100
        assert not chosen[~text["pad_mask"][row]].any()
        assert not chosen[0] and not chosen[len(ids) - 1]  # [T_CLS], [T_SEP] never predicted
        assert chosen.sum() == max(1, round(0.15 * (len(ids) - 2)))
        assert torch.equal(labels[chosen], ids[chosen[:len(ids)]])
        assert torch.equal(text["ids"][row, :len(ids)][~chosen[:len(ids)]], ids[~chosen[:len(ids)]])
    image = batch["image"]
    assert image["pixels"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and image["pixels"].dtype == torch.float32
    assert image["mim_mask"].shape == image["mim_targets"].shape == (4, 16)
    assert (image["mim_mask"].sum(1) == round(0.4 * 16)).all()
    # targets come from the unmasked pixels
    assert torch.equal(image["mim_targets"], PatchMeanTokenizer().tokenize(torch.stack(images(4))))
    assert set(batch["pair"]) == {"ids", "pad_mask", "labels", "pixels", "mim_mask", "mim_targets"}


def test_vlm_masks_half_of_the_pair_text(text_tokenizer):
    batch = collator(text_tokenizer)(examples(), step=0, rank=0)
    pair = batch["pair"]
    for row in range(4):
        maskable = int(pair["pad_mask"][row].sum()) - 2
        assert int((pair["labels"][row] != -100).sum()) == round(0.5 * maskable)
    assert (pair["mim_mask"].sum(1) == round(0.4 * 16)).all()


def test_masks_are_a_pure_function_of_seed_step_rank_and_position(text_tokenizer):
    make = collator(text_tokenizer, seed=3)
    first = make(examples(), step=5, rank=1)
    again = collator(text_tokenizer, seed=3)(examples(), step=5, rank=1)
    for subset in first:
        for key in first[subset]:
            assert torch.equal(first[subset][key], again[subset][key]), (subset, key)
    for other in (make(examples(), step=6, rank=1), make(examples(), step=5, rank=0),
                  collator(text_tokenizer, seed=4)(examples(), step=5, rank=1)):
        assert not torch.equal(first["image"]["mim_mask"], other["image"]["mim_mask"])
        assert not torch.equal(first["text"]["labels"], other["text"]["labels"])
    # rows differ from each other, and the pair subset does not reuse the image subset's masks
    assert len({tuple(m.tolist()) for m in first["image"]["mim_mask"]}) == 4
    assert not torch.equal(first["image"]["mim_mask"], first["pair"]["mim_mask"])


def test_missing_subsets_are_skipped(text_tokenizer):
    batch = collator(text_tokenizer)({"text": [{"text": "a dog"}], "image": []}, step=0, rank=0)
    assert set(batch) == {"text"}
    text_only = PretrainCollator(text_tokenizer, None, max_text_len=16)
    assert set(text_only({"text": [{"text": "a cat"}]}, step=0, rank=0)) == {"text"}


@pytest.mark.parametrize("bad, error, message", [
    ({"video": []}, ValueError, r"unknown subset\(s\) \['video'\]"),
    ({"pair": [{"text": "x"}]}, KeyError, r"pair example 0 is missing key\(s\) \['pixels'\]"),
    ({"image": [{"pixels": torch.zeros(3, 32, 32)}, {"pixels": torch.zeros(3, 16, 16)}]}, ValueError,
     "image pixels must all be"),
    ({"image": [{"pixels": torch.zeros(3, 30, 30)}]}, ValueError, "image size 30x30 is not a multiple"),
    ({"text": []}, ValueError, "no examples in any of"),
])
def test_bad_examples_name_the_problem(text_tokenizer, bad, error, message):
    with pytest.raises(error, match=message):
        collator(text_tokenizer)(bad, step=0, rank=0)


def test_bad_settings_name_the_problem(text_tokenizer):
    with pytest.raises(ValueError, match=r"mim_ratio must be in \(0, 1\]"):
        collator(text_tokenizer, mim_ratio=0.0)
    with pytest.raises(ValueError, match="has no visual tokenizer"):
        PretrainCollator(text_tokenizer, None, max_text_len=16)({"image": [{"pixels": torch.zeros(3, 32, 32)}]}, 0, 0)


def test_collated_batch_trains_the_model(text_tokenizer):
    cfg = model_config("tiny", vocab_size=text_tokenizer.vocab_size, codebook_size=PatchMeanTokenizer.codebook_size,
                       max_text_len=16, drop_path=0.0)
    torch.manual_seed(0)
    model = VLMoEForPretraining(cfg)
    batch = collator(text_tokenizer)(examples(), step=0, rank=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses
