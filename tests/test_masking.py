"""Masking: stable per-sample generators, BERT 80/10/10 text masking, exact BEiT block masks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vlmoe.data.masking import blockwise_mask, mlm_mask, sample_generator

MASK_ID, LOW, HIGH = 4, 5, 1000


def draw(gen: torch.Generator) -> list[float]:
    return torch.rand(4, generator=gen).tolist()


def test_sample_generator_is_a_function_of_all_fields():
    base = draw(sample_generator(1, 2, 3, 4, "text"))
    assert draw(sample_generator(1, 2, 3, 4, "text")) == base
    for other in [(0, 2, 3, 4, "text"), (1, 0, 3, 4, "text"), (1, 2, 0, 4, "text"), (1, 2, 3, 0, "text"),
                  (1, 2, 3, 4, "image"), (1, 2, 3, 4, "")]:
        assert draw(sample_generator(*other)) != base, other
    # (step, rank) = (12, 3) and (1, 23) must not collide through naive concatenation
    assert draw(sample_generator(0, 12, 3, 0)) != draw(sample_generator(0, 1, 23, 0))


def test_sample_generator_is_stable_across_processes():
    code = "from vlmoe.data.masking import sample_generator as g; import torch; print(torch.rand(3, generator=g(7, 8, 1, 5, 'x')).tolist())"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outputs == {str(torch.rand(3, generator=sample_generator(7, 8, 1, 5, "x")).tolist()) + "\n"}


def sequence(length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(100, 100 + length)
    ids[0], ids[-1] = 2, 3  # [T_CLS], [T_SEP]
    maskable = torch.ones(length, dtype=torch.bool)
    maskable[0] = maskable[-1] = False
    return ids, maskable


def test_mlm_mask_chooses_the_right_count_and_labels_them():
    ids, maskable = sequence(42)  # 40 maskable
    for index in range(20):
        inputs, labels = mlm_mask(ids, maskable, 0.15, MASK_ID, LOW, HIGH, sample_generator(0, 0, 0, index))
        chosen = labels != -100
        assert chosen.sum() == 6  # round(0.15 * 40)
        assert not chosen[~maskable].any()
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(inputs[~chosen], ids[~chosen])
        changed = inputs[chosen]
        assert ((changed == MASK_ID) | ((changed >= LOW) & (changed < HIGH))).all()


def test_mlm_mask_masks_at_least_one_and_nothing_without_candidates():
    ids, maskable = sequence(4)  # 2 maskable: round(0.15 * 2) = 0 -> 1
    _, labels = mlm_mask(ids, maskable, 0.15, MASK_ID, LOW, HIGH, sample_generator(0, 0, 0, 0))
    assert (labels != -100).sum() == 1
    inputs, labels = mlm_mask(ids[[0, -1]], maskable[[0, -1]], 0.15, MASK_ID, LOW, HIGH, sample_generator(0, 0, 0, 0))
    assert (labels == -100).all() and torch.equal(inputs, ids[[0, -1]])


def test_mlm_mask_80_10_10_over_many_draws():
    ids, maskable = sequence(102)
    counts = {"mask": 0, "random": 0, "kept": 0}
    for index in range(1000):
        inputs, labels = mlm_mask(ids, maskable, 0.5, MASK_ID, LOW, HIGH, sample_generator(3, 0, 0, index))
        chosen = labels != -100
        new, old = inputs[chosen], ids[chosen]
        counts["mask"] += int((new == MASK_ID).sum())
        counts["kept"] += int((new == old).sum())
        counts["random"] += int(((new != MASK_ID) & (new != old)).sum())
    total = sum(counts.values())
    assert total == 1000 * 50
    # a random id equals the original with probability 1/995: "kept" is 0.1 + 0.1/995
    assert counts["mask"] / total == pytest.approx(0.8, abs=0.006)
    assert counts["random"] / total == pytest.approx(0.1, abs=0.004)
    assert counts["kept"] / total == pytest.approx(0.1, abs=0.004)


def test_mlm_mask_rejects_bad_arguments():
    ids, maskable = sequence(10)
    gen = sample_generator(0, 0, 0, 0)
    with pytest.raises(ValueError, match="mask prob must be in"):
        mlm_mask(ids, maskable, 0.0, MASK_ID, LOW, HIGH, gen)
    with pytest.raises(ValueError, match="maskable bool"):
        mlm_mask(ids, maskable.long(), 0.15, MASK_ID, LOW, HIGH, gen)
    with pytest.raises(ValueError, match=r"random-token range \[9, 9\) is empty"):
        mlm_mask(ids, maskable, 0.15, MASK_ID, 9, 9, gen)


@pytest.mark.parametrize("grid_h, grid_w", [(14, 14), (4, 4), (7, 5), (1, 9), (2, 2)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.75, 1.0])
def test_blockwise_mask_masks_exactly_the_requested_count(grid_h, grid_w, ratio):
    for index in range(10):
        mask = blockwise_mask(grid_h, grid_w, ratio, sample_generator(0, 0, 0, index))
        assert mask.dtype == torch.bool and mask.shape == (grid_h * grid_w,)
        assert int(mask.sum()) == round(ratio * grid_h * grid_w)


def test_blockwise_mask_is_blocky_and_deterministic():
    neighbours_masked, masks = [], []
    for index in range(100):
        mask = blockwise_mask(14, 14, 0.4, sample_generator(5, 0, 0, index)).view(14, 14)
        masks.append(mask)
        padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
        touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        neighbours_masked.append((touching & mask).sum() / mask.sum())
    # blocks: nearly every masked patch has a masked 4-neighbour; an i.i.d. 40% mask gives ~1 - 0.6^4 = 0.87
    assert torch.stack(neighbours_masked).mean() > 0.97
    random_mask = torch.rand(14, 14, generator=torch.Generator().manual_seed(0)) < 0.4
    padded = torch.nn.functional.pad(random_mask, (1, 1, 1, 1))
    touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (touching & random_mask).sum() / random_mask.sum() < 0.97
    assert torch.equal(blockwise_mask(14, 14, 0.4, sample_generator(5, 0, 0, 7)).view(14, 14), masks[7])
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 100


def test_blockwise_mask_rejects_bad_arguments():
    gen = sample_generator(0, 0, 0, 0)
    with pytest.raises(ValueError, match="patch grid must be positive, got 0x4"):
        blockwise_mask(0, 4, 0.4, gen)
    with pytest.raises(ValueError, match="mask ratio must be in"):
        blockwise_mask(4, 4, 1.5, gen)
