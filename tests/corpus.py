"""Small image corpora made by the tests: awkward-but-valid images, broken files, real photo crops."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from sklearn.datasets import load_sample_images

    PHOTOS = [Image.fromarray(a) for a in load_sample_images().images]  # real photos that ship in scikit-learn
except ImportError:  # pragma: no cover
    PHOTOS = []


def photo_crops(n: int, seed: int = 0, min_side: int = 64, max_side: int = 320) -> list[Image.Image]:
    """Crops of real photos at mixed sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = PHOTOS[i % len(PHOTOS)]
        w, h = (int(x) for x in rng.integers(min_side, max_side, 2))
        w, h = min(w, src.width), min(h, src.height)
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        out.append(src.crop((x, y, x + w, y + h)))
    return out


def write_folder(root: Path, per_class: dict[str, int], size=(48, 40), seed: int = 0) -> Path:
    """A clean ImageFolder of real photo crops as JPEG: {class: count}."""
    crops = photo_crops(sum(per_class.values()), seed, min(size), max(size) + 1)
    i = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            crops[i].save(root / name / f"{j:05d}.jpg", quality=90)
            i += 1
    return root


def pattern_images(per_class: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small learnable set, (N, size, size, 3) uint8 and labels: 0 horizontal stripes, 1 vertical
    stripes, 2 a checkerboard; random period phase, colours and noise, so no two images are equal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for label in range(3):
        for _ in range(per_class):
            phase = rng.integers(0, 4)
            on = [(yy + phase) // 2 % 2, (xx + phase) // 2 % 2, ((yy + phase) // 2 + (xx + phase) // 2) % 2][label]
            fg, bg = rng.uniform(0.55, 1.0, 3), rng.uniform(0.0, 0.45, 3)
            img = np.where(on[..., None] == 1, fg, bg) + rng.normal(0, 0.04, (size, size, 3))
            images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def write_patterns(root: Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``pattern_images`` as an ImageFolder of PNGs (classes horizontal, vertical, checker)."""
    images, labels = pattern_images(per_class, size, seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / ("horizontal", "vertical", "checker")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return root


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def awkward_images() -> dict[str, bytes]:
    """name -> bytes of valid images in every awkward form; all must be kept."""
    rgb = PHOTOS[0].crop((100, 100, 164, 148))
    gray16 = Image.fromarray(np.full((16, 24), 32896, dtype=np.uint16))  # mid-grey in 16 bits
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    rgba = Image.new("RGBA", (16, 16), (0, 128, 0, 0))
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "gray.jpg": _bytes(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _bytes(rgb.convert("CMYK"), "JPEG"),
        "sixteen bit.png": _bytes(gray16, "PNG"),
        "palette.with.transparency.png": _bytes(palette, "PNG", transparency=0),
        "rgba.png": _bytes(rgba, "PNG"),
        "rotated.jpg": _exif_rotated(),
        "animated.gif": gif.getvalue(),
        "photo.webp": _bytes(rgb, "WEBP"),
        "photo.bmp": _bytes(rgb, "BMP"),
        "photo.tiff": _bytes(rgb, "TIFF"),
        "UPPER.JPEG": _bytes(rgb, "JPEG"),
        "ünïcödé name.Png": _bytes(rgb, "PNG"),
        "nested/deeper/photo.jpg": _bytes(rgb, "JPEG"),
    }


def bad_files() -> dict[str, bytes]:
    """name -> bytes that must be skipped, each for a reason."""
    jpeg = _bytes(PHOTOS[0].crop((0, 0, 128, 128)), "JPEG")
    bomb = _bytes(Image.new("1", (9500, 9500)), "PNG")  # 90M pixels, a few kB on disk
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "not_an_image.jpg": b"<html>this is a web page</html>",
        "notes.txt": b"some notes lying in the tree",
        "bomb.png": bomb,
    }


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
