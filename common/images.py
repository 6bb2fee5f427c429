"""Image conventions every stage shares: size pairs and the normalisation default (no torch import here)."""

from __future__ import annotations

#: the paper's normalisation (pixels to [-1, 1]), timm's IMAGENET_INCEPTION_MEAN / _STD
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def image_pair(size) -> tuple[int, int]:
    """``224``, ``[224, 160]`` or ``(224, 160)`` as ``(height, width)``."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def unnormalize(x, mean, std):
    """Undo ``(pixels - mean) / std`` on a (batch, channels, H, W) tensor, in its dtype and on its device."""
    return x * x.new_tensor(std).view(1, -1, 1, 1) + x.new_tensor(mean).view(1, -1, 1, 1)
