"""Checking and re-encoding one image: bytes in, RGB-ready bytes out, or a reason to skip it."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PASS_THROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSLESS = {"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA"}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
ORIENTATION = 0x0112


class BadImage(Exception):
    """An input that cannot become a training image; the message is the reason recorded in the index."""


@dataclass(frozen=True)
class EncodeOptions:
    resize_shorter: int | None = None
    max_side: int | None = None
    quality: int = 95
    validate: str = "full"  # "full": decode every pixel; "header": read the header only
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Encoded:
    data: bytes
    ext: str
    width: int  # of the original image, after EXIF orientation
    height: int


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha is composited on white, 16-bit is scaled, not clipped, and float
    images are read as 0..1 when no value exceeds 1 (scientific TIFFs), else as 0..255. A mode PIL cannot
    convert is a BadImage naming it."""
    try:
        return _to_rgb(img)
    except ValueError as e:  # a mode PIL cannot convert (La, for one)
        raise BadImage(f"unsupported pixel mode {img.mode} ({short_error(e)})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb ({e})") from None
    except Image.DecompressionBombWarning:
        raise BadImage(f"decompression bomb (more than {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not an image ({short_error(e)})") from None
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb ({w}x{h} = {w * h} pixels > {max_pixels})")
    if w == 0 or h == 0:
        raise BadImage(f"empty image ({w}x{h})")
    return img


def short_error(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__


def _resized_size(w: int, h: int, opts: EncodeOptions) -> tuple[int, int]:
    scale = 1.0
    if opts.resize_shorter:
        scale = opts.resize_shorter / min(w, h)
    if opts.max_side and max(w, h) * scale > opts.max_side:
        scale = opts.max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def encode(data: bytes, opts: EncodeOptions) -> Encoded:
    """Validate one image and return the bytes to store.

    Pass-through (the original bytes) when no resize is asked, the format is jpg/png/webp, the
    pixels are already 8-bit RGB and no EXIF orientation is pending; otherwise decode, apply the
    orientation, convert to RGB, resize if asked, and re-encode (PNG for lossless sources with no
    resize, else JPEG at ``quality``).
    """
    img = _open(data, opts.max_pixels)
    fmt = img.format
    resize = bool(opts.resize_shorter or opts.max_side)
    try:
        # getexif reads a PNG's chunks up to the pixels: a truncated file fails here
        orientation = img.getexif().get(ORIENTATION, 1) if fmt in ("JPEG", "WEBP", "PNG", "TIFF") else 1
        w, h = img.size if orientation not in (5, 6, 7, 8) else img.size[::-1]
        passthrough = not resize and fmt in PASS_THROUGH and img.mode == "RGB" and orientation == 1 \
            and not getattr(img, "is_animated", False)
        if passthrough and opts.validate == "header":
            return Encoded(data, PASS_THROUGH[fmt], w, h)
        if resize and (pixels := _area(_resized_size(w, h, opts))) > opts.max_pixels:
            # checked before decoding: a 370-byte 100000x1 PNG resized to a shorter side of 64 would be 1.2 GB
            size = _resized_size(w, h, opts)
            raise BadImage(f"resized image too large ({w}x{h} resized to {size[0]}x{size[1]} = {pixels} pixels "
                           f"> {opts.max_pixels}; --max-side caps it)")
        if resize and fmt == "JPEG":
            # decode at the smallest DCT scale that still covers the target size: much faster
            img.draft("RGB", _resized_size(*img.size, opts))
        img.load()
        if passthrough:
            return Encoded(data, PASS_THROUGH[fmt], w, h)
        img = to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"corrupt or truncated image ({short_error(e)})") from None
    out = io.BytesIO()
    if resize:
        size = _resized_size(w, h, opts)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
    if fmt in LOSSLESS and not resize:
        img.save(out, "PNG", compress_level=1)
        return Encoded(out.getvalue(), "png", w, h)
    img.save(out, "JPEG", quality=opts.quality)
    return Encoded(out.getvalue(), "jpg", w, h)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode stored image bytes to an RGB PIL image (the loader's side)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)
