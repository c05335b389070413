"""Decoding and conforming single images (pure PIL/numpy, no Ray)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class BadImage(ValueError):
    """An input that is not a decodable image."""


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent images (RGBA, LA, palette with transparency) on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img


def conform(img: Image.Image, size: int, mode: str) -> np.ndarray:
    """Convert to `mode` ("L" or "RGB"), resize the short side to `size`, centre-crop.

    Returns uint8 HxWxC (C = 1 for "L", 3 for "RGB").
    """
    img = _flatten_alpha(img).convert(mode)
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode(data: bytes, size: int, mode: str) -> np.ndarray:
    """Decode encoded image bytes and conform them. Raises BadImage on any failure."""
    if not data:
        raise BadImage("zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return conform(img, size, mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from exc


def conform_array(arr: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Conform a decoded uint8 array (HxW, HxWx1, HxWx3 or HxWx4)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise BadImage(f"image array has dtype {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise BadImage(f"image array has shape {arr.shape}, expected HxW or HxWxC")
    return conform(Image.fromarray(arr), size, mode)
