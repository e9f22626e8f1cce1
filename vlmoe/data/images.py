"""Image conversion shared by the data sources, `prepare` and the training collators.

Every image in the system goes through `to_rgb` (so alpha, palette and grayscale images look
the same to the model) and is stored at most `MAX_STORED_SIDE` pixels on its long side; the
model sees it through `image_to_tensor`, which scales pixels to [-1, 1].
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MAX_STORED_SIDE = 224


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to RGB; transparent parts are composited on white.

    Clip-art stamps and emoji are drawn on transparent canvases: dropping alpha would show
    whatever colour the transparent pixels happen to hold, usually black.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float images: rescale to 0..255 before the 8-bit conversion clips them.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.convert("RGB")


def limit_size(image: Image.Image, max_side: int = MAX_STORED_SIDE) -> Image.Image:
    """Downscale (never upscale) so that the long side is at most `max_side` pixels."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS)


def encode_png(image: Image.Image) -> bytes:
    """The stored form of every image: RGB, long side capped at `MAX_STORED_SIDE`, PNG (lossless)."""
    buffer = io.BytesIO()
    limit_size(to_rgb(image)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_to_tensor(image: Image.Image, size: int) -> "torch.Tensor":
    """Resize to size x size (aspect ratio not kept) and scale to [-1, 1].

    Returns:
        FloatTensor[3, size, size].
    """
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    resized = to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    import torch  # here, not at the top: prepare's worker processes convert images without torch

    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1) / 127.5) - 1.0
