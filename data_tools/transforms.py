"""Image transforms on PIL images with an explicit random generator (so a resumed run repeats them)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from common.images import INCEPTION_MEAN, INCEPTION_STD, image_pair
from data_tools.images import to_rgb

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop (Szegedy et al.): a random area fraction and aspect ratio; (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fall back to a centre crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_region(img: Image.Image, box: tuple[float, float, float, float], out_size: tuple[int, int]):
    """Decode (if not yet decoded) to RGB, cheaply, and return the box in the decoded image's pixels.

    A JPEG not yet decoded is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves
    the box at least ``out_size``: the same crop, far less work when the crop is much larger than
    the output. On an image already decoded, ``draft`` does nothing.
    """
    w, h = out_size
    shrink = min((box[2] - box[0]) / w, (box[3] - box[1]) / h)
    if getattr(img, "format", None) == "JPEG" and shrink >= 2:
        full = img.size
        img.draft("RGB", (math.ceil(full[0] / shrink), math.ceil(full[1] / shrink)))
        sx, sy = img.size[0] / full[0], img.size[1] / full[1]
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return to_rgb(img), box


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """HWC uint8 -> normalised CHW float32."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(m).div_(s)


@dataclass(frozen=True)
class TrainTransform:
    """Random-resized crop + horizontal flip + normalise: the paper's (Inception) augmentation."""

    size: tuple[int, int] | int
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        h, w = image_pair(self.size)
        left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng, self.scale, (3 / 4 * w / h, 4 / 3 * w / h))
        img, box = decode_region(img, (left, top, left + cw, top + ch), (w, h))
        img = img.resize((w, h), RESAMPLE[self.interpolation], box=box)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img, self.mean, self.std)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to size / crop_pct, centre crop, normalise."""

    size: tuple[int, int] | int
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        h, w = image_pair(self.size)
        scale = max(h / img.height, w / img.width) / self.crop_pct
        # resize the shorter side and centre-crop in one resampling: the crop in source pixels
        cw, ch = min(img.width, w / scale), min(img.height, h / scale)
        box = ((img.width - cw) / 2, (img.height - ch) / 2, (img.width + cw) / 2, (img.height + ch) / 2)
        img, box = decode_region(img, box, (w, h))
        img = img.resize((w, h), RESAMPLE[self.interpolation], box=box)
        return to_tensor(img, self.mean, self.std)
