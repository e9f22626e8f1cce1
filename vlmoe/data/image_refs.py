"""Lazy image references: what a source record's "image" holds instead of decoded pixels.

Sources only say where an image is; `open()` reads and decodes it when (and where) it is
needed, so iterating a source stays cheap and a record can be sent to a worker process. Every
reference is a small frozen dataclass (it pickles with its file path, encoded bytes or, for
Fashion-MNIST, its 784 raw pixels) with:
    open() -> PIL.Image.Image   fully loaded; raises SkipItem when the image cannot be used
    where: str                  the item's location (a file, "file:line", "shard.tar:member")

This module imports only PIL and the standard library: `prepare`'s workers import it.
"""
from __future__ import annotations

import functools
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Noto Color Emoji is a bitmap font: 109 is the one size its strikes are drawn at.
NOTO_EMOJI_SIZE = 109
# what Pillow raises for an unreadable, truncated or absurdly large image
_DECODE_ERRORS = (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError)


class SkipItem(Exception):
    """An item whose image cannot be used; `reason` is the skip counters' short phrase
    ("missing image file", "corrupt image", "emoji not in font"), `where` its location."""

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(reason, where)  # both in args: it pickles back from a worker process
        self.reason = reason
        self.where = where

    def __str__(self) -> str:
        return f"{self.reason}: {self.where}"


class ImageRef(ABC):
    """An image not yet decoded; see the module docstring."""

    where: str

    @abstractmethod
    def open(self) -> Image.Image:
        """The decoded image, fully loaded; SkipItem if it cannot be used."""


def _decode(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes, keeping the image's `format` ("JPEG", "PNG", ...)."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # leaving drops the buffer, the pixels stay
            image.load()
    except _DECODE_ERRORS as exc:
        raise SkipItem("corrupt image", where) from exc
    return image


@dataclass(frozen=True)
class FileImage(ImageRef):
    """An image file on disk (Tux Paint stamps, JSONL lines, image folders, easy-VQA)."""

    path: str

    @property
    def where(self) -> str:
        return self.path

    def open(self) -> Image.Image:
        path = Path(self.path)
        if not path.is_file():
            raise SkipItem("missing image file", self.path)
        try:
            data = path.read_bytes()
        except OSError as exc:  # unreadable (permissions, I/O error): the item is lost, not the run
            raise SkipItem("corrupt image", self.path) from exc
        return _decode(data, self.path)


@dataclass(frozen=True)
class BytesImage(ImageRef):
    """Encoded image bytes held in memory (a webdataset tar member)."""

    data: bytes
    where: str

    def open(self) -> Image.Image:
        return _decode(self.data, self.where)


@dataclass(frozen=True)
class RawImage(ImageRef):
    """Raw pixels of a known mode and size (Fashion-MNIST's 28x28 grayscale bytes)."""

    data: bytes
    mode: str
    size: tuple[int, int]
    where: str

    def open(self) -> Image.Image:
        try:
            return Image.frombytes(self.mode, self.size, self.data)
        except ValueError as exc:  # too few bytes for the size, unknown mode
            raise SkipItem("corrupt image", self.where) from exc


@functools.lru_cache(maxsize=4)
def emoji_font(font_path: str) -> ImageFont.FreeTypeFont:
    """The emoji font at its bitmap size, loaded once per process (the file is about 10 MB);
    OSError if it cannot be loaded."""
    return ImageFont.truetype(font_path, NOTO_EMOJI_SIZE)


@dataclass(frozen=True)
class EmojiImage(ImageRef):
    """One emoji rendered in colour from a bitmap emoji font, on a transparent canvas the size
    of its glyph's bounding box."""

    font_path: str
    emoji: str
    where: str

    def open(self) -> Image.Image:
        font = emoji_font(self.font_path)
        _, _, width, height = font.getbbox(self.emoji)
        canvas = Image.new("RGBA", (max(width, 1), max(height, 1)), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), self.emoji, font=font, embedded_color=True)
        if canvas.getbbox() is None:  # the font has no glyph for it: it draws nothing
            raise SkipItem("emoji not in font", self.where)
        return canvas
