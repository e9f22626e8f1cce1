"""`prepare`: turn data sources into Hugging Face datasets on disk plus the two tokenizers.

Output layout (out_dir):
    images/   DatasetDict train/validation {image: Image, label: int64, label_name, source}
    pairs/    DatasetDict train/validation {image: Image, text, label_name, source}
    texts/    DatasetDict train/validation {text, source}
    text_tokenizer.model            SentencePiece, trained on train texts + train captions
    visual_tokenizer.safetensors    k-means codebook, fitted on train images + pair images, or
    visual_tokenizer.json           the spec of a plug-in tokenizer ("python:module:factory")
    prepare_report.json             records per source and split, skips, tokenizer settings

A subset with no records is still written, with its schema and zero rows, so that every
consumer can load all three. `label` is local to its source (-1 for unlabelled JSONL images);
`label_name` says what it means ("" where unknown). Images are stored RGB (alpha composited
on white), at most 224 px on the long side, as PNG.

The train/validation split hashes (source, item group): a record's `group` where its source
gives one (one image's caption lines, an emoji's skin-tone variants), else its key; an item
keeps its split when other sources, `max_items` or `seed` change. `seed` only drives the visual tokenizer's fit.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from vlmoe.data.images import encode_png, image_to_tensor
from vlmoe.data.sources import DataError, Record, SkipCounter, open_source
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.data.visual_tokenizer import (
    KMEANS_FILE,
    SPEC_FILE,
    KMeansVisualTokenizer,
    VisualTokenizer,
    load_visual_tokenizer,
    save_spec,
)

SPLITS = ("train", "validation")
SUBSETS = ("images", "pairs", "texts")
TEXT_TOKENIZER_FILE = "text_tokenizer.model"
REPORT_FILE = "prepare_report.json"
KMEANS_ITERS = 20

_IMAGE = datasets.Image()
FEATURES = {
    "images": datasets.Features({"image": _IMAGE, "label": datasets.Value("int64"),
                                 "label_name": datasets.Value("string"), "source": datasets.Value("string")}),
    "pairs": datasets.Features({"image": _IMAGE, "text": datasets.Value("string"),
                                "label_name": datasets.Value("string"), "source": datasets.Value("string")}),
    "texts": datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")}),
}


@dataclass
class SourceSpec:
    """One source to prepare: a name from `vlmoe.data.sources.SOURCE_NAMES`, an optional
    path (None: the installed default; required for jsonl/image_folder/text_files) and an
    optional cap on the number of records taken (the first ones, in the source's order)."""

    name: str
    path: str | None = None
    max_items: int | None = None


DEFAULT_SOURCES = [
    SourceSpec("fashion_mnist"),
    SourceSpec("tuxpaint_stamps"),
    SourceSpec("noto_emoji"),
    SourceSpec("wordnet"),
    SourceSpec("shakespeare"),
]


@dataclass
class PrepareReport:
    """What `prepare` wrote; `records` is {source: {split: count}}, `subsets` {subset: {split: count}},
    `skipped` {reason: {"count", "examples"}}."""

    out_dir: str
    records: dict[str, dict[str, int]]
    subsets: dict[str, dict[str, int]]
    skipped: dict[str, dict[str, Any]]
    text_tokenizer: dict[str, Any]
    visual_tokenizer: dict[str, Any]
    sources: list[dict[str, Any]]
    seconds: float = 0.0
    val_fraction: float = 0.0
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines: counts per subset and source, skips, tokenizers."""
        lines = [f"prepared {self.out_dir} in {self.seconds:.1f}s"]
        for subset, counts in self.subsets.items():
            lines.append(f"  {subset:7s} train {counts['train']:7d}  validation {counts['validation']:6d}")
        for source, counts in self.records.items():
            lines.append(f"  source {source}: train {counts['train']}, validation {counts['validation']}")
        total_skipped = sum(v["count"] for v in self.skipped.values())
        lines.append(f"  skipped {total_skipped} item(s)" + (":" if total_skipped else ""))
        for reason, info in self.skipped.items():
            lines.append(f"    {info['count']:6d}  {reason}  (e.g. {info['examples'][0]})")
        lines.append(f"  text tokenizer: vocab {self.text_tokenizer['vocab_size']} "
                     f"(asked {self.text_tokenizer['requested_vocab_size']})")
        visual = self.visual_tokenizer
        origin = f"fitted on {visual['fit_images']} images" if visual["kind"] == "kmeans" else visual["spec"]
        lines.append(f"  visual tokenizer: {visual['codebook_size']} codes, {visual['image_size']}px images, "
                     f"patch {visual['patch_size']}, {origin}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def split_of(source: str, key: str, val_fraction: float) -> str:
    """'validation' for a stable hash fraction of items, else 'train' (same answer on every run)."""
    digest = hashlib.sha256(f"{source}\x00{key}".encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _row(record: Record) -> tuple[str, dict[str, Any]]:
    """(subset, stored row) for a source record."""
    if "image" in record and "text" in record:
        return "pairs", {"image": encode_png(record["image"]), "text": record["text"],
                         "label_name": record["label_name"], "source": record["source"]}
    if "image" in record:
        return "images", {"image": encode_png(record["image"]), "label": record["label"],
                          "label_name": record["label_name"], "source": record["source"]}
    return "texts", {"text": record["text"], "source": record["source"]}


def _check_settings(sources: list[SourceSpec], val_fraction: float, text_vocab_size: int, image_size: int,
                    patch_size: int, codebook_size: int, tokenizer_fit_images: int) -> None:
    if not sources:
        raise DataError("no data sources given")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size:
        raise DataError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    if codebook_size < 2 or text_vocab_size < 16 or tokenizer_fit_images < 1:
        raise DataError(f"bad tokenizer settings: codebook_size={codebook_size} (>= 2), "
                        f"text_vocab_size={text_vocab_size} (>= 16), tokenizer_fit_images={tokenizer_fit_images} (>= 1)")
    for spec in sources:
        if spec.max_items is not None and spec.max_items < 0:
            raise DataError(f"source {spec.name!r}: max_items must be >= 0, got {spec.max_items}")


def _plugin_tokenizer(spec: str, patch_size: int) -> VisualTokenizer:
    """The user's tokenizer named by ``spec`` ("python:module:factory"), checked before any work."""
    try:
        tokenizer = load_visual_tokenizer(spec)
    except ValueError as exc:
        raise DataError(f"config key 'prepare.visual_tokenizer': {exc}") from exc
    if tokenizer.patch_size != patch_size:
        raise DataError(f"config key 'prepare.visual_tokenizer': {spec} tokenizes {tokenizer.patch_size}-pixel "
                        f"patches but the model's patch_size is {patch_size}")
    return tokenizer


def _fit_image_choice(rows: dict[str, dict[str, list]], count: int, seed: int) -> list[bytes]:
    """PNGs of up to `count` train images (images + pairs), taken round-robin over sources so
    that a large source (Fashion-MNIST) does not crowd out the others; seeded order per source."""
    per_source: dict[str, list[bytes]] = {}
    for subset in ("images", "pairs"):
        for row in rows[subset]["train"]:
            per_source.setdefault(row["source"], []).append(row["image"])
    generator = torch.Generator().manual_seed(seed)
    shuffled = [[pngs[i] for i in torch.randperm(len(pngs), generator=generator).tolist()]
                for _, pngs in sorted(per_source.items())]
    interleaved = [png for group in itertools.zip_longest(*shuffled) for png in group if png is not None]
    return interleaved[:count]


def _save_subset(rows: dict[str, list[dict[str, Any]]], features: datasets.Features, path: Path) -> None:
    """Write one DatasetDict (train/validation) without the per-shard progress bars."""
    dataset = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({column: [row[column] for row in rows[split]] for column in features},
                                          features=features)
        for split in SPLITS
    })
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # An empty split needs one explicit (empty) shard: with none, load_from_disk fails.
        dataset.save_to_disk(str(path), num_shards={split: 1 for split in SPLITS if len(dataset[split]) == 0})
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


def prepare(out_dir: str | Path, sources: list[SourceSpec] | None = None, *, val_fraction: float = 0.05,
            seed: int = 0, text_vocab_size: int = 2000, image_size: int = 32, patch_size: int = 8,
            codebook_size: int = 256, tokenizer_fit_images: int = 2000, visual_tokenizer: str = "kmeans",
            verbose: bool = True) -> PrepareReport:
    """Read `sources` (default `DEFAULT_SOURCES`), write datasets and tokenizers to `out_dir`.

    ``visual_tokenizer``: "kmeans" fits a codebook of ``codebook_size`` on the train images;
    "python:module:factory" records that plug-in instead (its own codebook and patch size).
    Raises DataError (before anything is written) for an unknown source, a missing path, bad
    settings, a plug-in that does not load, or data without any train text or train image to
    fit the tokenizers on.
    """
    started = time.perf_counter()
    sources = list(DEFAULT_SOURCES if sources is None else sources)
    _check_settings(sources, val_fraction, text_vocab_size, image_size, patch_size, codebook_size,
                    tokenizer_fit_images)
    plugin = None if visual_tokenizer == "kmeans" else _plugin_tokenizer(visual_tokenizer, patch_size)
    skips = SkipCounter()
    iterators = [open_source(spec.name, spec.path, skips) for spec in sources]

    rows: dict[str, dict[str, list]] = {subset: {split: [] for split in SPLITS} for subset in SUBSETS}
    records: dict[str, dict[str, int]] = {}
    for spec, iterator in zip(sources, iterators):
        for record in itertools.islice(iterator, spec.max_items):
            split = split_of(record["source"], record.get("group", record["key"]), val_fraction)
            subset, row = _row(record)
            rows[subset][split].append(row)
            counts = records.setdefault(record["source"], {s: 0 for s in SPLITS})
            counts[split] += 1

    train_texts = [r["text"] for r in rows["texts"]["train"]] + [r["text"] for r in rows["pairs"]["train"]]
    train_images = len(rows["images"]["train"]) + len(rows["pairs"]["train"])
    if not train_texts:
        raise DataError("no train text or caption to train the text tokenizer on; add a text source")
    patches_per_image = (image_size // patch_size) ** 2
    if plugin is None and min(train_images, tokenizer_fit_images) * patches_per_image < codebook_size:
        raise DataError(f"{min(train_images, tokenizer_fit_images)} train image(s) give too few patches for a "
                        f"visual codebook of {codebook_size}; add an image source or lower codebook_size")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for subset in SUBSETS:
        _save_subset(rows[subset], FEATURES[subset], out_dir / subset)

    text_tokenizer = TextTokenizer.train(train_texts, text_vocab_size, out_dir / TEXT_TOKENIZER_FILE)
    if plugin is None:
        fit_pngs = _fit_image_choice(rows, tokenizer_fit_images, seed)
        fit_pixels = torch.stack([image_to_tensor(Image.open(io.BytesIO(png)), image_size) for png in fit_pngs])
        kmeans = KMeansVisualTokenizer.fit(fit_pixels, patch_size, codebook_size, seed, KMEANS_ITERS)
        kmeans.save(out_dir / KMEANS_FILE)
        (out_dir / SPEC_FILE).unlink(missing_ok=True)  # a data dir prepared before with a plug-in
        visual = {"path": str(out_dir / KMEANS_FILE), "kind": "kmeans", "codebook_size": codebook_size,
                  "fit_images": len(fit_pngs), "kmeans_iters": KMEANS_ITERS, "seed": seed}
    else:
        save_spec(out_dir / SPEC_FILE, visual_tokenizer)
        (out_dir / KMEANS_FILE).unlink(missing_ok=True)
        visual = {"path": str(out_dir / SPEC_FILE), "kind": "python", "spec": visual_tokenizer,
                  "codebook_size": plugin.codebook_size}

    report = PrepareReport(
        out_dir=str(out_dir),
        records=records,
        subsets={subset: {split: len(rows[subset][split]) for split in SPLITS} for subset in SUBSETS},
        skipped=skips.as_dict(),
        text_tokenizer={"path": str(out_dir / TEXT_TOKENIZER_FILE), "requested_vocab_size": text_vocab_size,
                        "vocab_size": text_tokenizer.vocab_size, "pad_id": text_tokenizer.pad_id,
                        "cls_id": text_tokenizer.cls_id, "sep_id": text_tokenizer.sep_id,
                        "mask_id": text_tokenizer.mask_id, "train_texts": len(train_texts)},
        visual_tokenizer={**visual, "image_size": image_size, "patch_size": patch_size},
        sources=[asdict(spec) for spec in sources],
        val_fraction=val_fraction,
        seed=seed,
    )
    if text_tokenizer.vocab_size < text_vocab_size:
        report.notes.append(f"text corpus too small for vocab {text_vocab_size}: "
                            f"SentencePiece made {text_tokenizer.vocab_size} pieces; models must use that size")
    report.seconds = round(time.perf_counter() - started, 2)
    (out_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if verbose:
        print(report.summary())
    return report
