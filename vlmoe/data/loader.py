"""Step-indexed batches: the data position of a run is its step, nothing else.

Micro-batch ``i`` of rank ``r`` holds, for each subset (images, texts, pairs), the samples
at positions ``[i * G + r * b, i * G + (r + 1) * b)`` of an endless stream made of one
seeded permutation of the subset per epoch (b = per-rank batch, G = b * world size).
Masks are drawn from (seed, step, rank, index) by the collator. A resumed run therefore
reads exactly the samples and masks the uninterrupted run would have read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from vlmoe.config import UsageError
from vlmoe.data.layout import MANIFEST_FILE
from vlmoe.data.masking import sample_generator
from vlmoe.data.visual_tokenizer import KMEANS_FILE, SPEC_FILE, prepared_visual_tokenizer_file

# subset key in a batch -> directory written by `vlmoe prepare`
SUBSET_DIRS = {"image": "images", "text": "texts", "pair": "pairs"}
TEXT_TOKENIZER_FILE = "text_tokenizer.model"


class DataDirError(UsageError):
    """A prepared-data directory that cannot feed this run; the message names the path."""


def check_data_dir(data_dir: str | os.PathLike, subsets: list[str]) -> Path:
    """Fail before training if a needed dataset or tokenizer file is missing."""
    root = Path(data_dir)
    hint = "run `vlmoe prepare` first (or set data.dir)"
    if not root.is_dir():
        raise DataDirError(f"data directory '{root}' does not exist: {hint}")
    if not (root / MANIFEST_FILE).is_file():
        if (root / SUBSET_DIRS[subsets[0]]).is_dir():
            raise DataDirError(f"'{root}' was prepared by an older vlmoe (no {MANIFEST_FILE}): run `vlmoe prepare` again")
        raise DataDirError(f"'{root / MANIFEST_FILE}' is missing from the prepared data: {hint}")
    if not (root / TEXT_TOKENIZER_FILE).exists():
        raise DataDirError(f"'{root / TEXT_TOKENIZER_FILE}' is missing from the prepared data: {hint}")
    if ("image" in subsets or "pair" in subsets) and prepared_visual_tokenizer_file(root) is None:
        raise DataDirError(f"'{root}' has no visual tokenizer ({KMEANS_FILE} or {SPEC_FILE}): {hint}")
    return root


def prepared_image_side(root: Path) -> Optional[int]:
    """The long side the prepared images were capped at (None: not recorded, an older prepare)."""
    report = root / "prepare_report.json"
    if not report.is_file():
        return None
    return json.loads(report.read_text(encoding="utf-8")).get("max_image_side") or None


class _EpochPermutations:
    """``position -> dataset index`` through one seeded permutation per epoch."""

    def __init__(self, size: int, seed: int, salt: str):
        if size == 0:
            raise DataDirError(f"dataset subset '{salt}' is empty")
        self.size, self.seed, self.salt = size, seed, salt
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            gen = sample_generator(self.seed, epoch, 0, 0, salt="epoch/" + self.salt)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return int(self._perm[offset])


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is this rank's collated micro-batch number ``i`` (map-style, so a
    DataLoader with workers prefetches it and resuming is just starting at another index).

    ``load_example(subset, dataset, index) -> dict`` turns a stored row into a collator
    example; ``collate(examples, step, rank) -> batch``.
    """

    def __init__(self, datasets: dict, batch_sizes: dict[str, int], *, rank: int, world_size: int, seed: int,
                 load_example: Callable, collate: Callable, length: Optional[int] = None):
        self.datasets = {k: v for k, v in datasets.items() if batch_sizes.get(k, 0) > 0}
        self.batch_sizes = batch_sizes
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.load_example, self.collate = load_example, collate
        self._orders = {k: _EpochPermutations(len(ds), seed, k) for k, ds in self.datasets.items()}
        # length None: one pass over the data in stored order, every example exactly once; the
        # last batches are filled up with examples marked {"valid": False}
        self.single_pass = length is None
        self.length = length if length is not None else max(
            -(-len(ds) // (self.batch_sizes[k] * world_size)) for k, ds in self.datasets.items())

    def __len__(self) -> int:
        return self.length

    def indices(self, subset: str, micro_step: int) -> list[int]:
        """Dataset rows of this rank's micro-batch; -1 past the end of a single pass."""
        b = self.batch_sizes[subset]
        start = micro_step * b * self.world_size + self.rank * b
        if self.single_pass:
            size = len(self.datasets[subset])
            return [p if p < size else -1 for p in range(start, start + b)]
        return [self._orders[subset](p) for p in range(start, start + b)]

    def __getitem__(self, micro_step: int) -> dict:
        examples = {}
        for subset, ds in self.datasets.items():
            idx = self.indices(subset, micro_step)
            rows = ds[[max(i, 0) for i in idx]]  # one columnar read per subset
            examples[subset] = [{**self.load_example(subset, {k: v[j] for k, v in rows.items()}), "valid": i >= 0}
                                for j, i in enumerate(idx)]
        return self.collate(examples, micro_step, self.rank)


def iterate(batches: StepBatches, start: int, num_workers: int) -> Iterator[dict]:
    """Batches ``start, start + 1, ...`` in order, prefetched by ``num_workers`` processes."""
    sampler = range(start, len(batches))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=num_workers,
                                         persistent_workers=False, prefetch_factor=2 if num_workers else None)
    return iter(loader)


def to_device(batch: dict, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> dict:
    """Move a nested batch to ``device``; floating tensors are cast to ``float_dtype``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = to_device(value, device, float_dtype)
        elif isinstance(value, torch.Tensor):
            if float_dtype is not None and value.is_floating_point():
                value = value.to(float_dtype)
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out
