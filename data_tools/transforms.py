"""Image transforms with an explicit random generator (so a resumed run repeats them).

Workers hand over uint8: a transform turns one opened image into an (H, W, 3) uint8 array (crop-decode,
resize, flip), written into the batch's buffer; the float conversion and the normalisation happen on the
device, in ``to_device``, where every consumer of loader batches (training step, validation, kNN monitor,
evaluation) turns a batch into model input the same way. ``GpuTrainTransform`` leaves the decoding itself
to the device: its workers only read each JPEG's header and draw the same crop and flip.
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from common.images import INCEPTION_MEAN, INCEPTION_STD, image_pair
from common.redact import redact
from data_tools.images import to_rgb

log = logging.getLogger(__name__)

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


def draw_train_crop(width: int, height: int, size: tuple[int, int], rng: random.Random, scale: tuple[float, float],
                    flip: bool) -> tuple[tuple[int, int, int, int], bool]:
    """One training sample's draws, in their order: the crop box (left, top, w, h) in the image's pixels, then
    the flip. The CPU and the GPU decode paths both draw through here, so they crop the same regions."""
    h, w = size
    box = random_resized_crop_box(width, height, rng, scale, (3 / 4 * w / h, 4 / 3 * w / h))
    return box, flip and rng.random() < 0.5


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


def resized_region(img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], interpolation: str,
                   flip: bool) -> np.ndarray:
    """The box (left, top, w, h) of ``img`` resized to ``size`` (height, width), as (H, W, 3) uint8; mirrored
    when ``flip``. A JPEG decoded at full size (the box is under twice the output) goes through libjpeg-turbo
    and torch's uint8 antialiased resize (``full_size_jpeg_region``: 1.3-1.7x PIL's speed for the same pixels
    up to rounding); others through PIL, at a reduced DCT scale when the box allows (``decode_region``)."""
    h, w = size
    left, top, cw, ch = box
    if min(cw / w, ch / h) < 2 and _undecoded_jpeg(img):
        return full_size_jpeg_region(img.fp.getvalue(), box, size, interpolation, flip)
    img, region = decode_region(img, (left, top, left + cw, top + ch), (w, h))
    img = img.resize((w, h), RESAMPLE[interpolation], box=region)
    # mirrored by PIL: a mirrored numpy view of 3-byte pixels copies ~20x slower into the batch buffer
    return np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)


def _undecoded_jpeg(img: Image.Image) -> bool:
    """A JPEG (RGB or grayscale) opened from bytes in memory and not decoded yet."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and isinstance(getattr(img, "fp", None), io.BytesIO)


def full_size_jpeg_region(data: bytes, box: tuple[int, int, int, int], size: tuple[int, int], interpolation: str,
                          flip: bool) -> np.ndarray:
    """``data`` decoded whole (torchvision's libjpeg-turbo), its box cropped, resized with torch's uint8
    antialiased filter and mirrored when ``flip``: (H, W, 3) uint8. Deterministic for a given box."""
    from torchvision.io import ImageReadMode, decode_jpeg

    left, top, cw, ch = box
    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    crop = pixels[None, :, top:top + ch, left:left + cw].contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(crop, size=size, mode=interpolation, antialias=True)[0].permute(1, 2, 0)
    return (out.flip(1) if flip else out).numpy()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), ``(x / 255 - mean) / std``, on the tensor's device.

    The same operations, in the same order, as the workers once ran per sample: the result is bit for bit
    what they handed over."""
    x = images.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def move(batch: dict, device: torch.device, skip=()) -> dict:
    """The batch's tensors on ``device``; non-blocking (from the loader's pinned memory) on CUDA. What is not a
    tensor (a training batch's sample keys and stream state) stays as it is."""
    return {k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k not in skip}


@dataclass(frozen=True)
class JpegCrop:
    """What a GPU-decode worker hands over for one JPEG: its bytes, and the crop and flip drawn for it."""

    data: bytes
    box: tuple[int, int, int, int]  # left, top, w, h in the full-size image
    flip: bool


_JPEG_KEYS = ("jpeg", "jpeg_sizes", "jpeg_rows", "boxes", "flips")


def _uint8_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised; inside a loader worker in shared memory, so handing the batch over copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))  # what default_collate does in a worker
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class BatchBuilder:
    """One batch being filled, sample by sample: a transform's uint8 image is copied straight into the batch's
    buffer (made at the first image, ``capacity`` rows); a ``JpegCrop`` is kept for the device to decode."""

    def __init__(self, capacity: int):
        self.capacity, self.images, self.labels, self.jpegs = capacity, None, [], []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, out: np.ndarray | JpegCrop, label: int) -> None:
        if isinstance(out, JpegCrop):
            self.jpegs.append((len(self.labels), out))
        else:
            if self.images is None:
                self.images = _uint8_buffer((self.capacity, *out.shape))
            self.images.numpy()[len(self.labels)] = out
        self.labels.append(label)

    def take(self, skipped: int) -> dict:
        """The batch as tensors, ``skipped`` the samples lost on the way to it; the builder starts afresh."""
        n = len(self.labels)
        batch = {"images": self.images[:n] if self.images is not None else torch.empty(0, dtype=torch.uint8),
                 "labels": torch.tensor(self.labels, dtype=torch.long), "skipped": torch.tensor(skipped)}
        if self.jpegs:
            rows, crops = zip(*self.jpegs)
            batch.update(jpeg=torch.frombuffer(bytearray(b"".join(c.data for c in crops)), dtype=torch.uint8),
                         jpeg_sizes=torch.tensor([len(c.data) for c in crops]), jpeg_rows=torch.tensor(rows),
                         boxes=torch.tensor([c.box for c in crops]), flips=torch.tensor([c.flip for c in crops]))
        self.images, self.labels, self.jpegs = None, [], []
        return batch


@dataclass(frozen=True)
class _Normalizes:
    """What a transform hands the device: ``to_device`` turns a loader batch into model input."""

    size: tuple[int, int] | int
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD

    def to_device(self, batch: dict, device) -> dict:
        """``{"pixel_values": normalised float32 (B, C, H, W), "labels", ...}`` on ``device``; ``skipped``, a
        count for the log, stays behind."""
        device = torch.device(device)
        out = move(batch, device, skip=("images", "skipped", *_JPEG_KEYS))
        out["pixel_values"] = normalize(self.images_on(batch, device), self.mean, self.std)
        return out

    def images_on(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's uint8 (B, H, W, 3) images on ``device``."""
        return batch["images"].to(device, non_blocking=device.type == "cuda")


@dataclass(frozen=True)
class TrainTransform(_Normalizes):
    """Random-resized crop + horizontal flip: the paper's (Inception) augmentation."""

    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        size = image_pair(self.size)
        box, flip = draw_train_crop(img.width, img.height, size, rng, self.scale, self.flip)
        return resized_region(img, box, size, self.interpolation, flip)


@dataclass(frozen=True)
class EvalTransform(_Normalizes):
    """Resize the shorter side to size / crop_pct, centre crop."""

    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        h, w = image_pair(self.size)
        scale = max(h / img.height, w / img.width) / self.crop_pct
        # resize the shorter side and centre-crop in one resampling: the crop in source pixels
        cw, ch = min(img.width, w / scale), min(img.height, h / scale)
        box = ((img.width - cw) / 2, (img.height - ch) / 2, (img.width + cw) / 2, (img.height + ch) / 2)
        img, box = decode_region(img, box, (w, h))
        return np.asarray(img.resize((w, h), RESAMPLE[self.interpolation], box=box))


@dataclass(frozen=True)
class GpuTrainTransform(TrainTransform):
    """``data.decode=gpu``: the worker reads a JPEG's header only and draws its crop and flip (as the CPU path
    would, from the same generator); the device decodes the batch's JPEGs at once (nvJPEG through torchvision),
    then crops, resizes (antialiased) and flips each. Other images (PNG, CMYK JPEGs) are decoded in the worker.
    """

    def __call__(self, img: Image.Image, rng: random.Random) -> np.ndarray | JpegCrop:
        size = image_pair(self.size)
        box, flip = draw_train_crop(img.width, img.height, size, rng, self.scale, self.flip)
        if img.format == "JPEG" and img.mode in ("RGB", "L") and isinstance(img.fp, io.BytesIO):
            return JpegCrop(img.fp.getvalue(), box, flip)  # the loader opened the sample's bytes, undecoded
        return resized_region(img, box, size, self.interpolation, flip)

    def to_device(self, batch: dict, device) -> dict:
        """As the CPU path's, less the samples whose JPEG does not decode: each is logged (its key and shard) as
        the CPU path logs one, and listed in ``undecodable``; their rows leave the batch."""
        if "jpeg" not in batch:
            return super().to_device(batch, device)
        device = torch.device(device)
        images, broken = decode_crops(batch, image_pair(self.size), self.interpolation, device)
        out = move(batch, device, skip=("images", "skipped", *_JPEG_KEYS))
        out["undecodable"] = [batch["keys"][r] if "keys" in batch else str(r) for r in broken]
        for what in out["undecodable"]:
            log.warning("skipping a sample that does not decode: %s (decoded on %s)", redact(what), device)
        if broken:
            keep = sorted(set(range(len(images))) - set(broken))
            images, out["labels"] = images[keep], out["labels"][torch.tensor(keep, device=out["labels"].device)]
            if "keys" in out:
                out["keys"] = [out["keys"][r] for r in keep]
        out["pixel_values"] = normalize(images, self.mean, self.std)
        return out


def decode_each(datas: list[torch.Tensor], decode) -> list[torch.Tensor | None]:
    """``decode`` (a list of JPEG byte tensors -> a list of images) run on the whole list at once; when that
    fails (one broken JPEG fails a batched decode), on each alone: None for those that do not decode."""
    try:
        return list(decode(datas))
    except (RuntimeError, ValueError):
        out = []
        for data in datas:
            try:
                out.append(decode([data])[0])
            except (RuntimeError, ValueError):
                out.append(None)
        return out


def nvjpeg(device: torch.device):
    """torchvision's batched ``decode_jpeg`` on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return lambda datas: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def decode_crops(batch: dict, size: tuple[int, int], interpolation: str, device: torch.device,
                 decode=None) -> tuple[torch.Tensor, list[int]]:
    """The batch's JPEGs decoded together on ``device`` (by ``decode``; default ``nvjpeg``), each cropped to its
    box, resized to ``size`` (height, width) and flipped as drawn, into the rows the worker left for them: uint8
    (B, H, W, 3), and the rows whose JPEG did not decode (left as they are: the caller drops them)."""
    h, w = size
    datas = list(torch.split(batch["jpeg"], batch["jpeg_sizes"].tolist()))
    decoded = decode_each(datas, decode or nvjpeg(device))
    n = len(batch["labels"])
    out = batch["images"].to(device) if batch["images"].numel() else \
        torch.empty((n, h, w, 3), dtype=torch.uint8, device=device)
    broken = []
    for row, img, (left, top, cw, ch), flip in zip(batch["jpeg_rows"].tolist(), decoded, batch["boxes"].tolist(),
                                                   batch["flips"].tolist()):
        if img is None:
            broken.append(row)
            continue
        crop = img[None, :, top:top + ch, left:left + cw].float()
        resized = torch.nn.functional.interpolate(crop, size=(h, w), mode=interpolation, antialias=True,
                                                  align_corners=False)
        pixels = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        out[row] = (pixels.flip(-1) if flip else pixels).permute(1, 2, 0)
    return out, broken
