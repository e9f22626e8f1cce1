"""Masking for masked data modeling: BERT-style text masking and BEiT block-wise patch masking.

All functions are pure: randomness comes only from the torch.Generator passed in, and
`sample_generator` derives that generator from (seed, step, rank, index, salt), so a batch's
masks can be recomputed exactly on resume and differ across ranks and positions.
"""
from __future__ import annotations

import hashlib
import math

import torch

IGNORE_INDEX = -100
"""Label of a position that is not predicted (text MLM labels, padding rows of a batch)."""
_BLOCK_MIN_AREA = 16  # BEiT's smallest block, for 14x14 grids; capped by what is still to mask
_BLOCK_ASPECT = 0.3  # blocks have aspect ratio in [0.3, 1/0.3], log-uniform
_BLOCK_ATTEMPTS = 10  # consecutive block draws that add nothing before topping up patch by patch


def sample_generator(seed: int, step: int, rank: int, index: int, salt: str = "") -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, step, rank, index, salt) (not Python's hash())."""
    key = f"{int(seed)}|{int(step)}|{int(rank)}|{int(index)}|{salt}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def mlm_mask(ids: torch.Tensor, maskable: torch.Tensor, prob: float, mask_id: int, vocab_low: int, vocab_high: int,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of one sequence.

    ids Long [T]; maskable Bool [T] (False for special tokens and padding). round(prob * #maskable)
    positions (at least one when any is maskable) are chosen; each becomes [MASK] with probability
    0.8, a random id in [vocab_low, vocab_high) with 0.1, and stays with 0.1.
    Returns (inputs Long [T], labels Long [T]: original ids at chosen positions, -100 elsewhere).
    """
    if ids.dim() != 1 or maskable.shape != ids.shape or maskable.dtype != torch.bool:
        raise ValueError(f"ids must be [T] and maskable bool [T], got {tuple(ids.shape)} and {maskable.dtype} {tuple(maskable.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask prob must be in (0, 1], got {prob}")
    if not 0 <= vocab_low < vocab_high:
        raise ValueError(f"random-token range [{vocab_low}, {vocab_high}) is empty")
    candidates = maskable.nonzero().flatten()
    count = min(len(candidates), max(1, round(prob * len(candidates)))) if len(candidates) else 0
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[chosen] = ids[chosen]
    inputs = ids.clone()
    action = torch.rand(count, generator=gen)
    random_ids = torch.randint(vocab_low, vocab_high, (count,), generator=gen, dtype=ids.dtype)
    replaced = torch.where(action < 0.8, torch.full_like(random_ids, mask_id),
                           torch.where(action < 0.9, random_ids, ids[chosen]))
    inputs[chosen] = replaced
    return inputs, labels


def blockwise_mask(grid_h: int, grid_w: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """BEiT block-wise masking of a grid_h x grid_w patch grid -> Bool [grid_h * grid_w] (row-major).

    Rectangles of random area (at least min(16, remaining) patches) and log-uniform aspect ratio
    are added until exactly round(ratio * P) patches are masked; a block that would overshoot is
    redrawn, and if blocks keep failing the last few patches are grown next to masked ones.
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"patch grid must be positive, got {grid_h}x{grid_w}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    target = round(ratio * grid_h * grid_w)
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    count, failures = 0, 0
    while count < target and failures < _BLOCK_ATTEMPTS:
        remaining = target - count
        area = _uniform(gen, min(_BLOCK_MIN_AREA, remaining), remaining)
        aspect = math.exp(_uniform(gen, math.log(_BLOCK_ASPECT), -math.log(_BLOCK_ASPECT)))
        height = round(math.sqrt(area * aspect))
        width = round(math.sqrt(area / aspect))
        if 1 <= height <= grid_h and 1 <= width <= grid_w:
            top, left = _randint(gen, 0, grid_h - height + 1), _randint(gen, 0, grid_w - width + 1)
            block = mask[top:top + height, left:left + width]
            added = int((~block).sum())
            if 0 < added <= remaining:
                block.fill_(True)
                count += added
                failures = 0
                continue
        failures += 1
    for _ in range(target - count):
        _grow_by_one(mask, gen)
    return mask.flatten()


def _grow_by_one(mask: torch.Tensor, gen: torch.Generator) -> None:
    """Mask one more patch of mask [h, w], next to a masked one where possible (keeps blocks compact)."""
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    candidates = (touching & ~mask).flatten().nonzero().flatten()
    if len(candidates) == 0:
        candidates = (~mask).flatten().nonzero().flatten()
    mask.view(-1)[candidates[_randint(gen, 0, len(candidates))]] = True
