"""Offline data sources, lazy image references, image conversion and `prepare` (datasets on disk,
splits, skips, errors)."""
import itertools
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vlmoe.data import sources
from vlmoe.data.image_refs import BytesImage, EmojiImage, FileImage, ImageRef, RawImage, SkipItem
from vlmoe.data.images import image_to_tensor, limit_size, to_rgb
from vlmoe.data.layout import MANIFEST_FILE, SPLITS, load_split
from vlmoe.data.prepare import REPORT_FILE, SourceSpec, prepare
from vlmoe.data.prepare_units import split_of
from vlmoe.data.sources import DataError, SkipCounter, open_source
from vlmoe.data.text_tokenizer import TextTokenizer
from vlmoe.data.visual_tokenizer import load_visual_tokenizer


def _take(name, count, path=None):
    skips = SkipCounter()
    return list(itertools.islice(open_source(name, path, skips), count)), skips


# ------------------------------------------------------------------------------------ real sources


def test_fashion_mnist_records():
    records, skips = _take("fashion_mnist", 3)
    assert [r["label"] for r in records] == [9, 0, 0]  # the well-known first train labels
    assert records[0]["label_name"] == "Ankle boot" and records[0]["key"] == "train/0"
    assert isinstance(records[0]["image"], RawImage) and len(records[0]["image"].data) == 28 * 28
    image = records[0]["image"].open()
    assert image.size == (28, 28) and image.mode == "L"
    assert np.asarray(image).max() > 100
    assert records[0]["image"].where.endswith("train-images-idx3-ubyte.gz:0")
    assert skips.total == 0


def test_tuxpaint_stamps_records_and_counted_gaps():
    records, skips = _take("tuxpaint_stamps", 3)
    first = records[0]
    assert set(first) == {"image", "text", "label_name", "source", "key"}
    assert first["text"] == "A frog." and first["label_name"] == "animals/amphibians"
    assert isinstance(first["image"], FileImage) and first["image"].where.endswith(first["key"] + ".png")
    image = first["image"].open()
    assert image.size[0] > 50 and image.format == "PNG"
    # SVG-only stamps and PNGs without a description are counted, with locations.
    assert skips.counts["stamp without PNG image"] > 100
    assert skips.as_dict()["stamp without PNG image"]["examples"][0].endswith(".txt")


def test_noto_emoji_records():
    records, skips = _take("noto_emoji", 2)
    assert [r["text"] for r in records] == ["grinning face", "grinning face with big eyes"]
    assert records[0]["label_name"] == "Smileys & Emotion/face-smiling"
    assert records[0]["image"].where.startswith(f"{sources.EMOJI_TEST_FILE}:")
    image = records[0]["image"].open()
    assert image.mode == "RGBA" and image.getbbox() is not None
    colours = np.asarray(to_rgb(image)).reshape(-1, 3)
    assert (colours[:, 0].astype(int) - colours[:, 2].astype(int)).max() > 100  # a yellow face, in colour


def test_wordnet_records():
    records, skips = _take("wordnet", 5)
    assert records[0]["text"].startswith("entity: that which is perceived or known")
    assert all(r["text"] and r["source"] == "wordnet" for r in records)
    assert not any(r["text"].startswith(" ") or "Princeton" in r["text"] for r in records)


def test_easy_vqa_pretraining_pairs_use_train_images_only():
    from vlmoe.data import easy_vqa
    records, skips = _take("easy_vqa", 4000)
    attributes = easy_vqa.attributes("train")
    assert len(records) == len(attributes) == 3578 and skips.total == 0
    first = records[0]
    shape, color = attributes[int(first["key"].split("/")[1])]
    assert first["text"] == f"a {color} {shape}" and first["label_name"] == shape
    assert first["image"].open().size == (64, 64)
    assert all(r["key"].startswith("train/") for r in records)  # the test images are the tasks' validation


def test_shakespeare_records():
    records, skips = _take("shakespeare", 3)
    first = records[0]["text"].splitlines()
    assert first[0] == "Now, fair Hippolyta, our nuptial hour" and len(first) == sources.SHAKESPEARE_LINES_PER_PASSAGE
    assert not any(marker in r["text"] for r in records for marker in ("**", "#", "_Enter", "\\["))


# ------------------------------------------------------------------------------------ user sources


def _png(path, colour=(255, 0, 0), size=(40, 20), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return path


@pytest.fixture
def user_data(tmp_path):
    """A JSONL file with one example of each kind of breakage, and a text folder."""
    root = tmp_path / "user"
    (root / "img").mkdir(parents=True)
    _png(root / "img" / "red.png")
    _png(root / "img" / "clear.png", (0, 0, 255, 0), mode="RGBA")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines = [
        json.dumps({"image": "img/red.png", "text": "a red rectangle"}),
        json.dumps({"image": str(root / "img" / "clear.png"), "text": "a transparent square"}),
        json.dumps({"text": "text only line"}),
        json.dumps({"image": "img/red.png"}),
        json.dumps({"image": "img/corrupt.png", "text": "broken image"}),
        json.dumps({"image": "img/missing.png", "text": "missing image"}),
        json.dumps({"image": "img/red.png", "text": "   "}),
        '{"image": "img/red.png", "text": ',
        json.dumps({"caption": "no known key"}),
        "",
    ]
    (root / "data.jsonl").write_text("\n".join(lines), encoding="utf-8")
    texts = root / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text("First paragraph\nspans two lines.\n\nSecond paragraph.\n", encoding="utf-8")
    (texts / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (texts / "empty.txt").write_text("  \n\n", encoding="utf-8")
    return root


def test_jsonl_records_and_skips(user_data):
    skips = SkipCounter()
    records = list(sources.jsonl(user_data / "data.jsonl", skips))
    kinds = [("image" in r, "text" in r) for r in records]
    assert kinds == [(True, True), (True, True), (False, True), (True, False), (True, True), (True, True)]
    assert records[3]["label"] == -1
    assert records[0]["text"] == "a red rectangle" and records[0]["image"].open().size == (40, 20)
    # iterating finds what needs no decoding; the broken image files surface when opened
    assert skips.counts == {"empty text": 1, "bad JSONL line": 1, "JSONL line without image or text": 1}
    assert skips.examples["bad JSONL line"] == [f"{user_data / 'data.jsonl'}:8"]
    assert [r["key"] for r in records[4:]] == ["5", "6"]
    with pytest.raises(SkipItem) as corrupt:
        records[4]["image"].open()
    assert corrupt.value.reason == "corrupt image" and corrupt.value.where == str(user_data / "img" / "corrupt.png")
    with pytest.raises(SkipItem) as missing:
        records[5]["image"].open()
    assert missing.value.reason == "missing image file" and missing.value.where.endswith("missing.png")
    opened = SkipCounter()
    assert [sources.open_image(r["image"], opened) is not None for r in records if "image" in r] == [
        True, True, True, False, False]
    assert opened.counts == {"corrupt image": 1, "missing image file": 1}


def test_text_files_paragraphs_and_skips(user_data):
    skips = SkipCounter()
    records = list(sources.text_files(user_data / "texts", skips))
    assert [r["text"] for r in records] == ["First paragraph spans two lines.", "Second paragraph."]
    assert skips.counts == {"empty text": 1, "non-UTF-8 text": 1}
    assert skips.examples["non-UTF-8 text"][0].endswith("latin1.txt")
    single = list(sources.text_files(user_data / "texts" / "good.txt", SkipCounter()))
    assert len(single) == 2


def test_image_folder_classes_and_skips(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.jpg")
    (tmp_path / "dog" / "c.png").write_bytes(b"not an image")
    (tmp_path / "dog" / "notes.md").write_text("ignored: not an image extension")
    _png(tmp_path / "stray.png")
    skips = SkipCounter()
    records = list(sources.image_folder(tmp_path, skips))
    assert [(r["label"], r["label_name"], r["key"]) for r in records] == [
        (0, "cat", "cat/a.png"), (1, "dog", "dog/b.jpg"), (1, "dog", "dog/c.png")]
    assert skips.counts == {"image outside a class folder": 1}
    # the stored format follows the file's: prepare keeps JPEG photos as JPEG
    assert [r["image"].open().format for r in records[:2]] == ["PNG", "JPEG"]
    with pytest.raises(SkipItem, match="corrupt image") as corrupt:
        records[2]["image"].open()
    assert corrupt.value.where == str(tmp_path / "dog" / "c.png")


def test_skip_counter_keeps_five_examples():
    skips = SkipCounter()
    for i in range(8):
        skips.skip("corrupt image", f"f{i}")
    assert skips.as_dict() == {"corrupt image": {"count": 8, "examples": ["f0", "f1", "f2", "f3", "f4"]}}


def test_image_refs_pickle_small_and_open_the_same_image(tmp_path):
    """Sources hand out references, not pixels: they cross to worker processes, cheaply."""
    png = tmp_path / "red.png"
    _png(png)
    records = [_take(name, 1)[0][0] for name in ("fashion_mnist", "tuxpaint_stamps", "noto_emoji")]
    references = [r["image"] for r in records] + [FileImage(str(png)), BytesImage(png.read_bytes(), "red.png")]
    for reference in references:
        assert isinstance(reference, ImageRef)
        copy = pickle.loads(pickle.dumps(reference))
        assert copy == reference and len(pickle.dumps(reference)) < 2000
        assert copy.open().tobytes() == reference.open().tobytes()
    assert BytesImage(png.read_bytes(), "red.png").open().format == "PNG"


def test_image_refs_raise_skip_item_with_reason_and_location(tmp_path):
    (tmp_path / "cut.png").write_bytes(_png(tmp_path / "whole.png").read_bytes()[:60])
    cases = [
        (FileImage(str(tmp_path / "absent.png")), "missing image file", str(tmp_path / "absent.png")),
        (FileImage(str(tmp_path / "cut.png")), "corrupt image", str(tmp_path / "cut.png")),
        (BytesImage(b"\xff\xd8\xff garbage", "shard.tar:k.jpg"), "corrupt image", "shard.tar:k.jpg"),
        (RawImage(b"\x00" * 10, "L", (28, 28), "idx:3"), "corrupt image", "idx:3"),
        (EmojiImage(sources.NOTO_EMOJI_FONT, "a", "emoji-test.txt:9"), "emoji not in font", "emoji-test.txt:9"),
    ]
    for reference, reason, where in cases:
        with pytest.raises(SkipItem) as item:
            reference.open()
        assert (item.value.reason, item.value.where) == (reason, where)
        skips = SkipCounter()
        assert sources.open_image(reference, skips) is None
        assert skips.as_dict() == {reason: {"count": 1, "examples": [where]}}
    raised = pickle.loads(pickle.dumps(SkipItem("corrupt image", "a.png")))  # from a worker process
    assert (raised.reason, raised.where, str(raised)) == ("corrupt image", "a.png", "corrupt image: a.png")


def test_unknown_source_and_missing_paths_raise_data_error(tmp_path):
    skips = SkipCounter()
    with pytest.raises(DataError, match="unknown data source 'imagenet'"):
        open_source("imagenet", None, skips)
    with pytest.raises(DataError, match="'jsonl' needs a path"):
        open_source("jsonl", None, skips)
    with pytest.raises(DataError, match="nowhere.jsonl"):
        open_source("jsonl", str(tmp_path / "nowhere.jsonl"), skips)
    with pytest.raises(DataError, match="wordnet.*nowhere"):
        open_source("wordnet", str(tmp_path / "nowhere"), skips)
    (tmp_path / "fm").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        open_source("fashion_mnist", str(tmp_path / "fm"), skips)
    (tmp_path / "font.ttf").write_bytes(b"not a font")
    with pytest.raises(DataError, match="cannot load font .*font.ttf"):  # now, not at the first emoji
        open_source("noto_emoji", str(tmp_path / "font.ttf"), skips)
    assert isinstance(DataError("x"), ValueError)


def test_fashion_mnist_bad_index_file_names_it(tmp_path):
    import gzip

    for split in ("train", "t10k"):
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds 100 bytes"):
        list(open_source("fashion_mnist", str(tmp_path), SkipCounter()))


# ------------------------------------------------------------------------------------ images


def test_to_rgb_composites_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    transparent.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(transparent)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((3, 3)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 10)).getpixel((1, 1)) == (10, 10, 10)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    sixteen_bit = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.int32), mode="I")
    assert to_rgb(sixteen_bit).getpixel((1, 1)) == (255, 255, 255)


def test_limit_size_and_image_to_tensor():
    big = Image.new("RGB", (448, 100), (0, 0, 0))
    assert limit_size(big).size == (224, 50)
    small = Image.new("RGB", (30, 10))
    assert limit_size(small) is small
    tensor = image_to_tensor(Image.new("RGB", (50, 30), (255, 0, 127)), 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 5, 5], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]), atol=1e-5)
    with pytest.raises(ValueError, match="size"):
        image_to_tensor(small, 0)


# ------------------------------------------------------------------------------------ prepare


def _small_mix(user_data):
    return [
        SourceSpec("fashion_mnist", max_items=60),
        SourceSpec("tuxpaint_stamps", max_items=20),
        SourceSpec("noto_emoji", max_items=20),
        SourceSpec("wordnet", max_items=150),
        SourceSpec("shakespeare", max_items=40),
        SourceSpec("jsonl", str(user_data / "data.jsonl")),
        SourceSpec("text_files", str(user_data / "texts")),
    ]


SMALL_SETTINGS = dict(val_fraction=0.2, text_vocab_size=200, image_size=16, patch_size=8, codebook_size=16,
                      tokenizer_fit_images=40, verbose=False)


def _rows(root, subset):
    return {split: load_split(root, subset, split).to_list() for split in SPLITS}


def test_prepare_small_mix_twice_identical(tmp_path, user_data):
    first = prepare(tmp_path / "a", _small_mix(user_data), **SMALL_SETTINGS)
    second = prepare(tmp_path / "b", _small_mix(user_data), **SMALL_SETTINGS)

    for subset in ("images", "pairs", "texts"):
        rows_a, rows_b = _rows(tmp_path / "a", subset), _rows(tmp_path / "b", subset)
        assert rows_a == rows_b, subset
        assert {s: len(r) for s, r in rows_a.items()} == first.subsets[subset]
    assert first.records == second.records and first.skipped == second.skipped

    # Counts per source: every taken record lands in exactly one split.
    totals = {source: counts["train"] + counts["validation"] for source, counts in first.records.items()}
    assert totals == {"fashion_mnist": 60, "tuxpaint_stamps": 20, "noto_emoji": 20, "wordnet": 150,
                      "shakespeare": 40, "jsonl:data.jsonl": 4, "text_files:texts": 2}
    assert 0 < first.records["wordnet"]["validation"] < 75
    assert first.subsets["images"]["train"] + first.subsets["images"]["validation"] == 60 + 1
    assert first.subsets["pairs"]["train"] + first.subsets["pairs"]["validation"] == 20 + 20 + 2

    # Broken user items are counted with reasons; the rest is prepared.
    skipped = {reason: info["count"] for reason, info in first.skipped.items()}
    assert skipped["corrupt image"] == 1 and skipped["missing image file"] == 1
    assert skipped["empty text"] == 2 and skipped["non-UTF-8 text"] == 1 and skipped["bad JSONL line"] == 1
    report = json.loads((tmp_path / "a" / REPORT_FILE).read_text())
    assert report["skipped"]["bad JSONL line"]["examples"] == [f"{user_data / 'data.jsonl'}:8"]
    assert report["records"] == first.records and report["text_tokenizer"]["vocab_size"] <= 200
    summary = first.summary()
    assert "1  bad JSONL line" in summary and "jsonl:data.jsonl" in summary

    # Stored images are RGB (transparent composited on white); schema as documented.
    pairs = {split: load_split(tmp_path / "a", "pairs", split) for split in SPLITS}
    assert set(pairs["train"].features) == {"image", "text", "label_name", "source"}
    assert load_split(tmp_path / "a", "images", "train").features["label"].dtype == "int64"
    every_pair = list(pairs["train"]) + list(pairs["validation"])
    square = next(r for r in every_pair if r["text"] == "a transparent square")
    assert square["image"].mode == "RGB" and square["image"].getpixel((3, 3)) == (255, 255, 255)

    # Tokenizers: identical across runs, usable, with the requested settings.
    text_a = TextTokenizer.load(tmp_path / "a" / "text_tokenizer.model")
    text_b = TextTokenizer.load(tmp_path / "b" / "text_tokenizer.model")
    sample = "Now, fair Hippolyta, a red rectangle"
    assert text_a.encode(sample, 32) == text_b.encode(sample, 32)
    assert text_a.decode(text_a.encode(sample, 64)) == sample
    visual_a = load_visual_tokenizer(str(tmp_path / "a" / "visual_tokenizer.safetensors"))
    visual_b = load_visual_tokenizer(str(tmp_path / "b" / "visual_tokenizer.safetensors"))
    assert torch.equal(visual_a.centroids, visual_b.centroids)
    assert visual_a.codebook_size == 16 and visual_a.patch_size == 8
    pixels = torch.stack([image_to_tensor(r["image"], 16) for r in every_pair[:4]])
    codes = visual_a.tokenize(pixels)
    assert codes.shape == (4, 4) and int(codes.max()) < 16


def test_split_is_stable_under_other_changes(tmp_path, user_data):
    settings = dict(SMALL_SETTINGS, codebook_size=4, tokenizer_fit_images=4)
    small = prepare(tmp_path / "small", [SourceSpec("wordnet", max_items=100), SourceSpec("fashion_mnist", max_items=4)],
                    **settings)
    prepare(tmp_path / "large", [SourceSpec("shakespeare", max_items=30), SourceSpec("wordnet", max_items=200),
                   SourceSpec("fashion_mnist", max_items=4)], **settings)
    small_val = {r["text"] for r in _rows(tmp_path / "small", "texts")["validation"]}
    large_val = {r["text"] for r in _rows(tmp_path / "large", "texts")["validation"] if r["source"] == "wordnet"}
    assert small_val and small_val <= large_val
    # A subset without records is still written, empty, with its schema.
    empty_pairs = load_split(tmp_path / "large", "pairs", "train")
    assert len(empty_pairs) == 0 and set(empty_pairs.features) == {"image", "text", "label_name", "source"}
    assert small.subsets["pairs"] == {"train": 0, "validation": 0}


def test_split_of_fraction_and_stability():
    keys = [f"item{i}" for i in range(4000)]
    validation = [k for k in keys if split_of("src", k, 0.1) == "validation"]
    assert 300 < len(validation) < 500
    assert validation == [k for k in keys if split_of("src", k, 0.1) == "validation"]
    assert all(split_of("src", k, 0.0) == "train" for k in keys[:100])
    assert {k for k in keys if split_of("src", k, 0.2) == "validation"} >= set(validation)


def test_jsonl_split_keeps_each_image_on_one_side(tmp_path):
    # Several caption lines per image (COCO's five), written as relative and as ./ paths: the
    # split follows the image, so no image is seen in training and validated on.
    (tmp_path / "img").mkdir()
    lines = []
    for image in range(12):
        Image.new("RGB", (16, 16), (image * 20, 0, 0)).save(tmp_path / "img" / f"{image}.png")
        for caption in range(5):
            path = f"img/{image}.png" if caption % 2 else f"./img/{image}.png"
            lines.append(json.dumps({"image": path, "text": f"image {image} caption {caption}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines), encoding="utf-8")
    settings = dict(SMALL_SETTINGS, val_fraction=0.5, codebook_size=4, tokenizer_fit_images=8)
    prepare(tmp_path / "out", [SourceSpec("jsonl", str(tmp_path / "captions.jsonl")),
                               SourceSpec("wordnet", max_items=100)], **settings)
    side_of_image: dict[str, set] = {}
    for split, rows in _rows(tmp_path / "out", "pairs").items():
        for row in rows:
            side_of_image.setdefault(row["text"].split(" caption")[0], set()).add(split)
    assert len(side_of_image) == 12
    assert all(len(sides) == 1 for sides in side_of_image.values()), side_of_image
    assert {next(iter(s)) for s in side_of_image.values()} == {"train", "validation"}


def test_emoji_skin_tone_variants_share_their_base_emoji_split():
    assert sources.emoji_base("1F44B") == "1F44B"
    assert sources.emoji_base("1F44B 1F3FD") == "1F44B"
    assert sources.emoji_base("1F9D1 1F3FB 200D 1F91D 200D 1F9D1 1F3FF") == "1F9D1_200D_1F91D_200D_1F9D1"
    records, _ = _take("noto_emoji", 400)
    by_name = {r["text"]: r for r in records}
    toned = by_name["waving hand: medium skin tone"]
    assert toned["group"] == by_name["waving hand"]["group"] == "1F44B"
    assert toned["key"] != by_name["waving hand"]["key"]
    sides = {split_of("noto_emoji", by_name[name]["group"], 0.5) for name in by_name if name.startswith("waving hand")}
    assert len(sides) == 1


def test_prepare_refuses_bad_sources_before_writing(tmp_path, user_data):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="unknown data source 'coco'"):
        prepare(out, [SourceSpec("wordnet", max_items=5), SourceSpec("coco")], **SMALL_SETTINGS)
    with pytest.raises(DataError, match="missing.jsonl"):
        prepare(out, [SourceSpec("wordnet", max_items=5), SourceSpec("jsonl", str(tmp_path / "missing.jsonl"))],
                **SMALL_SETTINGS)
    with pytest.raises(DataError, match="multiple of patch_size"):
        prepare(out, [SourceSpec("wordnet", max_items=5)], **dict(SMALL_SETTINGS, image_size=20))
    assert not out.exists()
    # What the data holds is known once it is read: the units written are kept (a rerun with a
    # text source added reads only that source), but no manifest makes the directory usable.
    with pytest.raises(DataError, match="no train text"):
        prepare(out, [SourceSpec("fashion_mnist", max_items=50)], **SMALL_SETTINGS)
    with pytest.raises(DataError, match="too few patches"):
        prepare(out, [SourceSpec("wordnet", max_items=50), SourceSpec("fashion_mnist", max_items=2)], **SMALL_SETTINGS)
    assert not (out / MANIFEST_FILE).exists() and not (out / "text_tokenizer.model").exists()
