"""`prepare`: turn data sources into Arrow datasets on disk plus the two tokenizers.

Output layout (out_dir; see vlmoe/data/layout.py):
    parts/<source>/<chunk>/         one unit: <subset>-<split>.arrow files and unit.json
    manifest.json                   the files of each subset and split, in order
        images  {image: Image, label: int64, label_name, source}
        pairs   {image: Image, text, label_name, source}
        texts   {text, source}
    text_tokenizer.model            SentencePiece, trained on (a bounded sample of) train texts + captions
    visual_tokenizer.safetensors    k-means codebook, fitted on a bounded sample of train images, or
    visual_tokenizer.json           the spec of a plug-in tokenizer ("python:module:factory")
    prepare_report.json             records per source and split, skips, tokenizers, throughput

Every source is read in units of `records_per_unit` records (vlmoe/data/prepare_units.py), in
parallel worker processes, each unit written as it is read: memory does not grow with the data.
A finished unit is kept: an interrupted prepare resumes, adding a source does not reread the
others, and on a cluster each node writes its share (`--shard i/N`) before one `--merge` fits
the tokenizers. `label` is local to its source (-1 for unlabelled JSONL images); `label_name`
says what it means ("" where unknown). Images are stored RGB (alpha composited on white), their
long side capped at `max_image_side` (default 8/7 of the training size: 256 for 224), as JPEG
(quality 95) where the source image was a JPEG, else PNG.

The train/validation split hashes (source, item group): a record's `group` where its source
gives one (one image's caption lines, an emoji's skin-tone variants), else its key; an item
keeps its split when other sources, `max_items` or `seed` change. `seed` only drives the
tokenizers' samples and the visual tokenizer's fit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from PIL import Image

from vlmoe.data.images import image_to_tensor
from vlmoe.data.layout import MANIFEST_FILE, PARTS_DIR, SPLITS, SUBSETS, load_split, shard_name
from vlmoe.data.prepare_units import UNIT_FILE, UnitResult, UnitSpec, run_unit, source_slug, unit_dir
from vlmoe.data.sources import DataError, SkipCounter, open_source, source_partitions
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.data.visual_tokenizer import (
    KMEANS_FILE,
    SPEC_FILE,
    KMeansVisualTokenizer,
    VisualTokenizer,
    load_visual_tokenizer,
    save_spec,
)

TEXT_TOKENIZER_FILE = "text_tokenizer.model"
REPORT_FILE = "prepare_report.json"
KMEANS_ITERS = 20

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
    max_image_side: int = 0
    # units, units written by this call, images written, workers, seconds, images/s
    throughput: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines: counts per subset and source, skips, tokenizers."""
        lines = [f"prepared {self.out_dir} in {self.seconds:.1f}s"]
        t = self.throughput
        if t:
            lines.append(f"  units: {t['units']} ({t['units_written']} written now, {t['images_written']} images at "
                         f"{t['images_per_s']:.0f} images/s on {t['workers']} worker(s)); images stored at most "
                         f"{self.max_image_side} px")
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



def default_max_image_side(image_size: int) -> int:
    """Stored long side for a training size: 8/7 of it (256 for 224), room for random crops."""
    return math.ceil(image_size * 8 / 7)


@dataclass(frozen=True)
class Shard:
    """This node's share of a multi-node prepare: chunks c with c % count == index."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """"i/N", or "auto": the launcher's rank (SLURM_PROCID / SLURM_NTASKS, RANK / WORLD_SIZE)."""
        if text == "auto":
            for rank, size in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
                if rank in os.environ and size in os.environ:
                    return cls.parse(f"{os.environ[rank]}/{os.environ[size]}")
            return cls()
        index, sep, count = text.partition("/")
        if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise DataError(f"--shard {text!r}: expected i/N with 0 <= i < N (e.g. 0/4), or auto")
        return cls(int(index), int(count))


def _source_units(sources: list[SourceSpec], val_fraction: float, max_image_side: int, chunk_size: int,
                  ) -> list[UnitSpec]:
    """The first unit (chunk 0) of each configured source, or of each of its partitions (the
    shards of a webdataset, read on their own: no unit reads the shards before its own); later
    chunks differ only in ``chunk``. A source capped by max_items is read as one stream (its
    first records)."""
    firsts = []
    for spec in sources:
        partitions = source_partitions(spec.name, spec.path) if spec.max_items is None else None
        for partition in partitions or [None]:
            slug = source_slug(spec.name, spec.path, spec.max_items, val_fraction, max_image_side, chunk_size, partition)
            firsts.append(UnitSpec(source=spec.name, path=spec.path, max_items=spec.max_items, slug=slug, chunk=0,
                                   chunk_size=chunk_size, val_fraction=val_fraction, max_image_side=max_image_side,
                                   partition=partition))
    return firsts


def _ends_source(spec: UnitSpec, result: UnitResult) -> bool:
    return result.records < spec.stop - spec.start or spec.stop == spec.max_items


def _last_chunk(spec: UnitSpec) -> Optional[int]:
    """The last chunk of a source with max_items (known in advance), else None."""
    return None if spec.max_items is None else max(0, (spec.max_items - 1) // spec.chunk_size)


def run_units(root: Path, firsts: list[UnitSpec], shard: Shard, num_workers: int) -> dict[str, dict[int, UnitResult]]:
    """Run this shard's units of every source ({slug: {chunk: result}}), on ``num_workers``
    processes; a source's chunks are taken until one comes back short (the source ended).
    Finished units are read back, not redone."""
    results: dict[str, dict[int, UnitResult]] = {first.slug: {} for first in firsts}
    last = {first.slug: _last_chunk(first) for first in firsts}
    next_chunk = {first.slug: shard.index for first in firsts}

    def next_unit() -> Optional[UnitSpec]:
        for first in firsts:
            chunk = next_chunk[first.slug]
            if last[first.slug] is None or chunk <= last[first.slug]:
                next_chunk[first.slug] = chunk + shard.count
                return dataclasses.replace(first, chunk=chunk)
        return None

    def record(spec: UnitSpec, result: UnitResult) -> None:
        results[spec.slug][spec.chunk] = result
        if _ends_source(spec, result):
            last[spec.slug] = min(spec.chunk, last[spec.slug] if last[spec.slug] is not None else spec.chunk)

    if num_workers <= 1:
        while (spec := next_unit()) is not None:
            record(spec, run_unit(root, spec))
        return results
    # Workers start fresh interpreters (spawn): no state of this process (torch's thread pools) is inherited.
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Any, UnitSpec] = {}
        while True:
            while len(pending) < 2 * num_workers and (spec := next_unit()) is not None:
                pending[pool.submit(run_unit, root, spec)] = spec
            if not pending:
                return results
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                record(pending.pop(future), future.result())


def _completed(firsts: list[UnitSpec], results: dict[str, dict[int, UnitResult]], root: Path
               ) -> dict[str, list[UnitResult]]:
    """Every source's units in order, up to the one that ended it, read from disk where another
    shard wrote them; a missing unit is an error naming it."""
    out = {}
    for first in firsts:
        units: list[UnitResult] = []
        for chunk in itertools.count():
            spec = dataclasses.replace(first, chunk=chunk)
            result = results[first.slug].get(chunk)
            if result is None:
                if not (unit_dir(root, spec) / UNIT_FILE).is_file():
                    raise DataError(f"source {first.source!r}: unit {chunk} ({unit_dir(root, spec)}) is not prepared; "
                                    f"run `vlmoe prepare` with --shard i/N for every i first")
                result = run_unit(root, spec)  # reads the finished unit back
            units.append(result)
            if _ends_source(spec, result):
                break
        out[first.slug] = units
    return out


def _manifest(root: Path, firsts: list[UnitSpec], units: dict[str, list[UnitResult]]) -> dict:
    files: dict[str, dict[str, list[str]]] = {subset: {split: [] for split in SPLITS} for subset in SUBSETS}
    for first in firsts:
        for chunk, result in enumerate(units[first.slug]):
            directory = unit_dir(root, dataclasses.replace(first, chunk=chunk)).relative_to(root)
            for subset in SUBSETS:
                for split in SPLITS:
                    if result.rows[subset][split]:
                        files[subset][split].append(str(directory / shard_name(subset, split)))
    return {"subsets": files, "units": {first.slug: len(units[first.slug]) for first in firsts}}


def _remove_stale_units(root: Path, firsts: list[UnitSpec]) -> None:
    """Units of sources (or settings) no longer configured, and units a killed worker left
    half-written: not part of the data, only disk. Called once every unit is done."""
    keep = {first.slug for first in firsts}
    for directory in (root / PARTS_DIR).iterdir():
        if directory.name not in keep:
            shutil.rmtree(directory, ignore_errors=True)
            continue
        for torn in directory.glob("*.tmp-*"):
            shutil.rmtree(torn, ignore_errors=True)


def _priority(seed: int, *key: Any) -> int:
    """A deterministic pseudo-random rank: the sample of the smallest ranks is the same on any run."""
    return int.from_bytes(hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest(), "big")


def _fit_texts(root: Path, count: int, seed: int) -> list[str]:
    """Up to ``count`` train texts and captions (all, when there are fewer), a deterministic sample
    in data order: the text tokenizer's corpus, bounded whatever the data's size."""
    parts = [load_split(root, subset, "train").select_columns(["text"]) for subset in ("texts", "pairs")]
    total = sum(len(part) for part in parts)
    if total <= count:
        chosen = range(total)
    else:
        chosen = sorted(heapq.nsmallest(count, range(total), key=lambda i: _priority(seed, "text", i)))
    texts, offset = [], 0
    for part in parts:
        local = [i - offset for i in chosen if offset <= i < offset + len(part)]
        texts.extend(part.select(local)["text"] if local else [])
        offset += len(part)
    return texts


def _fit_images(root: Path, count: int, seed: int) -> list[bytes]:
    """Up to ``count`` stored train images (images + pairs) for the visual codebook: per source the
    smallest ranks, taken round-robin over sources so that a large source (Fashion-MNIST) does not
    crowd out the others. Memory: ``count`` images per source."""
    per_source: dict[str, list[tuple[int, str, int]]] = {}
    for subset in ("images", "pairs"):
        for start, batch in _batches(load_split(root, subset, "train").select_columns(["source"])):
            for offset, source in enumerate(batch["source"]):
                rank = (_priority(seed, "image", subset, start + offset), subset, start + offset)
                heap = per_source.setdefault(source, [])
                if len(heap) < count:
                    heapq.heappush(heap, (-rank[0], subset, start + offset))
                elif -heap[0][0] > rank[0]:
                    heapq.heapreplace(heap, (-rank[0], subset, start + offset))
    ordered = [sorted(heap, key=lambda item: -item[0]) for _, heap in sorted(per_source.items())]
    picked = [item for group in itertools.zip_longest(*ordered) for item in group if item is not None][:count]
    images = {subset: load_split(root, subset, "train").cast_column("image", datasets.Image(decode=False))
              for subset in ("images", "pairs")}
    return [images[subset][index]["image"]["bytes"] for _, subset, index in picked]


def _batches(dataset: datasets.Dataset, size: int = 65536):
    for start in range(0, len(dataset), size):
        yield start, dataset[start:start + size]


def _merge_skips(units: dict[str, list[UnitResult]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for results in units.values():
        for result in results:
            for reason, info in result.skipped.items():
                entry = merged.setdefault(reason, {"count": 0, "examples": []})
                entry["count"] += info["count"]
                entry["examples"] = (entry["examples"] + info["examples"])[:SkipCounter.max_examples]
    return dict(sorted(merged.items()))


def prepare(out_dir: str | Path, sources: list[SourceSpec] | None = None, *, val_fraction: float = 0.05,
            seed: int = 0, text_vocab_size: int = 2000, image_size: int = 32, patch_size: int = 8,
            codebook_size: int = 256, tokenizer_fit_images: int = 2000, tokenizer_fit_texts: int = 1_000_000,
            visual_tokenizer: str = "kmeans", max_image_side: Optional[int] = None, num_workers: int = 1,
            records_per_unit: int = 10_000, shard: Shard = Shard(), merge_only: bool = False,
            verbose: bool = True) -> Optional[PrepareReport]:
    """Read `sources` (default `DEFAULT_SOURCES`), write datasets and tokenizers to `out_dir`.

    The records of each source are written in units of ``records_per_unit`` by ``num_workers``
    processes, in memory that does not grow with the data; finished units are kept, so an
    interrupted prepare resumes, and adding a source does not reread the others. Images are
    stored with their long side capped at ``max_image_side`` (None: ``default_max_image_side``).
    ``shard`` i/N writes only this node's units and returns None; then one ``merge_only`` call
    (or a run without a shard) fits the tokenizers on a bounded deterministic sample of the
    written data (``tokenizer_fit_texts`` texts, ``tokenizer_fit_images`` images) and writes the
    manifest and the report.
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
    max_image_side = default_max_image_side(image_size) if max_image_side is None else max_image_side
    if max_image_side < image_size:
        raise DataError(f"config key 'prepare.max_image_side' is {max_image_side}, below the model's image_size "
                        f"{image_size}: the stored images would be upscaled")
    plugin = None if visual_tokenizer == "kmeans" else _plugin_tokenizer(visual_tokenizer, patch_size)
    for spec in sources:  # a missing path or an unknown source fails here, before anything is written
        open_source(spec.name, spec.path, SkipCounter())
    out_dir = Path(out_dir)
    firsts = _source_units(sources, val_fraction, max_image_side, records_per_unit)
    if not merge_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        results = run_units(out_dir, firsts, shard, num_workers)
    else:
        results = {first.slug: {} for first in firsts}
    units_seconds = time.perf_counter() - started
    written = sum(r.images for by_chunk in results.values() for r in by_chunk.values() if not r.reused)
    if shard.count > 1 and not merge_only:
        if verbose:
            print(f"prepared shard {shard.index}/{shard.count} of {out_dir}: {written} images in {units_seconds:.1f}s; "
                  f"when every shard is done, run the same command with --merge", flush=True)
        return None
    units = _completed(firsts, results, out_dir)
    counts = {subset: {split: sum(r.rows[subset][split] for rs in units.values() for r in rs) for split in SPLITS}
              for subset in SUBSETS}
    train_images = counts["images"]["train"] + counts["pairs"]["train"]
    if counts["texts"]["train"] + counts["pairs"]["train"] == 0:
        raise DataError("no train text or caption to train the text tokenizer on; add a text source")
    patches_per_image = (image_size // patch_size) ** 2
    if plugin is None and min(train_images, tokenizer_fit_images) * patches_per_image < codebook_size:
        raise DataError(f"{min(train_images, tokenizer_fit_images)} train image(s) give too few patches for a "
                        f"visual codebook of {codebook_size}; add an image source or lower codebook_size")
    _write_json(out_dir / MANIFEST_FILE, _manifest(out_dir, firsts, units))
    _remove_stale_units(out_dir, firsts)

    train_texts = _fit_texts(out_dir, tokenizer_fit_texts, seed)
    text_tokenizer = TextTokenizer.train(train_texts, text_vocab_size, out_dir / TEXT_TOKENIZER_FILE)
    if plugin is None:
        fit_pngs = _fit_images(out_dir, tokenizer_fit_images, seed)
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

    records: dict[str, dict[str, int]] = {}
    for first in firsts:
        for result in units[first.slug]:
            for split, count in result.splits.items():
                per_source = records.setdefault(_source_label(first), {s: 0 for s in SPLITS})
                per_source[split] += count
    report = PrepareReport(
        out_dir=str(out_dir),
        records=records,
        subsets=counts,
        skipped=_merge_skips(units),
        text_tokenizer={"path": str(out_dir / TEXT_TOKENIZER_FILE), "requested_vocab_size": text_vocab_size,
                        "vocab_size": text_tokenizer.vocab_size, "pad_id": text_tokenizer.pad_id,
                        "cls_id": text_tokenizer.cls_id, "sep_id": text_tokenizer.sep_id,
                        "mask_id": text_tokenizer.mask_id, "train_texts": len(train_texts)},
        visual_tokenizer={**visual, "image_size": image_size, "patch_size": patch_size},
        sources=[asdict(spec) for spec in sources],
        val_fraction=val_fraction,
        seed=seed,
        max_image_side=max_image_side,
        throughput={"units": sum(len(rs) for rs in units.values()),
                    "units_written": sum(not r.reused for rs in units.values() for r in rs),
                    "images_written": written, "workers": num_workers, "seconds": round(units_seconds, 2),
                    "images_per_s": round(written / units_seconds, 1) if units_seconds > 0 else 0.0},
    )
    if text_tokenizer.vocab_size < text_vocab_size:
        report.notes.append(f"text corpus too small for vocab {text_vocab_size}: "
                            f"SentencePiece made {text_tokenizer.vocab_size} pieces; models must use that size")
    report.seconds = round(time.perf_counter() - started, 2)
    _write_json(out_dir / REPORT_FILE, report.to_dict())
    if verbose:
        print(report.summary())
    return report


def _source_label(first: UnitSpec) -> str:
    return first.source if first.path is None else f"{first.source}:{Path(first.path).name}"


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
