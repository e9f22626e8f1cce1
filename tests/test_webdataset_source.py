"""The `webdataset` source: tar shards of KEY.jpg|png|... + KEY.txt|json, written here from embedded images,
with the breakage real downloads have (samples without caption, corrupt images, bad .json, truncated shards)."""
from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import pytest

from vlmoe.data.image_refs import BytesImage, SkipItem
from vlmoe.data.sources import DataError, SkipCounter, open_image, open_source

RECORD_KEYS = {"image", "text", "label_name", "source", "key", "group"}


def _encoded(record: dict, image_format: str) -> bytes:
    """A source record's image encoded as a file in a shard would hold it."""
    buffer = io.BytesIO()
    image = record["image"].open()
    (image.convert("RGB") if image_format == "JPEG" else image).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    """Encoded images: a Fashion-MNIST boot as JPEG and WebP, a Tux Paint stamp as PNG."""
    boot = next(open_source("fashion_mnist", None, SkipCounter()))
    frog = next(open_source("tuxpaint_stamps", None, SkipCounter()))
    return {"jpg": _encoded(boot, "JPEG"), "webp": _encoded(boot, "WEBP"), "png": _encoded(frog, "PNG")}


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _caption(text: str) -> bytes:
    return text.encode("utf-8")


def _shards(root: Path, pictures: dict[str, bytes]) -> list[Path]:
    """Three shards; the middle one is cut short inside the image of its second sample."""
    first = _write_tar(root / "part-000000.tar", [
        ("000000.jpg", pictures["jpg"]), ("000000.txt", _caption("  an ankle boot\n")), ("000000.cls", b"9"),
        ("000001.png", pictures["png"]), ("000001.json", json.dumps({"caption": "A frog.", "url": "x"}).encode()),
        ("000002.jpg", pictures["jpg"]),  # no caption
        ("000003.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("000003.txt", _caption("a corrupt image")),
        ("000004.webp", pictures["webp"]), ("000004.json", b"{not json"),
        ("000005.txt", _caption("a caption without image")),
        ("000006.jpg", pictures["jpg"]), ("000006.txt", _caption(" \n")),
        ("000007.JPEG", pictures["jpg"]), ("000007.json", json.dumps({"text": "a boot from the text field"}).encode()),
        ("000008.png", pictures["png"]), ("000008.json", json.dumps({"caption": None, "status": "failed"}).encode()),
        ("__index__", b"webdataset metadata, not a sample"),
    ])
    second = _write_tar(root / "part-000001.tar", [
        ("000010.jpg", pictures["jpg"]), ("000010.txt", _caption("a boot before the damage")),
        ("000010.txt", _caption("the same file again")),
        ("000011.jpg", pictures["jpg"]), ("000011.txt", _caption("lost with the end of the shard")),
    ])
    with tarfile.open(second) as tar:
        cut = tar.getmember("000011.jpg").offset_data + 100
    second.write_bytes(second.read_bytes()[:cut])
    third = _write_tar(root / "part-000002.tar", [
        ("000020.webp", pictures["webp"]), ("000020.txt", _caption("a boot after the damaged shard")),
    ])
    return [first, second, third]


def test_records_keys_order_and_skips(tmp_path, pictures):
    first, second, third = _shards(tmp_path, pictures)
    skips = SkipCounter()
    records = list(open_source("webdataset", str(tmp_path / "part-{000000..000002}.tar"), skips))

    assert [r["key"] for r in records] == [
        "part-000000.tar/000000", "part-000000.tar/000001", "part-000000.tar/000003", "part-000000.tar/000007",
        "part-000001.tar/000010", "part-000002.tar/000020"]
    assert [r["text"] for r in records] == [
        "an ankle boot", "A frog.", "a corrupt image", "a boot from the text field", "a boot before the damage",
        "a boot after the damaged shard"]
    for record in records:
        assert set(record) == RECORD_KEYS and record["group"] == record["key"] and record["label_name"] == ""
        assert record["source"] == "webdataset:part-{000000..000002}.tar"
        assert isinstance(record["image"], BytesImage)

    assert skips.as_dict() == {
        "webdataset sample without caption": {"count": 2, "examples": [f"{first}:000002", f"{first}:000008"]},
        "bad webdataset .json": {"count": 1, "examples": [f"{first}:000004"]},
        "webdataset sample without image": {"count": 1, "examples": [f"{first}:000005"]},
        "empty text": {"count": 1, "examples": [f"{first}:000006"]},
        "duplicate file in webdataset sample": {"count": 1, "examples": [f"{second}:000010.txt"]},
        "corrupt tar shard": {"count": 1, "examples": [f"{second}:000011.jpg (unexpected end of data)"]},
    }


def test_images_open_lazily_and_corrupt_bytes_surface_as_skip_item(tmp_path, pictures):
    first = _shards(tmp_path, pictures)[0]
    records = list(open_source("webdataset", str(first), SkipCounter()))  # one shard, no braces
    by_key = {r["key"].split("/")[1]: r["image"] for r in records}
    assert by_key["000000"].data == pictures["jpg"] and by_key["000001"].data == pictures["png"]
    boot, frog = by_key["000000"].open(), by_key["000001"].open()
    assert (boot.format, boot.size) == ("JPEG", (28, 28)) and (frog.format, frog.mode) == ("PNG", "RGBA")
    assert by_key["000007"].open().format == "JPEG"  # KEY.JPEG: webdataset lower-cases the extension
    with pytest.raises(SkipItem) as corrupt:
        by_key["000003"].open()
    assert (corrupt.value.reason, corrupt.value.where) == ("corrupt image", f"{first}:000003.jpg")
    skips = SkipCounter()
    assert [open_image(image, skips) is None for image in by_key.values()] == [False, False, True, False]
    assert skips.counts == {"corrupt image": 1}
    # records cross to worker processes: small and picklable
    assert pickle.loads(pickle.dumps(records[0])) == records[0]


def test_damaged_shards_tarfile_would_end_quietly_are_counted(tmp_path, pictures):
    """tarfile stops without an error at a cut or garbled header; the source notices the shard did not
    end with its end-of-archive marker. A file that is not a tar at all is counted too."""
    members = [(f"{i:06d}.{ext}", pictures["jpg"] if ext == "jpg" else _caption(f"boot {i}"))
               for i in range(3) for ext in ("jpg", "txt")]
    whole = _write_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        second_header = tar.getmember("000001.jpg").offset
    (tmp_path / "s-0.tar").write_bytes(whole[:second_header + 200])  # cut inside a header
    (tmp_path / "s-1.tar").write_bytes(whole[:second_header])  # cut between two members
    garbled = bytearray(whole)
    garbled[second_header:second_header + 512] = b"\x07" * 512
    (tmp_path / "s-2.tar").write_bytes(bytes(garbled))
    (tmp_path / "s-3.tar").write_bytes(b"<html>503 Service Unavailable</html>")
    skips = SkipCounter()
    records = list(open_source("webdataset", str(tmp_path / "s-{0..3}.tar"), skips))
    assert [r["key"] for r in records] == ["s-0.tar/000000", "s-1.tar/000000", "s-2.tar/000000"]
    assert skips.counts == {"corrupt tar shard": 4}
    where = skips.examples["corrupt tar shard"]
    assert [w.split(" (")[0] for w in where] == [
        f"{tmp_path / 's-0.tar'}:000000.txt", f"{tmp_path / 's-1.tar'}:000000.txt",
        f"{tmp_path / 's-2.tar'}:000000.txt", str(tmp_path / "s-3.tar")]
    assert "end-of-archive marker" in where[0]
    # the whole shard reads cleanly: nothing counted
    clean = SkipCounter()
    assert len(list(open_source("webdataset", str(tmp_path / "whole.tar"), clean))) == 3 and clean.total == 0


def test_patterns_missing_shards_and_errors(tmp_path, pictures):
    _shards(tmp_path, pictures)
    skips = SkipCounter()
    # a missing shard among existing ones is counted when reached; the others are read
    records = list(open_source("webdataset", str(tmp_path / "part-{000002..000003}.tar"), skips))
    assert [r["key"] for r in records] == ["part-000002.tar/000020"]
    assert skips.as_dict() == {"missing tar shard": {"count": 1, "examples": [str(tmp_path / "part-000003.tar")]}}
    # webdataset's "::" list of patterns
    listed = list(open_source("webdataset", f"{tmp_path / 'part-000002.tar'}::{tmp_path / 'part-000000.tar'}",
                              SkipCounter()))
    assert [r["key"] for r in listed][:2] == ["part-000002.tar/000020", "part-000000.tar/000000"]
    # no file at all: refused when the source is opened, naming the pattern
    pattern = str(tmp_path / "cc3m-{000000..000331}.tar")
    with pytest.raises(DataError, match=re.escape(f"webdataset: no tar file matches {pattern}")):
        open_source("webdataset", pattern, SkipCounter())
    with pytest.raises(DataError, match="'webdataset' needs a path"):
        open_source("webdataset", None, SkipCounter())
