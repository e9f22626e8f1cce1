"""One unit of `vlmoe prepare`: a chunk of one source's records, opened, encoded and written.

A unit is records ``[chunk * size, (chunk + 1) * size)`` of a source, in the source's order
(and below its ``max_items``). Whoever runs it (the main process, a worker process, another
node) iterates the source from its start, passes the earlier records without opening their
images (a record's image is a lazy reference), and writes the unit's rows as Arrow files into
``parts/<source>/<chunk>/``, then ``unit.json`` with its counts and skips. The directory appears
at once (written under a temporary name, then renamed): a finished unit is never redone, an
interrupted one is redone from scratch. A unit's output depends only on the source, the chunk
and the settings: the same for any number of workers or nodes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from datasets.arrow_writer import ArrowWriter
from PIL import Image

from vlmoe.data.image_refs import SkipItem
from vlmoe.data.images import limit_size, to_rgb
from vlmoe.data.layout import FEATURES, PARTS_DIR, SPLITS, SUBSETS, shard_name
from vlmoe.data.sources import Record, SkipCounter, open_source

UNIT_FILE = "unit.json"
# bump when the stored rows change for the same source and settings (old units are then redone)
ENCODING_VERSION = 2
JPEG_QUALITY = 95
# rows an Arrow writer buffers before writing a record batch: bounds memory with large images
WRITER_BATCH_ROWS = 256


@dataclass(frozen=True)
class UnitSpec:
    """What a unit reads and how it writes: picklable, sent to worker processes."""

    source: str  # source name (vlmoe.data.sources)
    path: Optional[str]
    max_items: Optional[int]
    slug: str  # the directory of this source's units: name and a hash of everything above + settings
    chunk: int
    chunk_size: int
    val_fraction: float
    max_image_side: int
    partition: Optional[str] = None  # one independently readable part of the source (a webdataset shard)

    @property
    def start(self) -> int:
        return self.chunk * self.chunk_size

    @property
    def stop(self) -> int:
        stop = self.start + self.chunk_size
        return stop if self.max_items is None else min(stop, self.max_items)


def source_slug(name: str, path: Optional[str], max_items: Optional[int], val_fraction: float,
                max_image_side: int, chunk_size: int, partition: Optional[str] = None) -> str:
    """The directory name of one configured source's (or partition's) units: a change of any
    setting that changes its rows gives another directory, so units are reused exactly when they
    are still right."""
    settings = json.dumps([name, path, max_items, val_fraction, max_image_side, chunk_size, ENCODING_VERSION,
                           partition])
    return f"{name}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def unit_dir(root: Path, spec: UnitSpec) -> Path:
    return root / PARTS_DIR / spec.slug / f"{spec.chunk:06d}"


def split_of(source: str, group: str, val_fraction: float) -> str:
    """'validation' for a stable hash fraction of items, else 'train' (same answer on every run)."""
    digest = hashlib.sha256(f"{source}\x00{group}".encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def stored_image(image: Image.Image, max_side: int) -> bytes:
    """The stored form of an image: RGB, long side at most ``max_side``; JPEG (quality 95) where the
    source was a JPEG (a photo: lossless would only store its artefacts at several times the size),
    else PNG (lossless: clip art, emoji, renders, raw pixels)."""
    buffer = io.BytesIO()
    rgb = limit_size(to_rgb(image), max_side)
    if image.format == "JPEG":
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _row(record: Record, max_side: int) -> tuple[str, dict[str, Any]]:
    """(subset, stored row) of a record; raises SkipItem where its image cannot be opened."""
    if "image" not in record:
        return "texts", {"text": record["text"], "source": record["source"]}
    image = {"bytes": stored_image(record["image"].open(), max_side), "path": None}
    if "text" in record:
        return "pairs", {"image": image, "text": record["text"], "label_name": record["label_name"],
                         "source": record["source"]}
    return "images", {"image": image, "label": record["label"], "label_name": record["label_name"],
                      "source": record["source"]}


class _UnitSkips(SkipCounter):
    """Counts only the skips of this unit's range: the source reports skips it finds while
    iterating, also while earlier units' records are passed over."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = False

    def skip(self, reason: str, where: str) -> None:
        if self.counting:
            super().skip(reason, where)


@dataclass
class UnitResult:
    """What a unit wrote: records seen in its range (fewer than chunk_size: the source ended),
    rows per subset and split, records per split, skips, images written, seconds; ``reused``:
    read back from an earlier run rather than written now."""

    records: int
    rows: dict[str, dict[str, int]]
    splits: dict[str, int]
    skipped: dict[str, dict[str, Any]]
    images: int
    seconds: float
    reused: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def run_unit(root: Path, spec: UnitSpec) -> UnitResult:
    """Write unit ``spec`` under ``root`` (or read its result if it was written before)."""
    final = unit_dir(root, spec)
    if (final / UNIT_FILE).is_file():
        return UnitResult(**{**json.loads((final / UNIT_FILE).read_text(encoding="utf-8")), "reused": True})
    started = time.perf_counter()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skips = _UnitSkips()
    writers: dict[tuple[str, str], ArrowWriter] = {}
    rows = {subset: {split: 0 for split in SPLITS} for subset in SUBSETS}
    splits = {split: 0 for split in SPLITS}
    records = images = 0
    skips.counting = spec.start == 0
    for index, record in enumerate(open_source(spec.source, spec.path, skips, spec.partition)):
        if index == spec.start - 1:  # the skips found from here on lie between this unit's records
            skips.counting = True
        if index < spec.start:
            continue
        records += 1
        split = split_of(record["source"], record.get("group", record["key"]), spec.val_fraction)
        try:
            subset, row = _row(record, spec.max_image_side)
        except SkipItem as skip:
            skips.skip(skip.reason, skip.where)
        else:
            writer = writers.get((subset, split))
            if writer is None:
                writer = writers[(subset, split)] = ArrowWriter(
                    features=FEATURES[subset], writer_batch_size=WRITER_BATCH_ROWS, path=str(tmp / shard_name(subset, split)))
            writer.write(row)
            rows[subset][split] += 1
            splits[split] += 1
            images += subset != "texts"
        if index == spec.stop - 1:  # not one record further: the skips after it are the next unit's
            break
    for writer in writers.values():
        writer.finalize()
        writer.close()
    result = UnitResult(records=records, rows=rows, splits=splits, skipped=skips.as_dict(), images=images,
                        seconds=round(time.perf_counter() - started, 3))
    (tmp / UNIT_FILE).write_text(result.to_json(), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)  # an interrupted unit's leftovers
    os.replace(tmp, final)
    return result
