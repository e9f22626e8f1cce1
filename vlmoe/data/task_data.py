"""Downstream task data: records from a task's embedded builders or a user's files, split so
that no image is on both sides, stored once as Hugging Face datasets and read back by step.

A task describes its records (``TaskRecords``): which fields hold images, which identify
them, and how to read each named embedded source or a user's ``KIND:PATH``. ``build`` turns
them into one folder per (task, data) and every later run reuses it:

    images/      DatasetDict train/validation {image: Image, key: str}; each image stored once
    examples/    DatasetDict train/validation: the task's fields; an image field holds the row
                 of its image in ``images[split]``, and ``<field>_key`` the image's identity
    report.json  examples per source and split, skipped records per reason, seconds

Nothing here is tokenized: a task's text is tokenized at collation with its base model's own
tokenizer, so one built folder serves every base.

Splits. A record may name its split (``train`` / ``validation``, e.g. easy-VQA's own test
split is our validation); otherwise every image key is assigned by a stable hash, and a record
goes where its images go (a record whose images hash to different splits is skipped, counted).
An image already stored in one split is never stored in the other: a record that would put it
there is skipped, counted. Validation examples are stored in a hashed order, so that the first
N of them (``data.eval_max_examples``) are a fair sample rather than one source.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from PIL import Image

from vlmoe.data.image_refs import FileImage, SkipItem
from vlmoe.data.images import encode_png
from vlmoe.data.sources import DataError, SkipCounter, jsonl_lines

SPLITS = ("train", "validation")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation"}
REPORT_FILE = "report.json"
# bump when the stored layout or an embedded builder changes: old folders are then rebuilt
FORMAT_VERSION = 2

ImageValue = Union[Image.Image, str, os.PathLike, Callable[[], Image.Image]]
Record = dict[str, Any]


class SkipRecord(Exception):
    """A record to skip, counted under its reason (the message); ``where`` adds a location (a file)."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(reason)
        self.where = where


# field kinds of a user's JSONL records
IMAGE, TEXT, TEXTS, LABEL = "image", "text", "texts", "label"


@dataclass(frozen=True)
class TaskRecords:
    """How a task's records look and where they come from.

    image_fields: fields holding an image (a PIL image, a file path, or a zero-argument loader);
        each comes with ``<field>_key``, the image's identity (splits and deduplication use it).
    key_field: for records without images, the field whose value decides the split (e.g. the
        premise of a sentence pair, so that one premise never lands on both sides).
    embedded: name -> function(skips) yielding records (the data that ships offline).
    default: the embedded names used when the config names none.
    user_fields: the JSONL schema, field -> (kind, required); kinds IMAGE, TEXT, TEXTS, LABEL.
    normalize: turns a checked user record into the task's record (raise SkipRecord to skip).
    image_folder: whether ``image_folder:PATH`` (CLASS/IMAGE files) is accepted.
    """

    image_fields: tuple[str, ...]
    embedded: Mapping[str, Callable[[SkipCounter], Iterator[Record]]]
    default: tuple[str, ...]
    user_fields: Mapping[str, tuple[str, bool]]
    normalize: Callable[[Record], Record] = lambda record: record
    key_field: Optional[str] = None
    image_folder: bool = False


@dataclass(frozen=True)
class DataSpec:
    """What to build: the data entries (embedded names or KIND:PATH), a cap per source and split
    (a deterministic sample by hash, not a prefix), and the validation share for records that do
    not name their split."""

    entries: tuple[str, ...]
    max_items_per_source: Optional[int] = None
    val_fraction: float = 0.1


@dataclass
class TaskSplit:
    """One split of a built task: ``examples`` rows; ``images`` (None for text-only tasks) holds
    the images that the rows' image fields index."""

    examples: Any
    images: Any = None

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, row: int) -> Image.Image:
        return self.images[int(row)]["image"]


@dataclass
class BuildState:
    """Rows collected while reading: images once per split, examples, counts, skips."""

    image_rows: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    images: dict[str, list[bytes]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    examples: dict[str, list[Record]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skips: SkipCounter = field(default_factory=SkipCounter)


def hashed_split(key: str, val_fraction: float) -> str:
    """'validation' for a stable hash fraction of keys, else 'train' (the same on every machine)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _hash_order(key: str) -> bytes:
    return hashlib.sha256(("order\x00" + key).encode("utf-8")).digest()


# ------------------------------------------------------------------------------ user files


def _user_path(entry: str) -> tuple[str, Path]:
    kind, _, path = entry.partition(":")
    if not path:
        raise DataError(f"data entry {entry!r}: expected an embedded name or KIND:PATH")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data entry {entry!r}: path does not exist: {resolved}")
    return kind, resolved


def _check_field(item: dict, name: str, kind: str) -> Any:
    value = item[name]
    if kind in (IMAGE, TEXT):
        if not isinstance(value, str) or not value.strip():
            raise SkipRecord(f"bad field '{name}' (expected a non-empty string)")
        return value.strip()
    if kind == TEXTS:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise SkipRecord(f"bad field '{name}' (expected a non-empty list of strings)")
        return [v.strip() for v in values]
    if kind == LABEL:
        if not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
            raise SkipRecord(f"bad field '{name}' (expected a string, an int or a bool)")
        return value.strip() if isinstance(value, str) else value
    raise ValueError(f"unknown field kind {kind!r}")


def _jsonl_records(path: Path, spec: TaskRecords, skips: SkipCounter) -> Iterator[Record]:
    """The task's records from a JSONL file; image paths are absolute or relative to the file."""
    for _, where, item in jsonl_lines(path, skips):
        if not isinstance(item, dict):
            skips.skip("bad JSONL line", where)
            continue
        try:
            yield {**_user_record(item, path.parent, spec), "source": f"jsonl:{path.name}", "where": where}
        except SkipRecord as exc:
            skips.skip(str(exc), where)


def _user_record(item: dict, folder: Path, spec: TaskRecords) -> Record:
    record: Record = {}
    for name, (kind, required) in spec.user_fields.items():
        if item.get(name) is None:
            if required:
                raise SkipRecord(f"missing field '{name}'")
            continue
        value = _check_field(item, name, kind)
        if kind == IMAGE:
            image_path = (folder / value).resolve()
            record[name], record[f"{name}_key"] = image_path, str(image_path)
        else:
            record[name] = value
    if item.get("split") is not None:
        split = SPLIT_NAMES.get(str(item["split"]).strip().lower())
        if split is None:
            raise SkipRecord("bad field 'split' (expected train or validation)")
        record["split"] = split
    return spec.normalize(record)


def _image_folder_records(root: Path, skips: SkipCounter) -> Iterator[Record]:
    """Classification records from root/CLASS_NAME/**/image files (the folder name is the label)."""
    from vlmoe.data.sources import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"image_folder: not a directory: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image_folder: no class subfolders in {root}")
    for stray in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        skips.skip("image outside a class folder", str(stray))
    for name in classes:
        for file in sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            yield {"image": file, "image_key": str(file.resolve()), "label": name,
                   "source": f"image_folder:{root.name}", "where": str(file)}


def open_entry(entry: str, spec: TaskRecords, skips: SkipCounter, task: str) -> Iterator[Record]:
    """Check one data entry now (name, path) and return its lazy record iterator."""
    if entry in spec.embedded:
        return ({**r, "source": r.get("source", entry)} for r in spec.embedded[entry](skips))
    kind, path = entry.partition(":")[0], None
    if kind == "jsonl":
        _, path = _user_path(entry)
        return _jsonl_records(path, spec, skips)
    if kind == "image_folder" and spec.image_folder:
        _, path = _user_path(entry)
        return _image_folder_records(path, skips)
    kinds = ["jsonl:PATH"] + (["image_folder:PATH"] if spec.image_folder else [])
    raise DataError(f"config key 'finetune.data': {entry!r} is not data of task '{task}'; use one of its embedded "
                    f"sets {sorted(spec.embedded)} or {', '.join(kinds)}")


# ------------------------------------------------------------------------------ building


def _load(value: ImageValue) -> Image.Image:
    """The image; SkipRecord (missing image file, corrupt image) naming the file otherwise."""
    if isinstance(value, Image.Image):
        return value
    if callable(value):
        return value()
    try:
        return FileImage(str(value)).open()
    except SkipItem as item:
        raise SkipRecord(item.reason, where=item.where) from item


def _record_split(record: Record, spec: TaskRecords, val_fraction: float) -> str:
    """The record's split: its own, or where its images (or its key field) hash to."""
    if "split" in record:
        return record["split"]
    keys = [record[f"{f}_key"] for f in spec.image_fields] or [str(record[spec.key_field])]
    splits = {hashed_split(key, val_fraction) for key in keys}
    if len(splits) > 1:
        raise SkipRecord("images hash to different splits")
    return splits.pop()


def _add_record(record: Record, spec: TaskRecords, state: BuildState, split: str) -> None:
    counts = state.counts.setdefault(record["source"], {s: 0 for s in SPLITS})
    other = "validation" if split == "train" else "train"
    row = {k: v for k, v in record.items() if k not in ("split", "where") and k not in spec.image_fields}
    for name in spec.image_fields:
        key = record[f"{name}_key"]
        if key in state.image_rows[other]:
            raise SkipRecord(f"image already in the {other} split")
        if key not in state.image_rows[split]:
            image = _load(record[name])
            state.image_rows[split][key] = len(state.images[split])
            state.images[split].append(encode_png(image))
        row[name] = state.image_rows[split][key]
    state.examples[split].append(row)
    counts[split] += 1


def _identity(record: Record, spec: TaskRecords) -> bytes:
    """A stable hash of what a record says (its images by key), for sampling and ordering."""
    said = {k: v for k, v in record.items() if k not in spec.image_fields and k != "where"}
    return hashlib.sha256(json.dumps(said, sort_keys=True, default=str).encode("utf-8")).digest()


def _sample(records: Iterable[tuple[Record, str]], spec: TaskRecords, cap: int) -> list[tuple[Record, str]]:
    """At most ``cap`` records per split: those of the smallest hashes, a deterministic sample that
    does not depend on the source's order (a prefix of WordNet would be all nouns), in hash order.
    Memory holds ``cap`` records per split, not the source."""
    kept: dict[str, list] = {s: [] for s in SPLITS}
    for count, (record, split) in enumerate(records):
        entry = (tuple(-b for b in _identity(record, spec)), count, record)  # a max-heap of the smallest hashes
        heap = kept[split]
        if len(heap) < cap:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)
    return [(record, split) for split in SPLITS for _, _, record in sorted(kept[split], reverse=True)]


def _read_all(entries: Sequence[str], spec: TaskRecords, data: DataSpec, task: str) -> BuildState:
    state = BuildState()
    iterators = [open_entry(entry, spec, state.skips, task) for entry in entries]  # every path checked first

    def skip(exc: SkipRecord, record: Record) -> None:
        where = record.get("where", record["source"])
        state.skips.skip(str(exc), f"{where} ({exc.where})" if exc.where else where)

    def with_splits(iterator: Iterable[Record]) -> Iterator[tuple[Record, str]]:
        for record in iterator:
            try:
                yield record, _record_split(record, spec, data.val_fraction)
            except SkipRecord as exc:
                skip(exc, record)

    for iterator in iterators:
        records = with_splits(iterator)
        if data.max_items_per_source is not None:
            records = _sample(records, spec, data.max_items_per_source)
        for record, split in records:
            try:
                _add_record(record, spec, state, split)
            except SkipRecord as exc:
                skip(exc, record)
    return state


def _dataset(rows: list[Record]):
    import datasets

    columns = sorted({k for row in rows for k in row})
    return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})


def _save(state: BuildState, spec: TaskRecords, out: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    order = {"train": lambda r: 0, "validation": lambda r: _hash_order(json.dumps(r, sort_keys=True, default=str))}
    examples = {s: sorted(state.examples[s], key=order[s]) for s in SPLITS}
    datasets.DatasetDict({s: _dataset(examples[s]) for s in SPLITS}).save_to_disk(str(out / "examples"))
    if spec.image_fields:
        features = datasets.Features({"image": datasets.Image(), "key": datasets.Value("string")})
        keys = {s: sorted(state.image_rows[s], key=state.image_rows[s].get) for s in SPLITS}
        datasets.DatasetDict({
            s: datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in state.images[s]],
                                           "key": keys[s]}, features=features)
            for s in SPLITS
        }).save_to_disk(str(out / "images"))


def data_dir_for(root: Union[str, os.PathLike], task: str, data: DataSpec) -> Path:
    """Where (task, data) is built: ``ROOT/tasks/<task>-<hash of the spec and user files' stats>``."""
    fingerprint: dict[str, Any] = {"task": task, "format": FORMAT_VERSION, "entries": [],
                                   "cap": data.max_items_per_source, "val_fraction": data.val_fraction}
    for entry in data.entries:
        kind, _, path = entry.partition(":")
        if path and Path(path).exists():
            stat = Path(path).stat()
            fingerprint["entries"].append([kind, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
        else:
            fingerprint["entries"].append([entry])
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return Path(root) / "tasks" / f"{task}-{digest}"


def build(out: Union[str, os.PathLike], task: str, spec: TaskRecords, data: DataSpec, verbose: bool = True) -> dict:
    """Read and store the task's data in ``out`` unless it is there already; returns the report.

    Written to a temporary folder and renamed, so an interrupted build leaves nothing half-made
    and concurrent builders (one per node) agree. Raises DataError for an unknown entry, a
    missing path, or a split left empty.
    """
    out = Path(out)
    if (out / REPORT_FILE).is_file():
        return json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    started = time.perf_counter()
    entries = data.entries or spec.default
    state = _read_all(entries, spec, data, task)
    for split in SPLITS:
        if not state.examples[split]:
            raise DataError(f"task '{task}' data {list(entries)}: the {split} split is empty after reading "
                            f"({state.skips.total} record(s) skipped: {state.skips.as_dict()})")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(state, spec, tmp)
    report = {"task": task, "entries": list(entries), "max_items_per_source": data.max_items_per_source,
              "val_fraction": data.val_fraction,
              "examples": {s: len(state.examples[s]) for s in SPLITS},
              "images": {s: len(state.images[s]) for s in SPLITS},
              "sources": state.counts, "skipped": state.skips.as_dict(),
              "seconds": round(time.perf_counter() - started, 2)}
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    try:
        tmp.rename(out)
    except OSError:  # another builder finished first: its folder holds the same data
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(summary(report), flush=True)
    return report


def summary(report: dict) -> str:
    """A few lines: examples and images per split, per source, skipped records per reason."""
    lines = [f"task data '{report['task']}' {report['entries']}: train {report['examples']['train']} / "
             f"validation {report['examples']['validation']} examples, images {report['images']['train']} / "
             f"{report['images']['validation']}"]
    for source, counts in report["sources"].items():
        lines.append(f"  {source}: train {counts['train']}, validation {counts['validation']}")
    for reason, info in report["skipped"].items():
        lines.append(f"  skipped {info['count']:6d}  {reason}  (e.g. {info['examples'][0]})")
    return "\n".join(lines)


def load(out: Union[str, os.PathLike]) -> dict[str, TaskSplit]:
    """The built splits of a task folder (memory-mapped Arrow)."""
    import datasets

    out = Path(out)
    examples = datasets.load_from_disk(str(out / "examples"))
    images = datasets.load_from_disk(str(out / "images")) if (out / "images").is_dir() else None
    return {s: TaskSplit(examples[s], images[s] if images is not None else None) for s in SPLITS}
