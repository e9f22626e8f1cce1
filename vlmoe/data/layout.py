"""The on-disk layout of prepared data: Arrow shards listed by a manifest.

``vlmoe prepare`` writes every (source, chunk of records) unit as its own Arrow files,
``parts/<source>/<chunk>/<subset>-<split>.arrow``, and ``manifest.json`` lists them per subset
and split in a fixed order (sources as configured, then chunks). A split is the concatenation
of its files, memory-mapped: nothing is copied and nothing is held in memory, whatever the size.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

SPLITS = ("train", "validation")
SUBSETS = ("images", "pairs", "texts")
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"

_IMAGE = datasets.Image()
FEATURES = {
    "images": datasets.Features({"image": _IMAGE, "label": datasets.Value("int64"),
                                 "label_name": datasets.Value("string"), "source": datasets.Value("string")}),
    "pairs": datasets.Features({"image": _IMAGE, "text": datasets.Value("string"),
                                "label_name": datasets.Value("string"), "source": datasets.Value("string")}),
    "texts": datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")}),
}


def shard_name(subset: str, split: str) -> str:
    return f"{subset}-{split}.arrow"


def read_manifest(root: Path) -> dict:
    """{"subsets": {subset: {split: [file relative to root, ...]}}, ...}; FileNotFoundError if absent."""
    return json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))


def load_split(root: Path, subset: str, split: str) -> datasets.Dataset:
    """One subset's split of prepared data, memory-mapped (an empty Dataset with the subset's
    columns where it has no rows)."""
    files = read_manifest(root)["subsets"][subset][split]
    if not files:
        return datasets.Dataset.from_dict({column: [] for column in FEATURES[subset]}, features=FEATURES[subset])
    parts = [datasets.Dataset.from_file(str(root / name)) for name in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
